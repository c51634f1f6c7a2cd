"""More noise draws where a run's expected loss is not told apart from 0 (issue 14.4).

The suite measures ΔL(σ) = E_ε L(θ + ε) − L(θ) with a fixed number n of antithetic pairs per run,
space and σ (:class:`~landscape.study.suite.ProbeSettings`: ``noise_min_samples`` =
``noise_max_samples`` = n). Where a run's 95 % t-interval of ΔL holds 0, those n pairs cannot tell
its ΔL from 0. :func:`top_up` evaluates, for exactly those cells, the draws k = n … N − 1 of the same
common-random-number stream (:func:`landscape.noise.expected_loss` with ``first_sample = n``) and
merges them with the first n (:func:`landscape.noise.pool_samples`): the cell's mean and interval
are then exactly those of an N-pair probe, at the cost of the N − n extra pairs alone. Cells whose
n pairs already exclude 0 keep them, so the other cells' numbers do not move.

The first n pairs' standard deviation is recovered from the recorded half-width h:
s = h·√n / t_{0.975, n−1} = h / :func:`~landscape.noise.t_half_width` (n, 1).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
from torch import nn

from ..loss import Loss
from ..noise import expected_loss, pool_samples, t_half_width
from .report import held_zero
from .suite import ProbeSettings, probe_spaces

__all__ = ["held_zero", "top_up", "merge_top_up", "check_top_up", "CONFIDENCE"]

CONFIDENCE = 0.95  # of the suite's ΔL intervals (expected_loss's default)


def check_top_up(settings: ProbeSettings, pairs: int) -> None:
    """Refuse (ValueError naming the fix) a top-up to ``pairs`` that cannot be merged exactly: the
    suite's cells must have a fixed number of pairs n, and ``pairs`` ≥ n + 2."""
    n = int(settings.noise_max_samples)
    if int(settings.noise_min_samples) != n:
        raise ValueError(f"a noise top-up needs every cell probed with the same number of pairs; these settings "
                         f"stop anywhere between {settings.noise_min_samples} and {n}: probe with --noise-samples 8 "
                         f"or fewer (min = max), or leave out the top-up")
    if int(pairs) < n + 2:
        raise ValueError(f"--noise-pairs {pairs}: the cells already have {n} pairs; ask for at least {n + 2}")


def top_up(model: nn.Module, loss: Loss, settings: ProbeSettings, cells: Sequence[tuple[str, float]], pairs: int,
           lora_targets: Optional[Sequence[str]] = None, progress: bool = False) -> pd.DataFrame:
    """The draws k = n … ``pairs`` − 1 (n = the suite's pairs) of each (space, σ) in ``cells``, with the
    suite's noise (filter), seed and antithetic setting: one row per cell with ``space``, ``sigma``,
    ``delta_loss``, ``std`` and ``samples`` (= pairs − n) of those draws alone."""
    check_top_up(settings, pairs)
    n = int(settings.noise_max_samples)
    kinds = list(dict.fromkeys(sp for sp, _ in cells))
    frames = []
    for name, (probed, sp) in probe_spaces(model, kinds, lora_targets, settings.include_trainable).items():
        sigmas = [x for s, x in cells if s == name]
        frame = expected_loss(probed, loss, space=sp, sigmas=sigmas, noise="filter", seed=settings.seed,
                              min_samples=pairs - n, max_samples=pairs - n, antithetic=settings.noise_antithetic,
                              first_sample=n, confidence=CONFIDENCE, progress=progress)
        frames.append(frame[["sigma", "delta_loss", "std", "samples"]].assign(space=name))
    return pd.concat(frames, ignore_index=True)


def merge_top_up(measures: pd.DataFrame, extra: Optional[pd.DataFrame], first: int) -> pd.DataFrame:
    """``measures`` with a ``samples`` column on its ΔL rows (``first``, the suite's pairs) and the
    cells in ``extra`` (:func:`top_up`'s rows) replaced by the merge of both samples: mean, 95 %
    half-width (``err``) and samples of the union."""
    out = measures.copy()
    is_noise = out["measure"] == "expected_loss"
    out.loc[is_noise, "samples"] = float(first)
    if extra is None or extra.empty:
        return out
    for r in extra.itertuples():
        where = is_noise & (out["space"] == r.space) & np.isclose(out["x"], r.sigma)
        if where.sum() != 1:
            raise ValueError(f"no single ΔL row for space {r.space}, σ = {r.sigma} to merge the extra draws into")
        i = out.index[where][0]
        std = float(out.at[i, "err"]) / t_half_width(first, 1.0, CONFIDENCE)
        n, mean, s = pool_samples((first, float(out.at[i, "value"]), std), (int(r.samples), r.delta_loss, r.std))
        out.loc[i, ["value", "err", "samples"]] = [mean, t_half_width(n, s, CONFIDENCE), float(n)]
    return out
