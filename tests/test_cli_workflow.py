"""The command-line path a user takes with their own work: train → probe → figures, and the ways it
must not go wrong — stale or another run's cached numbers, lost runs, bad input that runs anyway.

The scripts are called in-process through their ``main(argv)`` (what ``python analysis_scripts/X.py``
and the console entry points run); a bad input must end in ``SystemExit(2)`` with one line
``error: …`` on stderr, before any work, leaving nothing behind.
"""
import json
import runpy
from pathlib import Path

import pandas as pd
import pytest

from flatlora import run
from helpers import config, digits_task

ROOT = Path(__file__).resolve().parents[1]
CHEAP_PROBE = ["--spaces", "merged", "--examples", "16", "--batch-size", "16", "--sigmas", "0.05",
               "--noise-samples", "2", "--directions", "1", "--alphas", "3", "--eig-tol", "1e-2"]


def script(name: str):
    """``main`` of analysis_scripts/NAME.py."""
    return runpy.run_path(str(ROOT / "analysis_scripts" / f"{name}.py"), run_name=name)["main"]


def train(out: Path, task, **settings) -> Path:
    run(config(steps=4, **settings), out, progress=False, task=task, overwrite=True)
    return out


@pytest.fixture(scope="module")
def task():
    return digits_task()


def eigenvalue(frame: pd.DataFrame) -> pd.Series:
    return frame[frame["measure"] == "eigenvalue"].set_index("run")["value"]


def test_probe_reprobes_when_the_settings_change(tmp_path, task):
    """Issue 12.1: other --examples must give other numbers, not the cached ones."""
    r = train(tmp_path / "runs" / "lora", task, method="lora")
    out = tmp_path / "probes.csv"
    probe = script("probe")
    assert probe([str(r), "--out", str(out), *CHEAP_PROBE]) == 0
    first = eigenvalue(pd.read_csv(out))
    assert probe([str(r), "--out", str(out), *CHEAP_PROBE, "--examples", "48"]) == 0
    second = eigenvalue(pd.read_csv(out))
    assert (first != second).all()
    assert json.loads((tmp_path / "probes-manifest.json").read_text())["examples"] == 48


def test_probe_reprobes_a_retrained_run(tmp_path, task):
    """Issue 12.1: after retraining the run (overwrite), its new weights are probed."""
    r = train(tmp_path / "lora", task, method="lora")
    out = tmp_path / "probes.csv"
    probe = script("probe")
    assert probe([str(r), "--out", str(out), *CHEAP_PROBE]) == 0
    first = eigenvalue(pd.read_csv(out))
    train(r, task, method="lora", seed=1)
    assert probe([str(r), "--out", str(out), *CHEAP_PROBE]) == 0
    assert (eigenvalue(pd.read_csv(out)) != first).all()


def test_probe_reuses_an_unchanged_run(tmp_path, task, monkeypatch):
    """The cache still works: the same run and settings are not probed twice."""
    r = train(tmp_path / "lora", task, method="lora")
    out = tmp_path / "probes.csv"
    probe = script("probe")
    assert probe([str(r), "--out", str(out), *CHEAP_PROBE]) == 0
    import landscape.study.pipeline as pipeline

    monkeypatch.setattr(pipeline, "probe_model", lambda *a, **k: pytest.fail("probed again"))
    assert probe([str(r), "--out", str(out), *CHEAP_PROBE]) == 0


def test_two_runs_with_the_same_name_do_not_collide(tmp_path, task):
    """Issue 12.2: A/runs/m and B/runs/m are two runs: two rows, each its own λ₁ and path."""
    a = train(tmp_path / "A" / "runs" / "m", task, method="lora", seed=0)
    b = train(tmp_path / "B" / "runs" / "m", task, method="lora", seed=1)
    out = tmp_path / "probes.csv"
    assert script("probe")([str(a), str(b), "--out", str(out), *CHEAP_PROBE]) == 0
    lam = eigenvalue(pd.read_csv(out))
    assert sorted(lam.index) == ["A/runs/m", "B/runs/m"]
    assert lam["A/runs/m"] != lam["B/runs/m"]


