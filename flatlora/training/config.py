"""Settings of one training run, :class:`TrainConfig`, and all their validation in one place."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from ..flat_lora import FlatLoRAOptions, check_schedule, check_sigma
from ..methods import get_method
from ..sam import SAMOptions, check_adaptive_scope, check_rho, check_sam_gradient
from ..tasks import Task

__all__ = ["TrainConfig", "RunExistsError"]


class RunExistsError(FileExistsError):
    """The output folder holds a finished run (or a run with other settings)."""


@dataclass
class TrainConfig:
    """Settings of one training run. ``None`` means the task's default (see ``Task.defaults``).

    The method's own settings (σ, schedule, ρ …) take their defaults from its options dataclass
    (:class:`~flatlora.flat_lora.FlatLoRAOptions`, :class:`~flatlora.sam.SAMOptions`);
    :meth:`method_options` hands the method those it reads."""

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
    schedule: str = FlatLoRAOptions.schedule
    mode: str = FlatLoRAOptions.mode
    rho: Optional[float] = SAMOptions.rho
    lora_dropout: float = 0.05
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: Optional[float] = 1.0
    eval_batch_size: int = 128
    checkpoint_every: int = 100
    shared_noise: bool = FlatLoRAOptions.shared_noise  # several processes: rank 0's Flat-LoRA noise on every rank
    sam_gradient: str = SAMOptions.gradient  # several processes: SAM's ε from each rank's own gradient, or "global"
    adaptive_scope: str = SAMOptions.adaptive_scope  # ASAM's T = |θ| + η on every tensor, or on weights only
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
            sigma=self.sigma if self.sigma is not None else d.get("sigma", FlatLoRAOptions.sigma),
            lr=self.lr if self.lr is not None else default_lr,
            batch_size=self.batch_size if self.batch_size is not None else d.get("batch_size", 16),
        )
        for name, value in (("rank", cfg.rank), ("batch_size", cfg.batch_size), ("grad_accum", cfg.grad_accum)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if cfg.lr <= 0:
            raise ValueError(f"lr must be > 0, got {cfg.lr}")
        # every method family's settings, whether or not this method reads them
        check_sigma(cfg.sigma)
        check_schedule(cfg.schedule)
        if cfg.rho is not None:
            check_rho(cfg.rho)
        check_sam_gradient(cfg.sam_gradient, name="sam_gradient")
        check_adaptive_scope(cfg.adaptive_scope)
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
        cfg.method_options()  # and the method's own (e.g. Flat-LoRA's mode)
        return cfg

    def method_options(self) -> Any:
        """The settings this config's method reads, as its typed options (``Method.options_type``):
        Flat-LoRA's σ, schedule, T = ``steps``, seed, mode and shared noise; the SAM family's ρ,
        gradient mode (``sam_gradient``) and ``adaptive_scope``; nothing for plain training.
        Call it on a :meth:`resolved` config."""
        if self.steps is None or self.sigma is None:
            raise ValueError("method_options needs a resolved config (steps and sigma set): call cfg.resolved(task) "
                             "first")
        values = {"sigma": self.sigma, "schedule": self.schedule, "total_steps": self.steps, "seed": self.seed,
                  "mode": self.mode, "shared_noise": self.shared_noise, "rho": self.rho,
                  "gradient": self.sam_gradient, "adaptive_scope": self.adaptive_scope}
        method = get_method(self.method)
        return method.options({k: v for k, v in values.items() if k in method.option_names})


