"""Settings of one training run, :class:`TrainConfig`, and all their validation in one place."""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..flat_lora import FlatLoRAOptions, check_schedule, check_sigma
from ..methods import get_method
from ..perturb import check_mode
from ..sam import SAMOptions, check_adaptive_scope, check_rho, check_sam_gradient
from ..tasks import TASKS, Task

__all__ = ["TrainConfig", "RunExistsError", "ConfigError", "check_device"]


class RunExistsError(FileExistsError):
    """The output folder holds a finished run (or a run with other settings)."""


class ConfigError(ValueError):
    """A setting that is out of range or cannot be used; ``setting`` names it (``None``: several).

    The message begins with the setting's name where it can, so that :meth:`for_command_line` can
    spell it as train.py's option."""

    def __init__(self, message: str, setting: Optional[str] = None):
        super().__init__(message)
        self.setting = setting

    def for_command_line(self) -> str:
        """The message with the setting spelled as its command-line option (``lora_dropout`` →
        ``--lora-dropout``)."""
        text = str(self)
        if self.setting is None:
            return text
        option = "--" + self.setting.replace("_", "-")
        return option + text[len(self.setting):] if text.startswith(self.setting) else f"{option}: {text}"


#: TrainConfig field → the option of the method's options dataclass that it sets
METHOD_SETTINGS = {"sigma": "sigma", "schedule": "schedule", "mode": "mode", "shared_noise": "shared_noise",
                   "rho": "rho", "sam_gradient": "gradient", "adaptive_scope": "adaptive_scope"}
#: TrainConfig fields that only methods training LoRA read
LORA_SETTINGS = ("rank", "alpha", "lora_dropout")


def _checked(setting: str, check: Callable[[Any], Any], value: Any) -> None:
    """``check(value)``, its ValueError raised as a :class:`ConfigError` naming ``setting``."""
    try:
        check(value)
    except ValueError as e:
        raise ConfigError(str(e), setting) from None


