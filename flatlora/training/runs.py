"""A whole training run with outputs, checkpoints and resumption; the loop itself is :mod:`.loop`.

:func:`run` trains a registered method on a registered task, in four steps — setup, resume, the
loop, writing — and writes::

    OUT/config.json       the resolved settings
    OUT/adapter/          the LoRA adapter (peft ``save_pretrained``), or OUT/model/ for full-ft
    OUT/metrics.json      test accuracy, weighted F1, validation per epoch, train-loss curve, time, memory
    OUT/labels.json       classification: the class names in id order, {"labels": [name of id 0, …]}
    OUT/predictions.json  test-split predictions (for error analysis): class ids ("predictions") and,
                          for classification, the class names beside them ("predicted_labels")
    OUT/checkpoint.pt     while running: everything needed to resume — trainable weights, optimizer,
                          scheduler, every rank's RNG states (CPU and CUDA) — removed when finished

Every file is written atomically. A finished run is not overwritten without ``overwrite=True``; an
interrupted one resumes from its last checkpoint with the same settings. Every setting is checked
and the model built before a folder is touched. A run that replaces another (``overwrite=True``:
a finished run, or an interrupted one with other settings) is written beside it, to OUT.overwrite/,
and swapped in when it has finished: a failed or interrupted overwrite leaves the old run whole. An
interrupted overwrite resumes from OUT.overwrite/ when started again with the same settings (other
settings start it afresh).

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
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..adapters import LABELS_FILE
from ..memory import peak_memory_mb
from ..io import atomic_dir, atomic_torch_save, atomic_write_json, read_json
from ..methods import StepRunner, get_method
from ..rng import reseed, seeded
from ..tasks import Task, get_task
from .config import ConfigError, RunExistsError, TrainConfig, check_device
from .loop import micro_batches, train_loop

__all__ = ["prepare_model", "run", "load_run", "save_model"]


def prepare_model(task: Task, cfg: TrainConfig) -> nn.Module:
    """The task's model, wrapped with LoRA when the method uses it, initialised from ``cfg.seed``.

    The initialisation (transformers' heads, peft's A) draws from the global RNG: it runs in a seeded
    fork of it (:func:`flatlora.rng.seeded`), so the caller's global RNG state is left as it was."""
    with seeded(cfg.seed):
        return _build_model(task, cfg)


def _build_model(task: Task, cfg: TrainConfig) -> nn.Module:
    """:func:`prepare_model`'s work on the global RNG, which the caller has seeded with ``cfg.seed``:
    it is reseeded before LoRA is added and left where peft's initialisation left it (:func:`run`
    trains on from there)."""
    model = task.build_model()
    if not get_method(cfg.method).uses_lora:
        return model
    from peft import get_peft_model

    reseed(cfg.seed)  # the head and A's init depend on the seed only
    return get_peft_model(model, task.lora_config(cfg.rank, cfg.alpha, cfg.lora_dropout))


def _optimizer(model: nn.Module, cfg: TrainConfig):
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * cfg.steps), cfg.steps)
    return opt, sched


_CHECKPOINT = "checkpoint.pt"


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _config_dict(cfg: TrainConfig, world_size: int) -> dict:
    return {**dataclasses.asdict(cfg), "world_size": world_size}


def _differences(folder: Path, config: dict) -> list[str]:
    """The settings in which the run in ``folder`` (its config.json) differs from ``config``; settings
    added since it was written take their defaults."""
    saved = {**_config_dict(TrainConfig(), 1), **read_json(folder / "config.json")}
    return sorted(k for k in saved.keys() | config.keys() if saved.get(k) != config.get(k))


_STAGED = ".overwrite"  # OUT.overwrite/: a run that replaces OUT, until it has finished


