"""The whole study pipeline in miniature: train, probe, figures and report on digits-mlp, 2 seeds."""
import json
import runpy
from pathlib import Path

import pandas as pd
import pytest

from flatlora import METHODS

ROOT = Path(__file__).resolve().parents[1]
mismatch_study = runpy.run_path(str(ROOT / "analysis_scripts" / "mismatch_study.py"), run_name="mismatch_study")

STUDY_METHODS = [m for m in ("full-ft", "lora", "flat-lora", "sam-lora", "sam-full") if m in METHODS]


def test_miniature_study_end_to_end(tmp_path, shared_digits_pretraining):
    """In this process, with digits-mlp's pretraining shared by all 10 runs and their probes."""
    args = ["--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), "--figures", str(tmp_path / "fig"),
            "--tasks", "digits-mlp", "--methods", *STUDY_METHODS, "--seeds", "0", "1", "--steps", "digits-mlp=10",
            "--examples", "32", "--spaces", "lora", "merged", "tangent", "normal", "--no-progress"]
    assert mismatch_study["main"](args) == 0
    res = tmp_path / "results" / "digits-mlp"
    metrics = pd.read_csv(res / "metrics.csv")
    assert sorted(metrics["method"].unique()) == sorted(STUDY_METHODS) and set(metrics["seed"]) == {0, 1}
    probes = pd.read_csv(res / "probes.csv")
    assert {"space", "measure", "x", "value", "err", "task", "method", "seed"} <= set(probes.columns)
    lora = probes[probes["method"] == "lora"]
    assert set(lora["space"]) == {"lora", "merged", "tangent", "normal"}
    assert set(lora["measure"]) >= {"eigenvalue", "expected_loss", "worst_case", "line"}
    assert set(probes.loc[probes["method"] == "full-ft", "space"]) == {"merged"}  # the weights LoRA adapts
    curves = pd.read_csv(res / "probes-curves.csv")
    assert {"alpha", "loss", "delta_loss", "direction", "space", "method"} <= set(curves.columns)
    assert (curves.loc[curves["alpha"] == 0, "delta_loss"].abs() < 1e-6).all()
    planes = pd.read_csv(res / "planes.csv")
    assert planes[["alpha", "beta"]].drop_duplicates().shape[0] == 21 * 21
    assert set(planes["method"]) == {"lora", "flat-lora", "sam-full"} & set(STUDY_METHODS)
    for name in ("lines", "expected-loss", "eigenvalues", "sharpness-vs-accuracy", "planes"):
        assert (tmp_path / "fig" / f"digits-mlp-{name}.png").stat().st_size > 1000, name
    report = (tmp_path / "results" / "report.md").read_text()
    assert "Against LoRA, paired by seed" in report and "flat-lora" in report and "digits-mlp-lines.png" in report
    # a second call reuses every finished piece (no retraining): it is resumable
    before = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("metrics.json")}
    assert mismatch_study["main"](args[:-1] + ["--stage", "train", "--no-progress"]) == 0
    assert before == {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("metrics.json")}


def test_the_recipe_gives_each_method_its_own_fields():
    from landscape.study.pipeline import Recipe

    r = Recipe(lr=5e-4, lora_targets="all-linear", sigma=0.2, schedule="constant", rho_lora=0.1, rho_full=0.05)
    everywhere = {"task_options": {"lora_targets": "all-linear"}}
    assert r.fields("full-ft") == everywhere  # full fine-tuning keeps its own learning rate
    assert r.fields("lora") == {"lr": 5e-4, **everywhere}
    assert r.fields("flat-lora") == {"lr": 5e-4, **everywhere, "sigma": 0.2, "schedule": "constant"}
    assert r.fields("sam-lora") == {"lr": 5e-4, **everywhere, "rho": 0.1}
    assert r.fields("sam-full") == {"lr": 5e-4, **everywhere, "rho": 0.05}
    assert Recipe().fields("flat-lora") == {}