def _require(ok: bool, setting: str, problem: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{setting} {problem}, got {value!r}", setting)


def check_device(device: Optional[str]) -> None:
    """A device a run can use (``None``: chosen by availability): a torch device name, a CUDA one only
    where this torch has CUDA and that device."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not a torch device; pass cpu, cuda or cuda:N", "device") from None
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        why = "it was built without CUDA" if torch.version.cuda is None else "it sees no CUDA device"
        raise ConfigError(f"device {device}: this torch has no CUDA ({why}); pass --device cpu, or leave the "
                          "device unset to use CUDA only where it is available", "device")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); pass "
                          f"cuda:0 … cuda:{torch.cuda.device_count() - 1}", "device")


def _absolute_paths(task: str, options: dict) -> dict:
    """``options`` with those that the task's builder annotates as paths (``os.PathLike``) made
    absolute: a run's config.json names its files wherever it is read from."""
    build = TASKS.get(task)
    if build is None:
        return dict(options)
    try:
        hints = typing.get_type_hints(build)
    except TypeError:  # a builder that is not a function (a partial, a callable object): no hints to read
        hints = {}
    return {k: str(Path(v).resolve()) if v is not None and os.PathLike in typing.get_args(hints.get(k)) else v
            for k, v in options.items()}


@dataclass
class TrainConfig:
    """Settings of one training run. ``None`` means the task's default (see ``Task.defaults``).

    The method's own settings (σ, schedule, ρ …) take their defaults from its options dataclass
    (:class:`~flatlora.flat_lora.FlatLoRAOptions`, :class:`~flatlora.sam.SAMOptions`);
    :meth:`method_options` hands the method those it reads. A resolved config holds ``None`` for
    the settings its method does not read (σ of plain LoRA, the LoRA rank of full fine-tuning):
    config.json records only what was used; :meth:`unused_settings` names those given anyway."""

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
    schedule: Optional[str] = FlatLoRAOptions.schedule
    mode: Optional[str] = FlatLoRAOptions.mode
    rho: Optional[float] = SAMOptions.rho
    lora_dropout: Optional[float] = 0.05
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: Optional[float] = 1.0
    eval_batch_size: int = 128
    checkpoint_every: int = 100
    # several processes: rank 0's Flat-LoRA noise on every rank
    shared_noise: Optional[bool] = FlatLoRAOptions.shared_noise
    # several processes: SAM's ε from each rank's own gradient, or "global"
    sam_gradient: Optional[str] = SAMOptions.gradient
    # ASAM's T = |θ| + η on every tensor, or on weights only
    adaptive_scope: Optional[str] = SAMOptions.adaptive_scope
    task_options: dict = dataclasses.field(default_factory=dict)

    def reads(self, setting: str) -> bool:
        """Whether this config's method reads the field ``setting`` (every field that is neither a
        method-family setting nor a LoRA one is read by every method)."""
        method = get_method(self.method)
        if setting in METHOD_SETTINGS:
            return METHOD_SETTINGS[setting] in method.option_names
        return method.uses_lora or setting not in LORA_SETTINGS

    def unused_settings(self) -> list[str]:
        """The settings given (other than their defaults) that this config's method does not read:
        ``sigma`` for plain LoRA, ``rho`` for Flat-LoRA, ``rank`` for full fine-tuning …"""
        defaults = TrainConfig()
        return [name for name in (*METHOD_SETTINGS, *LORA_SETTINGS)
                if getattr(self, name) != getattr(defaults, name) and not self.reads(name)]

    def resolved(self, task: Task, world_size: int = 1) -> "TrainConfig":
        """Fill the unset fields from the task's defaults, and check everything before any work:
        every given value (also of settings the method does not read, which become ``None``), the
        method, and the steps the train split allows. Task options that are paths become absolute.

        ``world_size`` processes (data parallelism) take W · batch_size · grad_accum examples a step."""
        self._check_given()
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
            task_options=_absolute_paths(self.task, self.task_options),
        )
        for name in (*METHOD_SETTINGS, *LORA_SETTINGS):
            if not cfg.reads(name):
                setattr(cfg, name, None)
        step_batch = world_size * cfg.batch_size * cfg.grad_accum
        per_epoch = len(task.splits["train"]) // step_batch
        if per_epoch < 1:
            raise ConfigError(f"the train split ({len(task.splits['train'])} examples) is smaller than one step's "
                              f"batch ({world_size} process(es) × batch_size {cfg.batch_size} × grad_accum "
                              f"{cfg.grad_accum}); lower batch_size or grad_accum, or give more examples")
        if cfg.steps is None and cfg.epochs is not None:
            cfg.steps = int(round(cfg.epochs * per_epoch))
            _require(cfg.steps >= 1, "epochs", f"must give at least one step ({per_epoch} steps an epoch)", cfg.epochs)
        elif cfg.steps is None:
            cfg.steps = int(d.get("steps", 250))
        return cfg

    def _check_given(self) -> None:
        """Every value given, each error naming its setting (:class:`ConfigError`)."""
        get_method(self.method)  # an unknown method: its own error (MethodError), naming the known ones
        for name in ("rank", "batch_size", "steps"):
            value = getattr(self, name)
            _require(value is None or value >= 1, name, "must be >= 1", value)
        for name in ("grad_accum", "eval_batch_size", "checkpoint_every"):
            _require(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        for name, note in (("alpha", " (LoRA's scale is alpha / rank)"), ("lr", ""), ("epochs", ""),
                           ("max_grad_norm", " (or None: no clipping)")):
            value = getattr(self, name)
            _require(value is None or (math.isfinite(value) and value > 0), name, "must be a finite number > 0" + note,
                     value)
        _require(self.lora_dropout is None or 0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)",
                 self.lora_dropout)
        _require(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1) (the share of steps spent warming up)",
                 self.warmup_ratio)
        _require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
                 "must be a finite number >= 0", self.weight_decay)
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give either steps or epochs, not both")
        # every method family's settings that are given, whether or not this method reads them
        for name, check in (("sigma", check_sigma), ("rho", check_rho), ("schedule", check_schedule),
                            ("mode", check_mode), ("adaptive_scope", check_adaptive_scope),
                            ("sam_gradient", lambda v: check_sam_gradient(v, name="sam_gradient"))):
            if getattr(self, name) is not None:
                _checked(name, check, getattr(self, name))

    def method_options(self) -> Any:
        """The settings this config's method reads, as its typed options (``Method.options_type``):
        Flat-LoRA's σ, schedule, T = ``steps``, seed, mode and shared noise; the SAM family's ρ,
        gradient mode (``sam_gradient``) and ``adaptive_scope``; nothing for plain training.
        Call it on a :meth:`resolved` config."""
        if self.steps is None or (self.reads("sigma") and self.sigma is None):
            raise ValueError("method_options needs a resolved config (steps and the method's settings set): call "
                             "cfg.resolved(task) first")
        method = get_method(self.method)
        values = {option: getattr(self, field) for field, option in METHOD_SETTINGS.items()}
        values.update(total_steps=self.steps, seed=self.seed)
        return method.options({k: v for k, v in values.items() if k in method.option_names})
