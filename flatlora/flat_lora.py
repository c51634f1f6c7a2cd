"""Flat-LoRA: random weight perturbation in the full weight space (Li et al., ICML 2025, arXiv 2409.14396).

Objective: min over A, B of E_ε L(W + s·B·A + ε). For each LoRA-adapted layer at optimizer step t:

* W' = W + s·B·A (no grad), m×n; row i is a filter (one output unit);
* std_i = σ_t · ‖W'_{i,:}‖₂ / √n and ε_ij ~ N(0, std_i²)            (:func:`filter_noise_std`);
* σ_t = σ · (1 − cos(π t / T)) / 2 by default ("cosine"), or σ·t/T ("linear"), or σ ("constant"),
  with t the optimizer step and T the total number of optimizer steps (the *global* ones under DDP);
* every micro-batch of one optimizer step sees the same ε, a fresh ε every optimizer step;
* only the base weights of LoRA-adapted layers are perturbed; inference is plain LoRA (no noise).

Between forward and backward only the m row stds and a seed are kept (O(m) per layer); the noise
comes from a dedicated ``torch.Generator`` seeded from (seed, step, layer, rank) — the global RNG
is never touched, so dropout masks and data order are those of plain LoRA with the same seed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import numbers
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from . import distributed
from .lora_view import lora_layers
from .perturb import SeededGaussian, check_mode, perturbed

__all__ = ["FlatLoRA", "FlatLoRAOptions", "filter_noise_std", "sigma_schedule", "noise_seed", "SCHEDULES",
           "check_sigma", "check_schedule"]

SCHEDULES = ("cosine", "linear", "constant")


def check_sigma(sigma: float) -> float:
    """σ, Flat-LoRA's noise scale, checked: a finite number ≥ 0 (0: no noise). Returns it as a float."""
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma (Flat-LoRA's noise scale σ) must be a finite number >= 0, got {sigma!r} "
                         "(the paper uses 0.05 for text, 0.15 for vision)")
    return float(sigma)


def check_schedule(schedule: str) -> str:
    """The σ schedule's name, checked: one of :data:`SCHEDULES`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown σ schedule {schedule!r}; choose one of {SCHEDULES}")
    return schedule


@dataclass(frozen=True, kw_only=True)
class FlatLoRAOptions:
    """Flat-LoRA's settings, and the one place their defaults are written (:class:`FlatLoRA` has them).

    Attributes:
        sigma: the target noise scale σ ≥ 0 (Li et al.: 0.05 for text, 0.15 for vision).
        schedule: σ_t over the optimizer steps, one of :data:`SCHEDULES`.
        total_steps: T, the number of optimizer steps (global under DDP); ``constant`` needs none.
        seed: the noise seed. mode: the perturbation mode (``exact`` / ``inplace``).
        shared_noise: rank 0's noise on every rank instead of each rank's own.
    """

    sigma: float = 0.05
    schedule: str = "cosine"
    total_steps: Optional[int] = None
    seed: int = 0
    mode: str = "exact"
    shared_noise: bool = False

    def __post_init__(self):
        check_sigma(self.sigma)
        check_schedule(self.schedule)
        check_mode(self.mode)
        if self.total_steps is not None and self.total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")


def filter_noise_std(merged_weight: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-row noise std of Flat-LoRA: std_i = σ · ‖W'_{i,:}‖₂ / √n for an m×n (out × in) weight."""
    sigma = check_sigma(sigma)
    w = merged_weight.detach().flatten(1).float()
    return sigma * w.norm(dim=1) / math.sqrt(w.shape[1])


def sigma_schedule(sigma: float, step: int, total_steps: int, schedule: str = FlatLoRAOptions.schedule) -> float:
    """σ_t for optimizer step t of T: cosine σ(1−cos(πt/T))/2, linear σt/T, or constant σ (t clipped to [0, T])."""
    check_schedule(schedule)
    if schedule == "constant":
        return float(sigma)
    if total_steps is None or total_steps <= 0:
        raise ValueError(f"schedule {schedule!r} needs total_steps > 0, got {total_steps}")
    frac = min(max(step / total_steps, 0.0), 1.0)
    if schedule == "linear":
        return float(sigma) * frac
    return float(sigma) * (1.0 - math.cos(math.pi * frac)) / 2.0


