"""The ΔL top-up (landscape.study.noise_top_up): more pairs exactly where a run's interval holds 0,
merged into the estimate a longer probe would have given; in the study, as resumable parts."""
import json
import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from landscape.study.noise_top_up import check_top_up, held_zero, merge_top_up, top_up
from landscape.study.suite import ProbeSettings, probe_model

ROOT = Path(__file__).resolve().parents[1]
mismatch_study = runpy.run_path(str(ROOT / "analysis_scripts" / "mismatch_study.py"), run_name="mismatch_study")


def _suite(pairs: int) -> ProbeSettings:
    return ProbeSettings(spaces=("merged", "tangent"), sigmas=(0.05, 0.2), noise_min_samples=pairs,
                         noise_max_samples=pairs, num_directions=1, alphas=3, worst_case_steps=1, eig_tol=1e-2)


def test_a_top_up_gives_its_cell_the_estimate_of_the_longer_probe(digits_flat_lora_run):
    from flatlora import load_run
    from landscape import Loss

    _, _, folder = digits_flat_lora_run
    model, task, _ = load_run(folder)
    loss = Loss(task.batches("validation", 32, limit=64))
    short, _ = probe_model(model, loss, _suite(4))
    long, _ = probe_model(model, loss, _suite(10))
    cell = ("tangent", 0.2)
    merged = merge_top_up(short, top_up(model, loss, _suite(4), [cell], pairs=10), first=4)

    noise = merged["measure"] == "expected_loss"
    at = noise & (merged["space"] == cell[0]) & np.isclose(merged["x"], cell[1])
    want = long[(long["measure"] == "expected_loss") & (long["space"] == cell[0]) & np.isclose(long["x"], cell[1])]
    assert merged.loc[at, "value"].item() == pytest.approx(want["value"].item(), rel=1e-5)
    assert merged.loc[at, "err"].item() == pytest.approx(want["err"].item(), rel=1e-5)
    assert merged.loc[at, "samples"].item() == 10 and (merged.loc[noise & ~at, "samples"] == 4).all()
    pd.testing.assert_frame_equal(merged.loc[~at, short.columns], short.loc[~at])  # every other cell as probed


def test_held_zero_names_the_cells_whose_interval_holds_0():
    rows = pd.DataFrame({"space": ["merged", "merged", "normal", "normal"], "x": [0.05, 0.1, 0.05, 1.0],
                         "measure": ["expected_loss"] * 3 + ["line"], "value": [1e-4, -2e-4, 3e-4, 0.0],
                         "err": [2e-4, 1e-4, 3e-4, 1.0]})
    assert held_zero(rows) == [("merged", 0.05), ("normal", 0.05)]


def test_a_top_up_that_cannot_be_merged_exactly_is_refused():
    with pytest.raises(ValueError, match="same number of pairs"):
        check_top_up(ProbeSettings(noise_min_samples=8, noise_max_samples=16), 32)
    with pytest.raises(ValueError, match="at least 10"):
        check_top_up(ProbeSettings(noise_min_samples=8, noise_max_samples=8), 9)