def test_probe_rows_name_runs_relative_to_the_output_folder(tmp_path, task):
    """Issue 12.5: a probe table carries no absolute path of the machine it ran on."""
    r = train(tmp_path / "runs" / "lora", task, method="lora")
    (tmp_path / "results").mkdir()
    out = tmp_path / "results" / "probes.csv"
    assert script("probe")([str(r), "--out", str(out), *CHEAP_PROBE]) == 0
    assert set(pd.read_csv(out)["run"]) == {"../runs/lora"}
    assert json.loads((tmp_path / "results" / "probes-manifest.json").read_text())["runs"] == ["../runs/lora"]


@pytest.mark.parametrize("args, message", [
    (["--spaces", "foo"], "--spaces"),
    (["--split", "nope"], "--split"),
    (["--sigmas", "-0.1"], "sigmas"),
    (["--eig-k", "0"], "eig_k"),
    (["--examples", "0"], "--examples"),
])
def test_probe_refuses_bad_settings_before_any_work(tmp_path, capsys, args, message):
    """Issue 12.10: one line on stderr, exit 2, no model loaded, nothing written."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text("{}")  # a model would fail to load: the error must come first
    with pytest.raises(SystemExit) as e:
        script("probe")([str(run_dir), "--out", str(tmp_path / "out" / "p.csv"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "out").exists()


def test_probe_refuses_a_folder_as_out(tmp_path, capsys, task):
    r = train(tmp_path / "run", task, method="lora")
    with pytest.raises(SystemExit) as e:
        script("probe")([str(r), "--out", str(tmp_path)])
    assert e.value.code == 2 and "is a folder" in capsys.readouterr().err


def test_make_figures_from_a_probe_table(tmp_path, task, capsys):
    """Issue 12.7: --probes draws what the table allows (accuracies from the runs' metrics.json) and
    says what it skipped and why."""
    runs = [train(tmp_path / "runs" / m, task, method=m) for m in ("lora", "flat-lora")]
    out = tmp_path / "probes.csv"
    assert script("probe")([*map(str, runs), "--out", str(out), *CHEAP_PROBE]) == 0
    capsys.readouterr()
    assert script("make_figures")(["--probes", str(out), "--out", str(tmp_path / "fig")]) == 0
    drawn = {Path(p).name for p in capsys.readouterr().out.split()}
    assert {"digits-mlp-lines.png", "digits-mlp-eigenvalues.png", "digits-mlp-expected-loss.png",
            "digits-mlp-sharpness-vs-accuracy.png"} <= drawn
    assert all((tmp_path / "fig" / name).stat().st_size > 1000 for name in drawn)


def test_make_figures_never_succeeds_with_nothing_drawn(tmp_path, capsys):
    """Issue 12.7: the folder probe.py wrote to, given as --results, is an error naming --probes."""
    (tmp_path / "probes.csv").write_text("space,measure,x,value\n")
    assert script("make_figures")(["--results", str(tmp_path), "--out", str(tmp_path / "fig")]) == 2
    assert "--probes" in capsys.readouterr().err
    assert not (tmp_path / "fig").exists()


def test_make_figures_with_an_empty_table_draws_nothing_and_fails(tmp_path, capsys):
    (tmp_path / "probes.csv").write_text("space,measure,x,value\n")
    assert script("make_figures")(["--probes", str(tmp_path / "probes.csv"), "--out", str(tmp_path / "fig")]) == 1
    err = capsys.readouterr().err
    assert "skipped" in err and "no figure could be drawn" in err


# --------------------------------------------------------------- issue 12.11: refused, not ignored
def test_a_sampler_returning_nan_is_an_error_naming_it(linear_lora):
    import torch

    from landscape import Loss, SpaceError, loss_line

    def broken_sampler(space, generator):
        return {n: torch.full(s, float("nan")) for n, s in space.shapes.items()}

    g = torch.Generator().manual_seed(0)
    loss = Loss([(torch.randn(4, 12, generator=g), torch.randint(0, 4, (4,), generator=g))])
    with pytest.raises(SpaceError, match="broken_sampler.*NaN or inf"):
        loss_line(linear_lora, loss, space="merged", direction=broken_sampler, progress=False)


def test_a_lora_conv_with_reflect_padding_is_refused_when_flat_lora_is_built():
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from flatlora import FlatLoRA, UnsupportedAdapterError

    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(64, 2))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    with pytest.raises(UnsupportedAdapterError, match="padding_mode='reflect'"):
        FlatLoRA(model, sigma=0.05, total_steps=10)
    assert torch.is_tensor(model(torch.randn(1, 3, 4, 4)))  # the model itself is untouched