@dataclasses.dataclass(frozen=True)
class _Output:
    """Where a run writes: ``work`` is the run's folder ``out`` itself, or, when the run replaces
    another there, the sibling OUT.overwrite/, which :meth:`finish` swaps in once the run is
    complete. ``resume``: ``work`` holds an interrupted run with these settings."""

    out: Path
    work: Path
    config: dict  # config.json
    resume: bool

    @classmethod
    def plan(cls, out: Path, config: dict, overwrite: bool) -> "_Output":
        """Check ``out`` against ``config`` and choose where to write; nothing is written yet."""
        if out.exists() and not out.is_dir():
            raise ConfigError(f"out {out} is a file, not a folder: name a folder for the run (it is created)", "out")
        finished = (out / "metrics.json").exists()
        if not finished and not (out / _CHECKPOINT).exists():
            return cls(out, out, config, resume=False)
        differ = [] if finished else _differences(out, config)
        if not finished and not differ:
            return cls(out, out, config, resume=True)
        if not overwrite:
            held = "a finished run" if finished else f"an interrupted run with other settings ({differ})"
            raise RunExistsError(f"{out} holds {held}; pass overwrite=True (--overwrite) to replace it once the new "
                                 "run has finished, or choose another output folder")
        staged = out.with_name(out.name + _STAGED)
        return cls(out, staged, config, resume=(staged / _CHECKPOINT).exists() and not _differences(staged, config))

    def open(self) -> None:
        """Make the working folder, afresh unless resuming, and write config.json into it."""
        if self.work != self.out and not self.resume and self.work.exists():
            shutil.rmtree(self.work)  # a staged run with other settings
        self.work.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.work / "config.json", self.config)

    def finish(self) -> None:
        """A finished run written beside ``out`` replaces the one there: old → OUT.old-PID, new → OUT,
        old removed."""
        if self.work == self.out:
            return
        old = self.out.with_name(f"{self.out.name}.old-{os.getpid()}")
        os.replace(self.out, old)
        os.replace(self.work, self.out)
        shutil.rmtree(old)


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

    All settings are checked (device, task, method, values, output folder) and the model is built
    before any file is written; a run that replaces another (``overwrite``) is written beside it and
    swapped in when finished (see the module docstring). The run's steps: :func:`_setup` (model,
    optimizer, step runner, output folder), :meth:`_Run.resume` (from the folder's checkpoint, if
    any), :meth:`_Run.train` (the loop, with evaluation and checkpoints) and :meth:`_Run.write`
    (final evaluation, model, labels, predictions, metrics).

    Training's dropout draws from the global RNG: the run seeds a fork of it with ``cfg.seed``
    (:func:`flatlora.rng.seeded`; on a GPU the CUDA generators too), so the same seed gives the same
    weights, a resumed run continues the same stream, and the caller's global RNG state is left as
    it was.

    Under ``torchrun`` every process calls it alike (see the module docstring): it joins the
    process group first (:func:`flatlora.distributed.ensure_initialized`), every rank builds the
    same model, rank r > 0 reseeds its fork from (seed, r) so that its dropout masks differ from
    rank 0's, and DDP averages the gradients. Rank 0 alone checks the output folder, evaluates and
    writes (config.json records ``world_size``; a run interrupted under another world size does not
    resume); the checkpoint holds every rank's RNG states (CPU and CUDA). Every rank returns its
    (equal) model and rank 0's metrics."""
    distributed.ensure_initialized()
    check_device(device)
    task = task or get_task(cfg.task, **cfg.task_options)
    world = distributed.world_size()
    cfg = cfg.resolved(task, world)
    dev = distributed.device(device)
    output = None if out is None else distributed.main_only(
        lambda: _Output.plan(Path(out), _config_dict(cfg, world), overwrite))
    with seeded(cfg.seed, cuda=dev.type == "cuda"):
        job = _setup(task, cfg, dev, output)
        job.resume()
        job.train(progress)
        return job.model, distributed.main_only(job.write)


def _setup(task: Task, cfg: TrainConfig, dev: torch.device, output: Optional[_Output]) -> _Run:
    """A run's first step: build the model, optimizer, scheduler and step runner on the global RNG
    that :func:`run` seeded, and only then open the output folder (rank 0; see :class:`_Output`)."""
    world, rank = distributed.world_size(), distributed.rank()
    method = get_method(cfg.method)
    model = _build_model(task, cfg).to(dev)
    if rank > 0:  # rank 0 keeps a single process's random stream
        reseed(int(np.random.default_rng([cfg.seed, rank]).integers(2**63)), cuda=dev.type == "cuda")
    optimizer, scheduler = _optimizer(model, cfg)
    options = cfg.method_options()
    runner = method.build(model, optimizer, options, loss_fn=task.loss, max_grad_norm=cfg.max_grad_norm,
                          scheduler=scheduler, ddp=distributed.wrap_ddp(model))
    batch_at = micro_batches(task, cfg.batch_size, cfg.seed, rank=rank, world_size=world)
    if output is not None:
        distributed.main_only(output.open)
    return _Run(task=task, cfg=cfg, uses_lora=method.uses_lora, device=dev, output=output, model=model,
                optimizer=optimizer, scheduler=scheduler, runner=runner, batch_at=batch_at)


