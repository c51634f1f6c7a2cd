"""The plain-PyTorch training loop, and a whole run with outputs, checkpoints and resumption.

:func:`train_loop` works for any model and any :class:`~flatlora.methods.StepRunner`.
:func:`run` trains a registered method on a registered task and writes::

    OUT/config.json       the resolved settings
    OUT/adapter/          the LoRA adapter (peft ``save_pretrained``), or OUT/model/ for full-ft
    OUT/metrics.json      test accuracy, weighted F1, validation per epoch, train-loss curve, time, memory
    OUT/predictions.json  test-split predictions (for error analysis)
    OUT/checkpoint.pt     while running: everything needed to resume (removed when finished)

Every file is written atomically. A finished run is not overwritten without ``overwrite=True``; an
interrupted one resumes from its last checkpoint with the same settings.

Launched by ``torchrun --nproc_per_node W`` (or ``accelerate launch``), :func:`run` trains
data-parallel with ``DistributedDataParallel``, each process on its own device (``cuda:LOCAL_RANK``,
or the CPU with gloo). ``batch_size`` is per process: the global batch of a step is
W · batch_size · grad_accum, and W processes see, step by step, the data of one process with batch
W · batch_size (:func:`micro_batches`). ``steps`` counts global optimizer steps, the same on every
rank; Flat-LoRA's σ schedule runs over them. Flat-LoRA's noise is independent per rank unless
``shared_noise``; the SAM family's ε comes from each rank's own gradient unless
``sam_gradient="global"`` (:mod:`flatlora.sam`). Only rank 0 evaluates and writes files.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..memory import peak_memory_mb
from ..io import atomic_dir, atomic_torch_save, atomic_write_json, read_json
from ..methods import get_method
from ..tasks import Task, get_task
from .config import RunExistsError, TrainConfig
from .loop import micro_batches, train_loop

__all__ = ["prepare_model", "run", "load_run", "save_model"]


def prepare_model(task: Task, cfg: TrainConfig) -> nn.Module:
    """The task's model, wrapped with LoRA when the method uses it (seeded by ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    if not get_method(cfg.method).uses_lora:
        return model
    from peft import get_peft_model

    torch.manual_seed(cfg.seed)  # the head and A's init depend on the seed only
    return get_peft_model(model, task.lora_config(cfg.rank, cfg.alpha, cfg.lora_dropout))


def _optimizer(model: nn.Module, cfg: TrainConfig):
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * cfg.steps), cfg.steps)
    return opt, sched


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _config_dict(cfg: TrainConfig, world_size: int) -> dict:
    return {**dataclasses.asdict(cfg), "world_size": world_size}


