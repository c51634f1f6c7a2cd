"""The command-line path a user takes with their own work: train → probe → figures, and the ways it
must not go wrong — stale or another run's cached numbers, lost runs, bad input that runs anyway.

The scripts are called in-process through their ``main(argv)`` (what ``python analysis_scripts/X.py``
and the console entry points run); a bad input must end in ``SystemExit(2)`` with one line
``error: …`` on stderr, before any work, leaving nothing behind.
"""
import json
import re
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
    made = json.loads((tmp_path / "probes-manifest.json").read_text())
    assert made["examples"] == 48 and made["command"].endswith("--examples 48")  # the call that wrote it


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


def test_loss_lines_of_adapters_without_seeds(tmp_path):
    """Curves probed from --adapter folders carry a run but no seed (a KeyError in session 3's CI):
    the method's curve is the mean over every direction of every adapter."""
    import numpy as np

    from landscape.study.figures import fig_lines

    alphas = np.linspace(-1, 1, 5)
    curves = pd.DataFrame([{"alpha": a, "loss": a * a * k, "delta_loss": a * a * k, "direction": d,
                            "space": "merged", "method": "lora", "run": f"adapter-{k}"}
                           for k in (1, 2) for d in (0, 1) for a in alphas])
    ax = fig_lines(curves, task="csv").axes[0]
    mean = ax.get_lines()[0].get_ydata()
    assert np.allclose(mean, 1.5 * alphas ** 2)


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


# ------------------------------------------------- issue 12, train side: runs that can be trusted
def module(name: str) -> dict:
    """The globals of analysis_scripts/NAME.py, loaded as a module (its main not run)."""
    return runpy.run_path(str(ROOT / "analysis_scripts" / f"{name}.py"), run_name=name)


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: relative path → bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, argv) -> str:
    """train.py's one-line error for ``argv`` (exit status 2)."""
    with pytest.raises(SystemExit) as e:
        script("train")(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


DIGITS = ["--task", "digits-mlp", "--no-progress"]


@pytest.fixture
def no_cuda(monkeypatch):
    """This torch sees no CUDA device (whatever the machine has)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def forbid_models(monkeypatch) -> None:
    """From now on in the test, building a model fails it: an error must come before."""
    import flatlora.training.runs as runs

    monkeypatch.setattr(runs, "_build_model", lambda *a: pytest.fail("a model was built"))


@pytest.mark.parametrize("args, message", [
    (["--lora-dropout", "2"], "--lora-dropout must be in [0, 1)"),
    (["--device", "cuda"], "--device cuda: this torch has no CUDA"),
])
def test_an_overwrite_with_a_bad_argument_keeps_the_old_run(tmp_path, task, capsys, monkeypatch, no_cuda, args, message):
    """Issue 12.3: the arguments are checked before the finished run is touched."""
    r = train(tmp_path / "run", task, method="lora")
    before = snapshot(tmp_path)
    forbid_models(monkeypatch)
    assert message in refused(capsys, [*DIGITS, "--out", str(r), "--overwrite", *args])
    assert snapshot(tmp_path) == before


def test_an_overwrite_failing_in_training_keeps_the_old_run(tmp_path, task, monkeypatch):
    """Issue 12.3: the new run is written beside the old one, which stays whole until it finishes."""
    import flatlora.training.runs as runs

    r = train(tmp_path / "run", task, method="lora")
    before = snapshot(r)

    def broken_loop(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(runs, "train_loop", broken_loop)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(r, task, method="lora", seed=1)
    assert snapshot(r) == before


def test_an_interrupted_overwrite_resumes_and_then_replaces_the_old_run(tmp_path, task, monkeypatch):
    """Issue 12.3: started again, an interrupted overwrite resumes from OUT.overwrite/; once finished
    it is the run in OUT, and nothing is left beside it."""
    import flatlora.training.runs as runs

    r = train(tmp_path / "run", task, method="lora")
    new = config(steps=4, method="lora", seed=1, checkpoint_every=2)
    after_step = runs._Run._after_step

    def interrupted_at_step_3(job, t, loss):
        after_step(job, t, loss)
        if t == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(runs._Run, "_after_step", interrupted_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(new, r, overwrite=True, progress=False, task=task)
    monkeypatch.undo()
    starts, loop = [], runs.train_loop
    monkeypatch.setattr(runs, "train_loop", lambda *a, **k: starts.append(k["start_step"]) or loop(*a, **k))
    run(new, r, overwrite=True, progress=False, task=task)
    assert starts == [2] and json.loads((r / "config.json").read_text())["seed"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def write_csvs(folder: Path, classes: int = 12) -> None:
    """train.csv (two rows per class), validation.csv and test.csv (one row per class, in class
    order) with the integer labels 0 … classes−1."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = lambda tag, n: pd.DataFrame({"text": [f"{tag} example {i} of class {i % classes}" for i in range(n)],
                                        "label": [i % classes for i in range(n)]})
    rows("train", 2 * classes).to_csv(folder / "train.csv", index=False)
    rows("validation", classes).to_csv(folder / "validation.csv", index=False)
    rows("test", classes).to_csv(folder / "test.csv", index=False)


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory):
    """One step of LoRA on MiniLM with 12 integer classes, trained by train.py from the CSVs' folder
    with relative paths only → the run folder."""
    import os

    from flatlora.tasks import minilm_dir

    work = tmp_path_factory.mktemp("custom") / "work"
    write_csvs(work)
    with pytest.MonkeyPatch.context() as m:
        m.chdir(work)
        assert script("train")(["--task", "custom", "--model-dir", os.path.relpath(minilm_dir(), work),
                                "--train-csv", "train.csv", "--validation-csv", "validation.csv", "--test-csv",
                                "test.csv", "--steps", "1", "--batch-size", "4", "--out", "run",
                                "--no-progress"]) == 0
    return work / "run"