def test_a_finished_run_trained_otherwise_is_refused_not_reused(tmp_path, shared_digits_pretraining, capsys):
    args = ["--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), "--tasks", "digits-mlp",
            "--methods", "lora", "--seeds", "0", "--steps", "digits-mlp=4", "--stage", "train", "--no-progress"]
    assert mismatch_study["main"](args) == 0

    with pytest.raises(SystemExit) as e:
        mismatch_study["main"](args + ["--lr", "0.05"])
    assert e.value.code != 0 and "trained with other ['lr']" in capsys.readouterr().err


def test_a_new_machine_continues_from_the_committed_results(tmp_path, shared_digits_pretraining, monkeypatch):
    """RESULTS alone (committed) carries the study: each LoRA-family run is a loadable unit in
    RESULTS/TASK/units/, and with a fresh --out nothing is trained or probed again."""
    from flatlora import load_run
    from landscape.study import pipeline

    common = ["--results", str(tmp_path / "results"), "--figures", str(tmp_path / "fig"), "--tasks", "digits-mlp",
              "--methods", "lora", "flat-lora", "--seeds", "0", "--steps", "digits-mlp=4", "--examples", "16",
              "--spaces", "merged", "--no-progress"]
    assert mismatch_study["main"](["--out", str(tmp_path / "runs"), *common]) == 0
    unit = tmp_path / "results" / "digits-mlp" / "units" / "flat-lora-s0"
    local = tmp_path / "runs" / "digits-mlp" / "flat-lora-s0"
    for name in ("config.json", "metrics.json", "predictions.json", "adapter/adapter_model.safetensors"):
        assert (unit / name).read_bytes() == (local / name).read_bytes(), name
    load_run(unit)
    probes = (tmp_path / "results" / "digits-mlp" / "probes.csv").read_text()
    for name in ("run", "probe_model", "corruption_accuracy"):
        monkeypatch.setattr(pipeline, name, lambda *a, name=name, **k: pytest.fail(f"{name} ran again"))
    assert mismatch_study["main"](["--out", str(tmp_path / "new-machine"), *common]) == 0
    assert not (tmp_path / "new-machine").exists()
    assert (tmp_path / "results" / "digits-mlp" / "probes.csv").read_text() == probes


@pytest.fixture
def full_ft_study(tmp_path, shared_digits_pretraining):
    """Full fine-tuning on digits-mlp, seed 0, trained, probed and reported into tmp_path → its CLI arguments
    without --out (RESULTS and figures in tmp_path)."""
    common = ["--results", str(tmp_path / "results"), "--figures", str(tmp_path / "fig"), "--tasks", "digits-mlp",
              "--methods", "full-ft", "--seeds", "0", "--steps", "digits-mlp=4", "--examples", "16",
              "--spaces", "merged", "--no-progress"]
    assert mismatch_study["main"](["--out", str(tmp_path / "runs"), *common]) == 0
    return common


def test_a_full_fine_tuning_run_is_committed_as_a_record_with_its_own_fingerprint(tmp_path, full_ft_study):
    from landscape.study.pipeline import WEIGHTS_DIGEST, is_record, run_fingerprint

    unit = tmp_path / "results" / "digits-mlp" / "units" / "full-ft-s0"
    local = tmp_path / "runs" / "digits-mlp" / "full-ft-s0"
    assert is_record(unit) and not (unit / "model").exists() and (local / "model").is_dir()
    assert (unit / WEIGHTS_DIGEST).stat().st_size < 100
    assert run_fingerprint(unit) == run_fingerprint(local)  # its committed parts are the trained run's
    made = json.loads((tmp_path / "results" / "digits-mlp" / "probes-manifest.json").read_text())
    assert made["runs"] == ["units/full-ft-s0"]  # probed from OUT, named by its record: no machine's folder


