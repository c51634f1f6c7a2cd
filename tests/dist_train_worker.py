"""Run by tests/test_distributed_training.py under ``torchrun --nproc_per_node 2``: several short
``run()`` calls on digits-mlp in one launch, and what each rank saw, saved to OUT/rank{r}.pt.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_train_worker.py OUT
"""
import copy
import shutil
import sys
from pathlib import Path

import torch

import flatlora.training.runs
from flatlora import FlatLoRA, TrainConfig, distributed, get_task, run
from flatlora.methods import StepRunner
from helpers import BATCH, RUNS, STEPS, config, digits_task

def trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def record_calls(module, name: str, log: list) -> None:
    """Log every call of ``module.name`` (by name) and pass it on."""
    original = getattr(module, name)

    def logged(*args, **kwargs):
        log.append(name)
        return original(*args, **kwargs)

    setattr(module, name, logged)


def train_sam_trainer(gradient: str, out: Path) -> dict:
    """SAMTrainer (ASAM on the merged weights) on the 8 examples of helpers.examples: 2 per rank × 2
    accumulated micro-batches × 2 ranks, so every step sees all 8."""
    from transformers import TrainingArguments

    from flatlora import SAMTrainer
    from helpers import dict_lora_net, examples

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


def main(out: Path) -> None:
    task = digits_task()
    result = {"rank": distributed.rank(), "world_size": distributed.world_size(), "states": {}, "seeds": {},
              "metrics": {}, "writes": []}
    for name in ("atomic_write_json", "atomic_torch_save", "save_model"):  # what this rank writes in run()
        record_calls(flatlora.training.runs, name, result["writes"])
    current = {}
    original_noise = FlatLoRA.noise

    def noise(self, step):  # the seeds of this rank's ε, per optimizer step
        sources = original_noise(self, step)
        result["seeds"].setdefault(current["run"], {})[step] = [s.seed for s in sources.values()]
        return sources

    FlatLoRA.noise = noise
    for name, settings in RUNS.items():
        current["run"] = name
        model, metrics = run(config(**settings), out / name if name == "lora" else None, progress=False, task=task)
        result["states"][name], result["metrics"][name] = trainable(model), metrics
    for gradient in ("global", "local"):
        result["states"][f"trainer-{gradient}"] = train_sam_trainer(gradient, out / "trainer")

    # an interrupted run (dropout on: the per-rank RNG state matters) resumes bitwise
    cfg = config(method="lora", lora_dropout=0.1, checkpoint_every=5, seed=1)
    reference, _ = run(cfg, progress=False, task=task)
    step, interrupt = StepRunner.step, {"at": 12}
    result["resumed_steps"] = []

    def interruptible(self, micro_batches, t):
        if t == interrupt["at"]:  # on every rank, before the step's collectives
            raise KeyboardInterrupt("simulated interruption")
        result["resumed_steps"].append(t)
        return step(self, micro_batches, t)

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
    torch.save(result, out / f"rank{distributed.rank()}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
