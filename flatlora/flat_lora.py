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
import hashlib
import math
from typing import Iterator, Optional

import torch
from torch import nn

from . import distributed
from .lora_view import lora_layers
from .perturb import MODES, SeededGaussian, perturbed

__all__ = ["FlatLoRA", "filter_noise_std", "sigma_schedule", "noise_seed", "SCHEDULES"]

SCHEDULES = ("cosine", "linear", "constant")


def filter_noise_std(merged_weight: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-row noise std of Flat-LoRA: std_i = σ · ‖W'_{i,:}‖₂ / √n for an m×n (out × in) weight."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    w = merged_weight.detach().flatten(1).float()
    return sigma * w.norm(dim=1) / math.sqrt(w.shape[1])


def sigma_schedule(sigma: float, step: int, total_steps: int, schedule: str = "cosine") -> float:
    """σ_t for optimizer step t of T: cosine σ(1−cos(πt/T))/2, linear σt/T, or constant σ (t clipped to [0, T])."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
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
    """

    def __init__(
        self,
        model: nn.Module,
        sigma: float = 0.05,
        *,
        total_steps: Optional[int] = None,
        schedule: str = "cosine",
        seed: int = 0,
        mode: str = "exact",
        rank: Optional[int] = None,
        shared_noise: bool = False,
    ):
        if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        if total_steps is not None and total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        self.layers = lora_layers(model)  # raises on AdaLoRA / DoRA / no LoRA layer
        self.sigma = float(sigma)
        self.total_steps = total_steps
        self.schedule = schedule
        self.seed = int(seed)
        self.mode = mode
        self.shared_noise = shared_noise
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
