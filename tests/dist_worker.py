"""The one torchrun launch of the test suite: every distributed check, run by each of 2 CPU processes
(gloo) in one process group, with what each rank saw saved to ROOT/rank{r}.pt.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py ROOT

ROOT is prepared by conftest's ``distributed_checks`` fixture (ROOT/probes holds the shard file of an
interrupted line probe; ROOT/runs/flat-lora-s0 a finished digits run for the probe script). In turn:

1. training (tests/test_distributed_training.py): several short ``run()`` calls on digits-mlp with
   batch 16 per rank, the SAMTrainer with the local and the global ε-gradient, and a run interrupted
   at step 12 and resumed;
2. probes (tests/test_distributed_probes.py): every probe on a digits LoRA model (helpers.run_probes),
   resuming the shard file;
3. the scripts as they are, each run as ``__main__`` (helpers.run_script): train.py (SAM on the merged
   weights, global ε-gradient) and probe.py on ROOT/runs/flat-lora-s0.
"""
import pickle
import shutil
import sys
from pathlib import Path

import torch

import flatlora.training.runs
from flatlora import FlatLoRA, distributed, run
from flatlora.methods import StepRunner
from helpers import (BATCH, RUNS, STEPS, config, dict_lora_net, digits_task, examples, run_probes, run_script,
                     use_shared_digits_pretraining)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_RUN = ["--task", "digits-mlp", "--method", "sam-full", "--sam-gradient", "global", "--lora-dropout", "0",
              "--batch-size", str(BATCH), "--steps", str(STEPS), "--no-progress"]
PROBE_SCRIPT = ["--spaces", "lora", "merged", "--examples", "96", "--directions", "2", "--alphas", "5",
                "--noise-samples", "8"]


def trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def record_calls(module, name: str, log: list):
    """Log every call of ``module.name`` (by name) and pass it on; returns the original."""
    original = getattr(module, name)

    def logged(*args, **kwargs):
        log.append(name)
        return original(*args, **kwargs)

    setattr(module, name, logged)
    return original


def train_sam_trainer(gradient: str, out: Path) -> dict:
    """SAMTrainer (ASAM on the merged weights) on the 8 examples of helpers.examples: 2 per rank × 2
    accumulated micro-batches × 2 ranks, so every step sees all 8."""
    from transformers import TrainingArguments

    from flatlora import SAMTrainer

    model = dict_lora_net()
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
        weight_decay=0.0, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        use_cpu=True, remove_unused_columns=False, dataloader_pin_memory=False, seed=0,
    )
    SAMTrainer(model=model, args=args, train_dataset=examples(), sam_method="asam-full", sam_rho=0.05,
               sam_gradient=gradient).train()
    return trainable(model)


def training_checks(out: Path, result: dict) -> None:
    task = digits_task()
    originals = {name: record_calls(flatlora.training.runs, name, result["writes"])  # what this rank writes in run()
                 for name in ("atomic_write_json", "atomic_torch_save", "save_model")}
    current = {}
    original_noise, original_step = FlatLoRA.noise, StepRunner.step

    def noise(self, step):  # the seeds of this rank's ε, per optimizer step
        sources = original_noise(self, step)
        result["seeds"].setdefault(current["run"], {})[step] = [s.seed for s in sources.values()]
        return sources

    FlatLoRA.noise = noise
    try:
        for name, settings in RUNS.items():
            current["run"] = name
            model, metrics = run(config(**settings), out / name if name == "lora" else None, progress=False,
                                 task=task)
            result["states"][name], result["metrics"][name] = trainable(model), metrics
        for gradient in ("global", "local"):
            result["states"][f"trainer-{gradient}"] = train_sam_trainer(gradient, out / "trainer")

        # an interrupted run (dropout on: the per-rank RNG state matters) resumes bitwise
        cfg = config(method="lora", lora_dropout=0.1, checkpoint_every=5, seed=1)
        reference, _ = run(cfg, progress=False, task=task)
        interrupt = {"at": 12}
        result["resumed_steps"] = []

        def interruptible(self, micro_batches, t):
            if t == interrupt["at"]:  # on every rank, before the step's collectives
                raise KeyboardInterrupt("simulated interruption")
            result["resumed_steps"].append(t)
            return original_step(self, micro_batches, t)

        StepRunner.step = interruptible
        try:
            run(cfg, out / "resumed", progress=False, task=task)
        except KeyboardInterrupt:
            pass
        if distributed.is_main():  # a copy left interrupted, for the test to try in one process
            shutil.copytree(out / "resumed", out / "interrupted")
        interrupt["at"], result["resumed_steps"] = None, []
        resumed, _ = run(cfg, out / "resumed", progress=False, task=task)  # its first collective waits for the copy
        ref = trainable(reference)
        result["resume_bitwise"] = all(torch.equal(p, ref[n]) for n, p in trainable(resumed).items())
    finally:
        FlatLoRA.noise, StepRunner.step = original_noise, original_step
        for name, original in originals.items():
            setattr(flatlora.training.runs, name, original)


def script_checks(out: Path, result: dict) -> None:
    """train.py and probe.py as they are (each joins the group that is there already)."""
    r = run_script(ROOT / "analysis_scripts" / "train.py", *SCRIPT_RUN, "--out", out / "script-run")
    assert r.returncode == 0, r.stderr[-3000:]
    result["train_script_stdout"] = r.stdout
    r = run_script(ROOT / "analysis_scripts" / "probe.py", out / "runs" / "flat-lora-s0", *PROBE_SCRIPT,
                   "--out", out / "probe-script" / "two.csv")
    assert r.returncode == 0, r.stderr[-3000:]


def main(out: Path) -> None:
    distributed.ensure_initialized()  # join the process group, as the scripts do
    use_shared_digits_pretraining()  # one pretraining per rank, also inside the scripts
    result = {"rank": distributed.rank(), "world_size": distributed.world_size(), "states": {}, "seeds": {},
              "metrics": {}, "writes": []}
    training_checks(out / "training", result)
    with open(out / "probes" / f"rank{distributed.rank()}.pkl", "wb") as f:
        pickle.dump(run_probes(out / "probes"), f)
    script_checks(out, result)
    torch.save(result, out / f"rank{distributed.rank()}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