def test_the_study_tops_up_the_runs_cells_that_hold_0_once(tmp_path, shared_digits_pretraining, monkeypatch, capsys):
    """--noise-pairs through the study script: parts in noise-parts/ for the runs with such cells,
    ``samples`` on every ΔL row, the report's note, and a second call that evaluates nothing."""
    from landscape.study import pipeline

    args = ["--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), "--figures", str(tmp_path / "fig"),
            "--tasks", "digits-mlp", "--methods", "lora", "flat-lora", "--seeds", "0", "--steps", "digits-mlp=4",
            "--examples", "16", "--spaces", "merged", "tangent", "--sigmas", "0.01", "5.0", "--noise-samples", "4",
            "--no-progress"]
    assert mismatch_study["main"](args + ["--stage", "train", "probe", "report"]) == 0
    res = tmp_path / "results" / "digits-mlp"
    before = pd.read_csv(res / "probes.csv")
    holding = {m: held_zero(before[before["method"] == m]) for m in ("lora", "flat-lora")}
    held = sum(map(len, holding.values()))
    assert 0 < held < 8, holding  # the precondition: some cells hold 0, not all
    report = (tmp_path / "results" / "report.md").read_text()
    assert f"Within its own run, {held} of 8 run × space × σ cells hold 0 (the study's --noise-pairs" in report

    assert mismatch_study["main"](args + ["--noise-pairs", "8"]) == 0
    after = pd.read_csv(res / "probes.csv")
    noise = after[after["measure"] == "expected_loss"]
    assert int((noise["samples"] == 8).sum()) == sum(map(len, holding.values()))
    assert set(noise["samples"]) <= {4.0, 8.0}
    assert sorted(p.name for p in (res / "noise-parts").glob("*.json")) == sorted(
        f"{m}-s0.json" for m, cells in holding.items() if cells)
    report = (tmp_path / "results" / "report.md").read_text()
    assert "after the top-up: each run's ΔL comes from 4 antithetic pairs, or from 8 where the first 4" in report
    assert f"Probes (`probes.csv`) made by `python analysis_scripts/mismatch_study.py {' '.join(args)} --noise-pairs 8`" \
        in report  # the top-up's command, not only the report's

    monkeypatch.setattr(pipeline, "top_up", lambda *a, **k: pytest.fail("a committed top-up was evaluated again"))
    monkeypatch.setattr(pipeline, "probe_model", lambda *a, **k: pytest.fail("a probe ran again"))
    assert mismatch_study["main"](args + ["--noise-pairs", "8", "--stage", "probe"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(res / "probes.csv"), after)


def test_a_later_probe_stage_keeps_the_recorded_top_up_unless_told_0(tmp_path, shared_digits_pretraining, capsys):
    """Probing again without --noise-pairs (other stages, a new seed) keeps the top-up that the
    manifest records, and the manifest's command says so; --noise-pairs 0 drops it."""
    from landscape.study.pipeline import recorded_noise_pairs

    args = ["--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), "--figures", str(tmp_path / "fig"),
            "--tasks", "digits-mlp", "--methods", "lora", "--seeds", "0", "--steps", "digits-mlp=4",
            "--examples", "16", "--spaces", "merged", "--sigmas", "0.01", "5.0", "--noise-samples", "4",
            "--no-progress"]
    assert mismatch_study["main"](args + ["--noise-pairs", "8", "--stage", "train", "probe"]) == 0
    res = tmp_path / "results" / "digits-mlp"
    topped = pd.read_csv(res / "probes.csv")
    assert recorded_noise_pairs(res) == 8 and 8.0 in set(topped["samples"])  # precondition: a cell was topped up
    capsys.readouterr()

    assert mismatch_study["main"](args + ["--stage", "probe"]) == 0
    assert "keeping the 8-pair ΔL top-up" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(res / "probes.csv"), topped)
    made_by = json.loads((res / "probes-manifest.json").read_text())["command"]
    assert made_by.endswith("--stage probe --noise-pairs 8") and recorded_noise_pairs(res) == 8

    assert mismatch_study["main"](args + ["--noise-pairs", "0", "--stage", "probe"]) == 0
    assert "samples" not in pd.read_csv(res / "probes.csv")  # the probe's own 4 pairs, as before any top-up
    assert recorded_noise_pairs(res) == 0


def test_the_study_refuses_a_top_up_it_cannot_merge_before_any_work(tmp_path, capsys):
    args = ["--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), "--tasks", "digits-mlp",
            "--methods", "lora", "--seeds", "0", "--noise-samples", "16", "--noise-pairs", "32"]
    with pytest.raises(SystemExit) as e:
        mismatch_study["main"](args)
    assert e.value.code != 0 and "same number of pairs" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()
