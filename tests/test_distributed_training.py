"""Training under torchrun: 2 CPU processes (gloo) against one process with the whole batch.

The suite's one torchrun launch (conftest's ``distributed_checks``, tests/dist_worker.py) runs
several short digits-mlp runs with batch 16 per rank; here the same runs in one process with batch
32 must give the same weights where the two are the same computation (plain LoRA, Flat-LoRA with
shared noise, SAM with the global ε-gradient — also in the SAMTrainer), and differ where they are
not (independent noise, local ε). The same launch runs the train script as is.
"""
import json

import pytest
import torch

from helpers import BATCH, RUNS, STEPS, config, dict_lora_net, examples
from flatlora import TrainConfig, get_method, load_run, noise_seed, run
from flatlora.training import RunExistsError


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6, msg=n)


def differs(a: dict, b: dict) -> bool:
    return any(not torch.allclose(a[n], b[n], rtol=1e-3, atol=1e-5) for n in a)


@pytest.fixture(scope="module")
def ddp(distributed_checks):
    """What each of the 2 ranks saw, and the training runs' output folder."""
    return distributed_checks["ranks"], distributed_checks["root"] / "training"


@pytest.fixture(scope="module")
def single(digits_task):
    """``name -> trainable weights`` of the worker's run ``name`` in one process with batch 2 × 16."""
    task, cache = digits_task, {}

    def get(name: str) -> dict:
        if name not in cache:
            model, _ = run(config(**{**RUNS[name], "batch_size": 2 * BATCH}), progress=False, task=task)
            cache[name] = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        return cache[name]

    return get


def test_ranks_agree_and_lora_equals_one_process_with_the_whole_batch(ddp, single):
    (r0, r1), _ = ddp
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    for name in RUNS:  # DDP keeps the ranks' weights equal; both return rank 0's metrics
        assert_same(r0["states"][name], r1["states"][name])
        assert r0["metrics"][name] == r1["metrics"][name]
    assert_same(r0["states"]["lora"], single("lora"))


def test_flat_lora_noise_per_rank_or_shared(ddp, single):
    (r0, r1), _ = ddp
    s0, s1 = (r["seeds"]["flat-shared"] for r in (r0, r1))
    i0, i1 = (r["seeds"]["flat-independent"] for r in (r0, r1))
    assert sorted(s0) == list(range(1, STEPS))  # every step but the first (σ_0 = 0): the global step index
    for t in s0:
        assert s0[t] == s1[t] == i0[t] == [noise_seed(0, t, layer, 0) for layer in range(3)]  # rank 0's noise
        assert i1[t] == [noise_seed(0, t, layer, 1) for layer in range(3)]  # rank 1's own
    assert_same(r0["states"]["flat-shared"], single("flat-shared"))
    assert differs(r0["states"]["flat-independent"], r0["states"]["flat-shared"])


def test_sam_global_gradient_equals_one_process_and_local_differs(ddp, single):
    (r0, _), _ = ddp
    assert_same(r0["states"]["sam-global"], single("sam-global"))
    assert differs(r0["states"]["sam-local"], r0["states"]["sam-global"])


def test_sam_trainer_global_gradient_equals_the_plain_loop_on_the_whole_batch_and_local_differs(ddp):
    """The Trainer's steps see all 8 examples (2 per rank × 2 micro-batches × 2 ranks), so with the
    global ε-gradient they equal 3 runner steps on the whole set (as in test_sam_train)."""
    (r0, r1), _ = ddp
    model = dict_lora_net()
    batch = {k: torch.stack([e[k] for e in examples()]) for k in ("x", "labels")}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    runner = get_method("asam-full").build(model, opt, {"rho": 0.05}, loss_fn=lambda m, b: m(**b)["loss"])
    for t in range(3):
        runner.step([batch], t)
    plain = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert_same(r0["states"]["trainer-global"], r1["states"]["trainer-global"])
    assert_same(r0["states"]["trainer-global"], plain)
    assert differs(r0["states"]["trainer-local"], plain)


def test_only_rank_0_writes_a_normal_finished_run(ddp):
    (r0, r1), out = ddp
    assert r1["writes"] == [] and {"atomic_write_json", "atomic_torch_save", "save_model"} <= set(r0["writes"])
    run_dir = out / "lora"
    assert sorted(p.name for p in run_dir.iterdir()) == ["adapter", "config.json", "labels.json", "metrics.json",
                                                         "predictions.json"]
    config_json = json.loads((run_dir / "config.json").read_text())
    assert config_json["world_size"] == 2 and config_json["batch_size"] == BATCH and config_json["steps"] == STEPS
    metrics = json.loads((run_dir / "metrics.json").read_text())
    model, task, _ = load_run(run_dir)
    per_epoch = len(task.splits["train"]) // (2 * BATCH)  # global steps: an epoch ends within the run
    assert len(metrics["train_loss"]) == STEPS and [e["step"] for e in metrics["evals"]] == [per_epoch, STEPS]
    assert task.evaluate(model, "test")["accuracy"] == pytest.approx(metrics["accuracy"])


def test_an_interrupted_run_resumes_bitwise_and_not_under_another_world_size(ddp, digits_task):
    (r0, r1), out = ddp
    assert r0["resumed_steps"] == r1["resumed_steps"] == list(range(10, STEPS))  # from the step-10 checkpoint
    assert r0["resume_bitwise"] and r1["resume_bitwise"]
    assert not (out / "resumed" / "checkpoint.pt").exists()
    cfg = config(method="lora", lora_dropout=0.1, checkpoint_every=5, seed=1)
    with pytest.raises(RunExistsError, match="world_size"):
        run(cfg, out / "interrupted", progress=False, task=digits_task)


def test_a_bad_sam_gradient_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="sam_gradient must be one of"):
        run(TrainConfig(task="digits-mlp", method="sam-lora", sam_gradient="mean"), tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_train_script_runs_unchanged_under_torchrun(distributed_checks, digits_task):
    """SAM on the merged weights, whose ε-gradient is no parameter's (DDP never syncs it): with
    --sam-gradient global the 2-process run equals one process with the whole batch. The worker ran
    analysis_scripts/train.py as ``__main__`` on each rank with tests/dist_worker.py's SCRIPT_RUN:
    --method sam-full --sam-gradient global --lora-dropout 0 --batch-size BATCH --steps STEPS."""
    ranks, out = distributed_checks["ranks"], distributed_checks["root"] / "script-run"
    stdout = "".join(r["train_script_stdout"] for r in ranks)
    assert len(stdout.strip().splitlines()) == 1  # the summary, printed by rank 0 only
    assert json.loads(stdout)["method"] == "sam-full"
    model, _, saved = load_run(out, task=digits_task)
    assert saved["world_size"] == 2 and saved["sam_gradient"] == "global"
    single, _ = run(config(method="sam-full", sam_gradient="global", batch_size=2 * BATCH), progress=False,
                    task=digits_task)
    trained = {n: p for n, p in single.named_parameters() if p.requires_grad}
    assert_same({n: p for n, p in model.named_parameters() if "lora_" in n}, trained)