def test_a_run_names_its_classes_and_its_predictions(custom_run):
    """Issue 12.4: labels.json maps class ids to the CSV's labels (numerically: "2" is id 2), and
    each prediction carries its label beside its id."""
    from flatlora.adapters import LABELS_FILE

    names = [str(i) for i in range(12)]
    assert json.loads((custom_run / LABELS_FILE).read_text()) == {"labels": names}
    predictions = json.loads((custom_run / "predictions.json").read_text())
    assert len(predictions["predictions"]) == 12
    assert predictions["predicted_labels"] == [names[i] for i in predictions["predictions"]]


def test_a_run_trained_with_relative_paths_loads_from_another_directory(custom_run, tmp_path, monkeypatch):
    """Issue 12.5: config.json holds absolute paths; the run loads wherever it is read from, with
    the CSV label "2" as class id 2."""
    from flatlora import load_run

    monkeypatch.chdir(tmp_path)
    _, task, cfg = load_run(custom_run)
    assert all(Path(cfg["task_options"][k]).is_absolute() for k in ("model_dir", "train_csv", "test_csv"))
    assert [e["label"] for e in task.splits["test"]] == list(range(12))


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "--device cuda: this torch has no CUDA"),
    (["--epochs", "0"], "--epochs must be"),
    (["--alpha", "0"], "--alpha must be"),
    (["--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
    (["--method", "lora", "--sigma", "0.1"], "--sigma does not apply to --method lora"),
    (["--method", "flat-lora", "--rho", "0.1"], "--rho does not apply to --method flat-lora"),
    (["--method", "full-ft", "--rank", "4"], "--rank does not apply to --method full-ft"),
    (["--train-csv", "train.csv"], "--train-csv only apply to --task custom"),
])
def test_train_refuses_bad_arguments_before_any_work(tmp_path, capsys, monkeypatch, no_cuda, args, message):
    """Issue 12.10 and 12.11: a bad or ignored option is one line naming it, and nothing is written."""
    forbid_models(monkeypatch)
    assert message in refused(capsys, [*DIGITS, "--out", str(tmp_path / "out"), *args])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting, value, message", [
    ("lora_dropout", 1.0, "lora_dropout must be in [0, 1)"),
    ("warmup_ratio", 1.0, "warmup_ratio must be in [0, 1)"),
    ("weight_decay", -0.1, "weight_decay must be a finite number >= 0"),
    ("max_grad_norm", 0.0, "max_grad_norm must be a finite number > 0"),
    ("eval_batch_size", 0, "eval_batch_size must be >= 1"),
    ("checkpoint_every", 0, "checkpoint_every must be >= 1"),
])
def test_a_config_refuses_values_out_of_range(setting, value, message):
    """Issue 12.3: every setting is checked in TrainConfig.resolved, the error naming it."""
    import types

    from flatlora import TrainConfig
    from flatlora.training import ConfigError

    task = types.SimpleNamespace(defaults={}, splits={"train": range(64)})  # what resolved() reads of a task
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        TrainConfig(task="digits-mlp", **{setting: value}).resolved(task)
    assert e.value.setting == setting


