"""Expected loss under weight noise: ΔL(σ) = E_ε L(θ + ε) − L(θ), by Monte Carlo with a t-interval.

Noise models (``noise=``), each in any space (projected in tangent / normal):

* ``"filter"`` — Flat-LoRA's filter-wise noise, ε_ij ~ N(0, σ²‖θ_i‖²/n) per filter i (one output unit, whatever the storage)
  (:func:`~landscape.directions.flat_lora_noise`; Li et al., ICML 2025);
* ``"isotropic"`` — ε ~ N(0, σ²I);
* ``"adaptive"`` — ε ~ N(0, σ² diag θ²) (|θ|-scaled).

For a quadratic loss, ΔL(σ) = ½ E[εᵀHε], which for isotropic noise is ½σ²·Tr H — exactly; for a
smooth loss, approximately at small σ.

Antithetic pairs (``antithetic=True``, the default): sample k is the pair ±σ·z_k and its value
½[L(θ + σz_k) + L(θ − σz_k)] − L(θ). Every noise model here is a centred Gaussian, so z and −z are
equally likely and the mean is unchanged; the odd terms of the Taylor series — the first-order
∇L·ε above all, which dominates a single draw's spread wherever θ is not a minimum — cancel exactly
in each pair, and what is left is the curvature term ½εᵀHε (exactly, for a quadratic loss) plus
fourth and higher even orders. The pair's variance is never larger than one draw's
(Var(½(X+Y)) ≤ ½(Var X + Var Y) = Var X for X, Y equally distributed), at twice the evaluations; at
checkpoints that are not minima it is far smaller (issue 14.4: with single draws ΔL(σ = 0.05) was
below its own standard error at every merged MiniLM row). ``antithetic=False`` draws single points.

Sample k is σ·z_k with z_k drawn from a generator seeded with ``flatlora.noise_seed(seed, k, 0)``:
the same seed gives the same draws for every σ, every checkpoint and every space of the same shapes
(common random numbers, so differences between checkpoints are paired). ``first_sample`` = n starts
at draw k = n, so that a run with n draws can be extended by the draws it did not make and the two
summaries merged exactly (:func:`pool_samples`: the t-interval of all n + m draws). Sampling stops at the
first n ≥ ``min_samples`` with half-width t_{(1+c)/2, n−1}·s/√n ≤ max(rtol·|mean|, atol), or at
``max_samples``; the stopping point does not depend on how many samples are evaluated per forward.

Under ``torchrun`` each round of samples is split across ranks (every rank draws its own z_k from
the seed; the values are gathered in k order), so the estimate and the stopping point are those of
one process.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import scipy.stats
import torch
from torch import nn
from tqdm.auto import tqdm

from flatlora import distributed, noise_seed

from .directions import adaptive_noise, flat_lora_noise, gaussian
from .evaluate import PointEvaluator
from .guard import preserved
from .loss import Loss, require_loss
from .space import Selector, Space, as_space

__all__ = ["expected_loss", "NOISES", "t_interval", "t_half_width", "pool_samples"]

NOISES = {
    "filter": flat_lora_noise,
    "isotropic": gaussian,
    "adaptive": adaptive_noise,
}


def t_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the Student-t confidence interval of the mean of ``samples`` (n ≥ 2)."""
    return float(np.mean(samples)), t_half_width(len(samples), float(np.std(samples, ddof=1)), confidence)


def t_half_width(n: int, std: float, confidence: float = 0.95) -> float:
    """Half-width t_{(1+c)/2, n−1}·s/√n of the Student-t interval of a mean of n ≥ 2 samples with sample std s."""
    return float(scipy.stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))


def pool_samples(*parts: tuple[int, float, float]) -> tuple[int, float, float]:
    """(n, mean, std) of the union of disjoint samples given as (nᵢ, meanᵢ, stdᵢ) each (std with ddof = 1):
    n = Σnᵢ, mean = Σnᵢ·meanᵢ / n and the sum of squared deviations
    M₂ = Σ[(nᵢ − 1)·stdᵢ² + nᵢ·(meanᵢ − mean)²] (Chan, Golub & LeVeque 1979), std = √(M₂ / (n − 1)) —
    exactly the mean and std of the concatenated samples, so an estimate extended by more draws
    (``expected_loss(first_sample=n)``) is the one a single longer run would have given."""
    n = sum(int(k) for k, _, _ in parts)
    if n < 2 or any(int(k) < 1 for k, _, _ in parts):
        raise ValueError(f"need parts of >= 1 sample and >= 2 samples in all, got sizes {[k for k, _, _ in parts]}")
    mean = sum(k * m for k, m, _ in parts) / n
    m2 = sum((k - 1) * (s ** 2 if k > 1 else 0.0) + k * (m - mean) ** 2 for k, m, s in parts)
    return n, float(mean), float(math.sqrt(m2 / (n - 1)))


def _stop_at(samples: np.ndarray, start: int, min_samples: int, rtol: float, atol: float, confidence: float) -> Optional[int]:
    """The first n in (start, len] at which the interval is tight enough, else None."""
    for n in range(max(start + 1, min_samples), len(samples) + 1):
        mean, half = t_interval(samples[:n], confidence)
        if half <= max(rtol * abs(mean), atol):
            return n
    return None