def _prepare_output(out: Path, config: dict, overwrite: bool) -> bool:
    """Check the output folder against ``config`` and write config.json; True if it holds an
    interrupted run with the same settings, to resume."""
    ckpt_path = out / "checkpoint.pt"
    resume = False
    if (out / "metrics.json").exists():
        if not overwrite:
            raise RunExistsError(f"{out} holds a finished run; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out)
    elif ckpt_path.exists():
        # settings added since the run was written take their defaults
        saved = {**_config_dict(TrainConfig(), 1), **read_json(out / "config.json")}
        if saved != config:
            if not overwrite:
                diff = sorted(k for k in saved if saved.get(k) != config.get(k))
                raise RunExistsError(f"{out} holds an interrupted run with other settings ({diff}); "
                                     "pass overwrite=True to start afresh")
            shutil.rmtree(out)
        else:
            resume = True
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", config)
    return resume


def run(
    cfg: TrainConfig,
    out: Optional[str | os.PathLike] = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    device: Optional[str] = None,
    task: Optional[Task] = None,
) -> tuple[nn.Module, dict]:
    """Train ``cfg.method`` on ``cfg.task``; write outputs under ``out`` (if given); return (model, metrics).

    All settings are checked (task, method, values, output folder) before any training starts.

    Under ``torchrun`` every process calls it alike (see the module docstring): every rank builds
    the same model, rank r > 0 reseeds the global RNG from (seed, r) so that its dropout masks
    differ from rank 0's, and DDP averages the gradients. Rank 0 alone checks the output folder,
    evaluates and writes (config.json records ``world_size``; a run interrupted under another world
    size does not resume); the checkpoint holds every rank's RNG state. Every rank returns its (equal)
    model and rank 0's metrics."""
    task = task or get_task(cfg.task, **cfg.task_options)
    world, rank = distributed.world_size(), distributed.rank()
    cfg = cfg.resolved(task, world)
    method = get_method(cfg.method)
    dev = distributed.device(device)
    out = Path(out) if out is not None else None
    ckpt_path = out / "checkpoint.pt" if out else None
    resume = None
    if out is not None and distributed.main_only(lambda: _prepare_output(out, _config_dict(cfg, world), overwrite)):
        resume = torch.load(ckpt_path, map_location="cpu", weights_only=False)

    model = prepare_model(task, cfg).to(dev)
    if rank > 0:  # rank 0 keeps a single process's random stream
        torch.manual_seed(int(np.random.default_rng([cfg.seed, rank]).integers(2**63)))
    optimizer, scheduler = _optimizer(model, cfg)
    options = {"sigma": cfg.sigma, "schedule": cfg.schedule, "total_steps": cfg.steps, "seed": cfg.seed,
               "mode": cfg.mode, "shared_noise": cfg.shared_noise, "rho": cfg.rho, "sam_gradient": cfg.sam_gradient}
    runner = method.build(model, optimizer, options, loss_fn=task.loss, max_grad_norm=cfg.max_grad_norm,
                          scheduler=scheduler, ddp=distributed.wrap_ddp(model))
    batch_at = micro_batches(task, cfg.batch_size, cfg.seed, rank=rank, world_size=world)
    steps_per_epoch = batch_at.per_epoch // cfg.grad_accum

    state = {"step": 0, "train_loss": [], "evals": [], "elapsed": 0.0}
    if resume is not None:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n, v in resume["trainable"].items():
                params[n].copy_(v)
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        rng = resume["rng"]
        torch.set_rng_state(rng[rank] if isinstance(rng, list) else rng)  # a tensor: an older checkpoint
        state = resume["state"]

    def checkpoint() -> None:
        if ckpt_path is None:
            return
        rng = distributed.all_gather_objects(torch.get_rng_state())
        if distributed.is_main():
            atomic_torch_save({"trainable": _trainable_state(model), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "rng": rng, "state": state}, ckpt_path)

    t0 = time.perf_counter() - state["elapsed"]

    def on_step(t: int, loss: float) -> None:
        state["step"] = t + 1
        state["train_loss"].append(loss)
        if distributed.is_main() and steps_per_epoch and (t + 1) % steps_per_epoch == 0 and t + 1 < cfg.steps:
            ev = task.evaluate(model, "validation", cfg.eval_batch_size)
            ev.pop("predictions")
            state["evals"].append({"step": t + 1, "epoch": (t + 1) / steps_per_epoch, **ev})
        if (t + 1) % cfg.checkpoint_every == 0 and t + 1 < cfg.steps:
            state["elapsed"] = time.perf_counter() - t0
            checkpoint()

    train_loop(runner, batch_at, cfg.steps, grad_accum=cfg.grad_accum, start_step=state["step"], device=dev,
               progress=progress and distributed.is_main(), on_step=on_step)
    wall = time.perf_counter() - t0

    def finish() -> dict:
        val = task.evaluate(model, "validation", cfg.eval_batch_size)
        val.pop("predictions")
        state["evals"].append({"step": cfg.steps, "epoch": cfg.steps / max(steps_per_epoch, 1), **val})
        test = task.evaluate(model, "test", cfg.eval_batch_size)
        predictions = test.pop("predictions")
        metrics = {
            "task": task.name, "method": cfg.method, "seed": cfg.seed, "steps": cfg.steps,
            "test": test, "validation": val,
            "accuracy": test["accuracy"], "f1_weighted": test.get("f1_weighted"),
            "majority_baseline": task.majority_baseline() if task.kind == "classification" else None,
            "evals": state["evals"], "train_loss": state["train_loss"],
            "wall_time_s": wall, "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            **peak_memory_mb(dev),
        }
        if out is not None:
            save_model(model, out, uses_lora=method.uses_lora)
            atomic_write_json(out / "predictions.json", {"split": "test", "predictions": predictions})
            atomic_write_json(out / "metrics.json", metrics)  # written last: marks the run finished
            ckpt_path.unlink(missing_ok=True)
        return metrics

    return model, distributed.main_only(finish)


def save_model(model: nn.Module, out: Path, *, uses_lora: bool) -> None:
    """LoRA: ``OUT/adapter`` via peft's ``save_pretrained``; full-ft: ``OUT/model`` (HF folder or state dict)."""
    with atomic_dir(out / ("adapter" if uses_lora else "model")) as tmp:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp)
        else:
            torch.save(model.state_dict(), tmp / "state_dict.pt")


def load_run(out: str | os.PathLike, *, task: Optional[Task] = None) -> tuple[nn.Module, Task, dict]:
    """Load a finished run: (model in eval mode, task, config dict). LoRA runs load with
    ``PeftModel.from_pretrained``; the base model is rebuilt from the task (offline)."""
    out = Path(out)
    if not (out / "metrics.json").exists():
        raise FileNotFoundError(f"{out} holds no finished run (no metrics.json); train it with analysis_scripts/train.py")
    cfg = read_json(out / "config.json")
    task = task or get_task(cfg["task"], **cfg.get("task_options", {}))
    torch.manual_seed(cfg["seed"])
    base = task.build_model()
    if get_method(cfg["method"]).uses_lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, out / "adapter")
    elif (out / "model" / "state_dict.pt").exists():
        base.load_state_dict(torch.load(out / "model" / "state_dict.pt"))
        model = base
    else:
        model = type(base).from_pretrained(out / "model", attn_implementation="eager")
    return model.eval(), task, cfg
