"""Shared fixtures (models from :mod:`helpers`) and offline settings.

The expensive things are made once per test session and shared by the tests that only read them:
digits-mlp's pretrained model (:func:`digits_task`), a finished digits run, the Rotten Tomatoes task
(tokenized once), the MiniLM models trained for the accuracy checks, and the one torchrun launch
that runs every distributed check (:func:`distributed_checks`)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pickle
from pathlib import Path

import pytest
import torch

import helpers
from helpers import make_conv_lora, make_gpt2_lora, make_linear_lora

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def linear_lora():
    return make_linear_lora()


@pytest.fixture
def gpt2_lora():
    return make_gpt2_lora()


@pytest.fixture
def conv_lora():
    return make_conv_lora()


# ------------------------------------------------------------------------------------------ digits-mlp
@pytest.fixture(scope="session")
def digits_task():
    """digits-mlp whose model is pretrained once per session (helpers.digits_task); run() on it
    builds a copy. Tests read it (run() does not change a task)."""
    return helpers.digits_task()


@pytest.fixture
def shared_digits_pretraining(monkeypatch):
    """In this test, ``get_task("digits-mlp")`` — also inside run(), load_run() and the scripts run
    in-process — returns helpers.digits_task(): the pretrained model is copied, not pretrained again."""
    from flatlora import TASKS

    helpers.digits_task()  # pretrains now if no test did yet; keeps the registry's own builder
    monkeypatch.setitem(TASKS, "digits-mlp", helpers.digits_task)


@pytest.fixture(scope="session")
def digits_flat_lora_run(digits_task, tmp_path_factory):
    """A finished run: Flat-LoRA on digits-mlp, 30 steps, seed 0, written to a folder → (model,
    metrics, folder). Tests that use it read it (copy the model before doing anything to it)."""
    from flatlora import TrainConfig, run

    out = tmp_path_factory.mktemp("digits-runs") / "flat-lora-s0"
    model, metrics = run(TrainConfig(task="digits-mlp", method="flat-lora", steps=30, seed=0), out, progress=False,
                         task=digits_task)
    return model, metrics, out


# ---------------------------------------------------------------------------------- MiniLM on Rotten Tomatoes
@pytest.fixture(scope="session")
def rt_task():
    """rt-minilm, tokenized once per session (its build_model loads MiniLM afresh each call)."""
    from flatlora import get_task

    return get_task("rt-minilm")


@pytest.fixture(scope="session")
def rt_trained(rt_task):
    """``method -> helpers.train_rt_minilm(rt_task, method)``, trained once per session."""
    cache = {}

    def get(method: str) -> dict:
        if method not in cache:
            cache[method] = helpers.train_rt_minilm(rt_task, method)
        return cache[method]

    return get


@pytest.fixture(scope="session")
def rt_flat_lora_run(rt_task):
    """run() of Flat-LoRA on rt-minilm with the task's defaults, helpers.RT_RUN_STEPS steps, seed 0 →
    (model, metrics)."""
    from flatlora import TrainConfig, run

    return run(TrainConfig(task="rt-minilm", method="flat-lora", steps=helpers.RT_RUN_STEPS, seed=0), progress=False,
               task=rt_task)


# ------------------------------------------------------------------------------------------ torchrun
@pytest.fixture(scope="session")
def distributed_checks(tmp_path_factory, digits_flat_lora_run):
    """The suite's one torchrun launch (tests/dist_worker.py on 2 CPU processes) and what it needs:

    * ``probes_one``: every probe in this process (the reference), and in ``probes`` the shard file
      of an interrupted 2-rank line probe: rank 1 had finished its points, one of them marked;
    * ``runs/flat-lora-s0``: a finished run, for the probe script.

    Returns a dict: ``root`` (the worker's folder), ``ranks`` (what each rank recorded),
    ``probes_single`` / ``probes_ranks`` (probe results), ``marked`` (the marked shard row)."""
    import shutil

    from flatlora.io import atomic_write_json, read_json

    root = tmp_path_factory.mktemp("torchrun")
    one, two = root / "probes_one", root / "probes"
    one.mkdir()
    two.mkdir()
    with helpers.one_thread():  # as each rank runs
        single = helpers.run_probes(one)
    saved = read_json(one / "line.json")
    rows = [r for i, r in enumerate(saved["rows"]) if i % 2 == 1]
    rows[0] = {**rows[0], "loss": helpers.SENTINEL}
    atomic_write_json(two / "line.rank1-of-2.json", {"meta": saved["meta"], "rows": rows})
    shutil.copytree(digits_flat_lora_run[2], root / "runs" / "flat-lora-s0")
    (root / "probe-script").mkdir()

    helpers.torchrun(ROOT / "tests" / "dist_worker.py", root)
    return {
        "root": root,
        "ranks": [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)],
        "probes_single": single,
        "probes_ranks": [pickle.loads((two / f"rank{r}.pkl").read_bytes()) for r in range(2)],
        "marked": rows[0],
        "probes_one_dir": one,
        "probes_dir": two,
    }
