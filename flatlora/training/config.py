"""Settings of one training run, :class:`TrainConfig`, and all their validation in one place."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from ..methods import get_method
from ..sam import SAM_GRADIENTS
from ..tasks import Task

__all__ = ["TrainConfig", "RunExistsError"]


class RunExistsError(FileExistsError):
    """The output folder holds a finished run (or a run with other settings)."""


@dataclass
class TrainConfig:
    """Settings of one training run. ``None`` means the task's default (see ``Task.defaults``)."""

    task: str = "rt-minilm"
    method: str = "lora"
    rank: Optional[int] = None
    alpha: Optional[float] = None
    sigma: Optional[float] = None
    lr: Optional[float] = None
    steps: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: Optional[int] = None
    grad_accum: int = 1
    seed: int = 0
    schedule: str = "cosine"
    mode: str = "exact"
    rho: Optional[float] = None
    lora_dropout: float = 0.05
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: Optional[float] = 1.0
    eval_batch_size: int = 128
    checkpoint_every: int = 100
    shared_noise: bool = False  # several processes: rank 0's Flat-LoRA noise on every rank, not each its own
    sam_gradient: str = "local"  # several processes: SAM's ε from each rank's own gradient, or "global" (their mean)
    task_options: dict = dataclasses.field(default_factory=dict)

    def resolved(self, task: Task, world_size: int = 1) -> "TrainConfig":
        """Fill the unset fields from the task's defaults, and check everything before any work.

        ``world_size`` processes (data parallelism) take W · batch_size · grad_accum examples a step."""
        d = task.defaults
        # full fine-tuning moves every weight: it needs a far smaller step than LoRA (task default "full_lr")
        default_lr = d.get("lr", 5e-4) if get_method(self.method).uses_lora else d.get("full_lr", d.get("lr", 5e-4))
        cfg = dataclasses.replace(
            self,
            rank=self.rank if self.rank is not None else d.get("rank", 8),
            alpha=self.alpha if self.alpha is not None else d.get("alpha", 16),
            sigma=self.sigma if self.sigma is not None else d.get("sigma", 0.05),
            lr=self.lr if self.lr is not None else default_lr,
            batch_size=self.batch_size if self.batch_size is not None else d.get("batch_size", 16),
        )
        for name, value in (("rank", cfg.rank), ("batch_size", cfg.batch_size), ("grad_accum", cfg.grad_accum)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if cfg.sigma < 0 or not math.isfinite(cfg.sigma):
            raise ValueError(f"sigma must be >= 0, got {cfg.sigma}")
        if cfg.lr <= 0:
            raise ValueError(f"lr must be > 0, got {cfg.lr}")
        if cfg.rho is not None and cfg.rho < 0:
            raise ValueError(f"rho must be >= 0, got {cfg.rho}")
        if cfg.sam_gradient not in SAM_GRADIENTS:
            raise ValueError(f"sam_gradient must be one of {SAM_GRADIENTS}, got {cfg.sam_gradient!r}")
        if cfg.steps is not None and cfg.epochs is not None:
            raise ValueError("give either steps or epochs, not both")
        step_batch = world_size * cfg.batch_size * cfg.grad_accum
        per_epoch = len(task.splits["train"]) // step_batch
        if per_epoch < 1:
            raise ValueError(f"the train split ({len(task.splits['train'])} examples) is smaller than one step's "
                             f"batch ({world_size} process(es) × batch_size {cfg.batch_size} × grad_accum "
                             f"{cfg.grad_accum})")
        if cfg.steps is None:
            cfg.steps = int(round(cfg.epochs * per_epoch)) if cfg.epochs is not None else int(d.get("steps", 250))
        if cfg.steps < 1:
            raise ValueError(f"steps must be >= 1, got {cfg.steps}")
        return cfg