@dataclasses.dataclass
class _Run:
    """One run's working state, built by :func:`_setup` and shared by its later steps:
    :meth:`resume`, :meth:`train`, :meth:`write`."""

    task: Task
    cfg: TrainConfig  # resolved
    uses_lora: bool
    device: torch.device
    output: Optional[_Output]  # where the run writes; None: nowhere
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    runner: StepRunner
    batch_at: Callable[[int], Any]  # micro-batch k of this rank
    # what a checkpoint keeps besides weights, optimizer and RNG: steps done, their losses, evaluations, time spent
    state: dict = dataclasses.field(default_factory=lambda: {"step": 0, "train_loss": [], "evals": [], "elapsed": 0.0})
    started: float = 0.0  # perf_counter() at step 0 (earlier than now when resumed)
    wall: float = 0.0  # seconds spent training

    @property
    def steps_per_epoch(self) -> int:
        return self.batch_at.per_epoch // self.cfg.grad_accum

    @property
    def out(self) -> Optional[Path]:
        """The folder the run writes into (see :class:`_Output`), or None."""
        return self.output.work if self.output is not None else None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def resume(self) -> None:
        """Load the checkpoint of an interrupted run, if resuming: trainable weights, optimizer,
        scheduler, this rank's RNG states, and the run's state. A checkpoint written before CUDA
        states were kept (no ``cuda_rng``) restores the CPU's only."""
        if self.output is None or not self.output.resume:
            return
        ckpt = torch.load(self.out / _CHECKPOINT, map_location="cpu", weights_only=False)
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for n, v in ckpt["trainable"].items():
                params[n].copy_(v)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        rank, rng = distributed.rank(), ckpt["rng"]
        torch.set_rng_state(rng[rank] if isinstance(rng, list) else rng)  # a tensor: an older checkpoint
        if self.cuda and ckpt.get("cuda_rng"):
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"][rank])
        self.state = ckpt["state"]

    def train(self, progress: bool) -> None:
        """The optimizer steps not yet done, through :func:`train_loop` with :meth:`_after_step`."""
        self.started = time.perf_counter() - self.state["elapsed"]
        train_loop(self.runner, self.batch_at, self.cfg.steps, grad_accum=self.cfg.grad_accum,
                   start_step=self.state["step"], device=self.device, progress=progress and distributed.is_main(),
                   on_step=self._after_step)
        self.wall = time.perf_counter() - self.started

    def _after_step(self, t: int, loss: float) -> None:
        """Record step ``t``; before the last step, validate at each epoch's end (rank 0) and
        checkpoint every ``checkpoint_every`` steps."""
        done = t + 1
        self.state["step"] = done
        self.state["train_loss"].append(loss)
        if done == self.cfg.steps:
            return
        if distributed.is_main() and self.steps_per_epoch and done % self.steps_per_epoch == 0:
            self._validate(done)
        if done % self.cfg.checkpoint_every == 0:
            self.state["elapsed"] = time.perf_counter() - self.started
            self._checkpoint()

    def _validate(self, step: int) -> dict:
        """Validation metrics after ``step`` steps, also appended to the run's evaluations."""
        val = self.task.evaluate(self.model, "validation", self.cfg.eval_batch_size)
        val.pop("predictions")
        self.state["evals"].append({"step": step, "epoch": step / max(self.steps_per_epoch, 1), **val})
        return val

    def _checkpoint(self) -> None:
        """Every rank's RNG states (CPU, and CUDA on a GPU) gathered; rank 0 writes OUT/checkpoint.pt."""
        if self.out is None:
            return
        rng = distributed.all_gather_objects((torch.get_rng_state(),
                                              torch.cuda.get_rng_state_all() if self.cuda else []))
        if distributed.is_main():
            atomic_torch_save({"trainable": _trainable_state(self.model), "optimizer": self.optimizer.state_dict(),
                               "scheduler": self.scheduler.state_dict(), "rng": [cpu for cpu, _ in rng],
                               "cuda_rng": [cuda for _, cuda in rng], "state": self.state}, self.out / _CHECKPOINT)

    def write(self) -> dict:
        """The last step (rank 0): validation and test evaluations and the metrics; with an output
        folder also the model, labels.json, predictions.json and metrics.json — written last, it marks
        the run finished — then the checkpoint is removed and a run written beside ``out`` swapped in."""
        cfg, task, model = self.cfg, self.task, self.model
        val = self._validate(cfg.steps)
        test = task.evaluate(model, "test", cfg.eval_batch_size)
        predictions = test.pop("predictions")
        metrics = {
            "task": task.name, "method": cfg.method, "seed": cfg.seed, "steps": cfg.steps,
            "test": test, "validation": val,
            "accuracy": test["accuracy"], "f1_weighted": test.get("f1_weighted"),
            "majority_baseline": task.majority_baseline() if task.kind == "classification" else None,
            "evals": self.state["evals"], "train_loss": self.state["train_loss"],
            "wall_time_s": self.wall, "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            **peak_memory_mb(self.device),
        }
        if self.out is not None:
            save_model(model, self.out, uses_lora=self.uses_lora)
            record = {"split": "test", "predictions": predictions}
            if task.kind == "classification" and task.label_names:
                atomic_write_json(self.out / LABELS_FILE, {"labels": task.label_names})
                record["predicted_labels"] = [task.label_names[i] for i in predictions]
            atomic_write_json(self.out / "predictions.json", record)
            atomic_write_json(self.out / "metrics.json", metrics)  # written last: marks the run finished
            (self.out / _CHECKPOINT).unlink(missing_ok=True)
            self.output.finish()
        return metrics