def _samples(evaluator: PointEvaluator, draw, sp: Space, sigma: float, seed: int, ks: range,
             antithetic: bool) -> tuple[np.ndarray, np.ndarray]:
    """L(θ + σ z_k) — or, antithetic, ½[L(θ + σz_k) + L(θ − σz_k)] — and accuracy (likewise averaged)
    for the samples k in ``ks``; under torchrun rank r evaluates k = ks[r], ks[r + W] … and one
    gather puts the values back in the order of ``ks``."""
    mine = distributed.shard(ks)
    values, acc = np.empty(0), np.empty(0)
    if mine:
        draws = [draw(sp, torch.Generator().manual_seed(noise_seed(seed, k, 0))) for k in mine]
        signs = (1.0, -1.0) if antithetic else (1.0,)
        values, acc = evaluator({n: torch.cat([torch.stack([d[n] for d in draws]).mul_(sign * sigma) for sign in signs])
                                 for n in sp.names})
        if antithetic:
            values, acc = values.reshape(2, -1).mean(axis=0), acc.reshape(2, -1).mean(axis=0)
    if distributed.world_size() == 1:
        return values, acc
    parts = distributed.all_gather_objects((values, acc))
    order = np.argsort(np.concatenate([np.arange(r, len(ks), len(parts)) for r in range(len(parts))]), kind="stable")
    return (np.concatenate([p[0] for p in parts])[order], np.concatenate([p[1] for p in parts])[order])


def expected_loss(
    model: nn.Module,
    loss: Loss,
    *,
    space: Union[Space, Selector] = "merged",
    sigmas: Sequence[float],
    noise: str = "filter",
    seed: int = 0,
    max_samples: int = 64,
    min_samples: int = 8,
    rtol: float = 0.1,
    atol: float = 0.0,
    confidence: float = 0.95,
    one_d: str = "zero",
    antithetic: bool = True,
    first_sample: int = 0,
    batch_points: Optional[int] = None,
    progress: bool = True,
) -> pd.DataFrame:
    """ΔL(σ) = E_ε L(θ + ε) − L(θ) for each σ (see the module docstring for noise and stopping).

    Args:
        sigmas: noise scales σ > 0.
        noise: ``"filter"``, ``"isotropic"`` or ``"adaptive"``.
        seed: common-random-numbers seed.
        max_samples, min_samples: sample cap and minimum (2 ≤ min ≤ max); with ``antithetic`` a
            sample is a pair ±ε (two evaluations).
        rtol, atol: stop when the interval half-width ≤ max(rtol·|ΔL|, atol).
        confidence: of the t-interval.
        one_d: the 1-D policy of filter noise: ``"zero"`` or ``"filter"`` (see :func:`~landscape.directions.flat_lora_noise`).
        antithetic: evaluate each draw as the pair ±ε (module docstring); False: single draws.
        first_sample: index of the first draw (k = first_sample, first_sample + 1, …): with n, the
            draws an earlier call with ``max_samples = n`` did not make, to be merged with its
            summary by :func:`pool_samples`.

    Returns:
        DataFrame, one row per σ: ``space``, ``noise``, ``sigma``, ``delta_loss`` (the mean increase),
        ``ci_low``, ``ci_high``, ``half_width``, ``std``, ``samples``, ``converged``, ``base_loss``,
        ``accuracy`` (mean accuracy under noise; NaN when the task has none), ``antithetic``.
    """
    require_loss(loss, "expected_loss")
    if noise not in NOISES:
        raise ValueError(f"unknown noise {noise!r}; choose one of {sorted(NOISES)}")
    sigmas = [float(s) for s in np.atleast_1d(np.asarray(sigmas, dtype=float))]
    if not sigmas or not all(math.isfinite(s) and s > 0 for s in sigmas):
        raise ValueError(f"sigmas must be finite numbers > 0, got {sigmas}")
    if not (2 <= int(min_samples) <= int(max_samples)):
        raise ValueError(f"need 2 <= min_samples <= max_samples, got min_samples={min_samples}, max_samples={max_samples}")
    if int(first_sample) < 0:
        raise ValueError(f"first_sample must be >= 0, got {first_sample}")
    if rtol < 0 or atol < 0 or not 0 < confidence < 1:
        raise ValueError(f"need rtol >= 0, atol >= 0 and 0 < confidence < 1, got {rtol}, {atol}, {confidence}")
    draw = NOISES[noise] if noise != "filter" else functools.partial(flat_lora_noise, one_d=one_d)
    sp = as_space(model, space)
    world = distributed.world_size()
    rows = []
    with preserved(model):
        base = loss.evaluate(model)["loss"]
        with PointEvaluator(sp, loss, batch_points) as evaluator, \
                tqdm(total=len(sigmas) * max_samples, desc=f"expected_loss[{sp.kind}]",
                     disable=not (progress and distributed.is_main()),
                     dynamic_ncols=True) as bar:
            for sigma in sigmas:
                increases, accuracies, stop = np.empty(0), np.empty(0), None
                while stop is None and len(increases) < max_samples:
                    first = len(increases)
                    per_call = max(1, evaluator.points_per_call // 2) if antithetic else evaluator.points_per_call
                    count = min(per_call * world, max_samples - first)
                    values, acc = _samples(evaluator, draw, sp, sigma, seed,
                                           range(first_sample + first, first_sample + first + count), antithetic)
                    increases = np.concatenate([increases, values - base])
                    accuracies = np.concatenate([accuracies, acc])
                    stop = _stop_at(increases, first, int(min_samples), rtol, atol, confidence)
                    bar.update(count)
                n = stop or len(increases)
                bar.update(max_samples - len(increases))
                mean, half = t_interval(increases[:n], confidence)
                rows.append({"space": sp.kind, "noise": noise, "sigma": sigma, "delta_loss": mean,
                             "ci_low": mean - half, "ci_high": mean + half, "half_width": half,
                             "std": float(np.std(increases[:n], ddof=1)), "samples": n, "converged": stop is not None,
                             "base_loss": base, "accuracy": float(np.mean(accuracies[:n])), "antithetic": antithetic})
    return pd.DataFrame(rows)