def test_a_new_machine_reports_full_fine_tuning_from_its_record(tmp_path, full_ft_study, monkeypatch):
    from landscape.study import pipeline

    for name in ("run", "probe_model", "corruption_accuracy"):
        monkeypatch.setattr(pipeline, name, lambda *a, name=name, **k: pytest.fail(f"{name} ran again"))
    assert mismatch_study["main"](["--out", str(tmp_path / "new-machine"), *full_ft_study]) == 0
    metrics = pd.read_csv(tmp_path / "results" / "digits-mlp" / "metrics.csv")
    assert list(metrics["method"]) == ["full-ft"]


def test_a_record_whose_probe_part_is_stale_asks_for_training_before_any_work(tmp_path, full_ft_study, capsys):
    """Other probe settings on a new machine: the record cannot be probed, and nothing is written."""
    before = {p: p.read_bytes() for p in (tmp_path / "results").rglob("*") if p.is_file()}
    args = ["--out", str(tmp_path / "new-machine"), *full_ft_study, "--examples", "8", "--stage", "probe"]
    with pytest.raises(SystemExit) as e:
        mismatch_study["main"](args)
    err = capsys.readouterr().err
    assert e.value.code != 0 and "full-ft-s0" in err and "--retrain-records" in err
    assert before == {p: p.read_bytes() for p in (tmp_path / "results").rglob("*") if p.is_file()}


def test_retraining_a_record_gives_back_its_own_weights_so_other_probe_settings_run(tmp_path, full_ft_study):
    from landscape.study.pipeline import run_fingerprint

    new = ["--out", str(tmp_path / "new-machine"), *full_ft_study]
    assert mismatch_study["main"]([*new, "--stage", "train", "--retrain-records"]) == 0
    unit = tmp_path / "results" / "digits-mlp" / "units" / "full-ft-s0"
    assert run_fingerprint(tmp_path / "new-machine" / "digits-mlp" / "full-ft-s0") == run_fingerprint(unit)
    assert mismatch_study["main"]([*new, "--examples", "8", "--stage", "probe"]) == 0


def mismatched_record(tmp_path, full_ft_study) -> tuple[Path, str, list[str]]:
    """The record's digest replaced, as if it had been trained on other software → (its unit, its own
    digest, the arguments that retrain it into tmp_path/new-machine)."""
    unit = tmp_path / "results" / "digits-mlp" / "units" / "full-ft-s0"
    digest = (unit / "model.sha1").read_text()
    (unit / "model.sha1").write_text("0" * 40 + "\n")
    return unit, digest, ["--out", str(tmp_path / "new-machine"), *full_ft_study, "--stage", "train",
                          "--retrain-records"]


def test_a_retrained_record_with_other_weights_replaces_nothing(tmp_path, full_ft_study, capsys):
    _, _, retrain = mismatched_record(tmp_path, full_ft_study)
    with pytest.raises(SystemExit) as e:
        mismatch_study["main"](retrain)
    assert e.value.code != 0 and "gave other weights" in capsys.readouterr().err
    assert not (tmp_path / "new-machine" / "digits-mlp" / "full-ft-s0").exists()


def test_a_finished_retraining_is_checked_again_not_trained_again(tmp_path, full_ft_study, capsys, monkeypatch):
    """The scratch run that a mismatch leaves behind: a second call names it again (a study error,
    not the trainer's "run exists"), and once the digest is the record's it serves without training."""
    from landscape.study import pipeline

    unit, digest, retrain = mismatched_record(tmp_path, full_ft_study)
    with pytest.raises(SystemExit):
        mismatch_study["main"](retrain)
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: pytest.fail("trained again"))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        mismatch_study["main"](retrain)
    assert "delete it to train again" in capsys.readouterr().err
    (unit / "model.sha1").write_text(digest)
    assert mismatch_study["main"](retrain) == 0
    assert pipeline.run_fingerprint(tmp_path / "new-machine" / "digits-mlp" / "full-ft-s0") == \
        pipeline.run_fingerprint(unit)


def test_loading_a_record_names_the_missing_weights(tmp_path, full_ft_study):
    from flatlora import load_run

    with pytest.raises(FileNotFoundError, match=r"model/ is missing.*train the run again"):
        load_run(tmp_path / "results" / "digits-mlp" / "units" / "full-ft-s0")