@pytest.mark.parametrize("content, message", [("text,label\n", "has a header but no rows"), ("", "is empty")])
def test_train_refuses_a_csv_without_rows(tmp_path, capsys, content, message):
    """Issue 12.10: an empty CSV, or one with a header only, is an error naming the file."""
    write_csvs(tmp_path)
    (tmp_path / "train.csv").write_text(content)
    line = refused(capsys, ["--task", "custom", "--model-dir", str(tmp_path), "--train-csv",
                            str(tmp_path / "train.csv"), "--test-csv", str(tmp_path / "test.csv"),
                            "--out", str(tmp_path / "out")])
    assert message in line and "train.csv" in line
    assert not (tmp_path / "out").exists()


def test_train_resuming_with_other_settings_names_overwrite(tmp_path, capsys, monkeypatch):
    """Issue 12.10: the error names the command line's option, --overwrite."""
    forbid_models(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"task": "digits-mlp", "seed": 5}))
    (out / "checkpoint.pt").write_bytes(b"an interrupted run")
    before = snapshot(tmp_path)
    assert "--overwrite" in refused(capsys, [*DIGITS, "--out", str(out)])
    assert snapshot(tmp_path) == before


def test_train_refuses_a_file_as_out(tmp_path, capsys, monkeypatch):
    forbid_models(monkeypatch)
    (tmp_path / "out").write_text("notes")
    assert f"--out {tmp_path / 'out'} is a file" in refused(capsys, [*DIGITS, "--out", str(tmp_path / "out")])
    assert (tmp_path / "out").read_text() == "notes"


def test_a_run_records_no_setting_its_method_does_not_read(tmp_path, task):
    """Issue 12.11: config.json of plain LoRA holds no σ or ρ (None): none was used."""
    saved = json.loads((train(tmp_path / "run", task, method="lora") / "config.json").read_text())
    assert saved["sigma"] is None and saved["rho"] is None and saved["schedule"] is None


def test_train_shows_progress_only_on_a_terminal(monkeypatch):
    """Issue 12.13: progress bars by default when stderr is a terminal, and --progress / --no-progress."""
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert module("train")["parse_args"](["--out", "x"]).progress is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert module("train")["parse_args"](["--out", "x"]).progress is True
    assert module("train")["parse_args"](["--out", "x", "--no-progress"]).progress is False


class _Parsed(Exception):
    """Raised instead of parsing: carries the parser a script built."""


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "analysis_scripts").glob("*.py")
                                        if p.stem != "__init__"))
def test_every_option_of_every_script_has_help_and_shows_its_default(name, monkeypatch):
    """Issue 12.13: each option of each script in analysis_scripts/ (benchmarks aside) has help text,
    and its --help shows the default of every option that has one."""
    import argparse

    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed) as e:
        module(name)["main"]()
    parser = e.value.args[0]
    undocumented = [a.dest for a in parser._actions if not a.help]
    hidden_defaults = [a.dest for a in parser._actions if a.default not in (None, argparse.SUPPRESS)
                       and "default" not in parser._get_formatter()._expand_help(a)]
    assert (undocumented, hidden_defaults) == ([], [])