def save_model(model: nn.Module, out: Path, *, uses_lora: bool) -> None:
    """LoRA: ``OUT/adapter`` via peft's ``save_pretrained``; full-ft: ``OUT/model`` (HF folder or state dict)."""
    with atomic_dir(out / ("adapter" if uses_lora else "model")) as tmp:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp)
        else:
            torch.save(model.state_dict(), tmp / "state_dict.pt")


def load_run(out: str | os.PathLike, *, task: Optional[Task] = None) -> tuple[nn.Module, Task, dict]:
    """Load a finished run: (model in eval mode, task, config dict). LoRA runs load with
    ``PeftModel.from_pretrained``; the base model is rebuilt from the task (offline).

    Building the model initialises weights (then overwritten by the saved ones) from the global
    RNG: that runs in a fork seeded with the run's seed, so the caller's global RNG is untouched."""
    out = Path(out)
    if not (out / "metrics.json").exists():
        raise FileNotFoundError(f"{out} holds no finished run (no metrics.json); train it with analysis_scripts/train.py")
    cfg = read_json(out / "config.json")
    uses_lora = get_method(cfg["method"]).uses_lora
    weights = out / ("adapter" if uses_lora else "model")
    if not weights.is_dir():
        raise FileNotFoundError(f"{out} holds a finished run's record but not its weights ({weights.name}/ is missing; "
                                "a study commits full fine-tuning runs without them): train the run again to load it")
    task = task or get_task(cfg["task"], **cfg.get("task_options", {}))
    with seeded(cfg["seed"]):
        model = _load_model(task, out, uses_lora=uses_lora)
    return model.eval(), task, cfg


def _load_model(task: Task, out: Path, *, uses_lora: bool) -> nn.Module:
    """The model :func:`save_model` saved under ``out``, on the task's base model."""
    base = task.build_model()
    if uses_lora:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, out / "adapter")
    if (out / "model" / "state_dict.pt").exists():
        base.load_state_dict(torch.load(out / "model" / "state_dict.pt"))
        return base
    return type(base).from_pretrained(out / "model", attn_implementation="eager")