def noise_seed(seed: int, step: int, layer: int, rank: int = 0) -> int:
    """A 63-bit generator seed derived from (seed, step, layer, rank) by hashing (no collisions in practice)."""
    digest = hashlib.blake2b(f"flatlora/{seed}/{step}/{layer}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class FlatLoRA:
    """Flat-LoRA's filter-wise weight noise for a peft LoRA model.

    Example::

        flat = FlatLoRA(model, sigma=0.05, total_steps=1000)
        for step, batch in enumerate(loader):
            with flat.perturb(step):           # forward and backward see W + s·B·A + ε_step
                loss = model(**batch).loss
                loss.backward()
            optimizer.step(); optimizer.zero_grad()

    Args:
        model: a peft model with plain LoRA layers (see :func:`flatlora.lora_layers`).
        sigma: the target noise scale σ (paper: 0.05 for text, 0.15 for vision).
        total_steps: T, the total number of optimizer steps (global under DDP). May be set later
            (the Trainer sets it from ``state.max_steps``); ``constant`` needs none.
        schedule: ``"cosine"`` (default), ``"linear"`` or ``"constant"``.
        seed: the noise seed; the generator for layer ℓ at step t is seeded from (seed, t, ℓ, rank).
        mode: ``"exact"`` (base weights never written) or ``"inplace"`` (the reference code's path).
        rank: the process rank mixed into the seed (default: :func:`flatlora.distributed.rank`, 0 in
            one process). Under data parallelism every rank then draws its own ε (independent
            noise: the averaged gradient sees W noise samples per step).
        shared_noise: use rank 0's noise on every rank instead (then W processes with batch b
            compute exactly what one process computes with batch W·b).

    The defaults are :class:`FlatLoRAOptions`'; ``FlatLoRA(model, **dataclasses.asdict(options))``
    builds it from options.
    """

    def __init__(
        self,
        model: nn.Module,
        sigma: float = FlatLoRAOptions.sigma,
        *,
        total_steps: Optional[int] = FlatLoRAOptions.total_steps,
        schedule: str = FlatLoRAOptions.schedule,
        seed: int = FlatLoRAOptions.seed,
        mode: str = FlatLoRAOptions.mode,
        rank: Optional[int] = None,
        shared_noise: bool = FlatLoRAOptions.shared_noise,
    ):
        options = FlatLoRAOptions(sigma=sigma, total_steps=total_steps, schedule=schedule, seed=seed, mode=mode,
                                  shared_noise=shared_noise)  # checks every setting
        self.layers = lora_layers(model)  # raises on AdaLoRA / DoRA / no LoRA layer
        vars(self).update(dataclasses.asdict(options))  # sigma, total_steps, schedule, seed, mode, shared_noise
        self.rank = 0 if shared_noise else (distributed.rank() if rank is None else int(rank))

    def sigma_at(self, step: int) -> float:
        """σ_t for optimizer step ``step``."""
        return sigma_schedule(self.sigma, step, self.total_steps, self.schedule)

    def noise(self, step: int) -> dict[str, SeededGaussian]:
        """The ΔW sources of step ``step``: per layer, the row stds of W' and the layer's seed."""
        sigma_t = self.sigma_at(step)
        with torch.no_grad():
            return {
                v.name: SeededGaussian(filter_noise_std(v.merged_weight(), sigma_t), noise_seed(self.seed, step, i, self.rank))
                for i, v in enumerate(self.layers)
            }

    @contextlib.contextmanager
    def perturb(self, step: int) -> Iterator[None]:
        """Inside, forward and backward see W + s·B·A + ε_step. Enter once per micro-batch; the same
        ``step`` gives the same ε. At σ_t = 0 (the cosine schedule's first step) nothing is perturbed."""
        if self.sigma_at(step) == 0.0:
            yield
            return
        with perturbed(self.layers, self.noise(step), mode=self.mode):
            yield
