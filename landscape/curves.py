"""Loss lines and planes (Li et al., NeurIPS 2018): L(θ + α d₁) and L(θ + α d₁ + β d₂) in any space.

The default grid is symmetric and contains the unperturbed point: α ∈ {−span, …, 0, …, span} with
an odd number of steps. Directions come from a sampler (default :func:`~landscape.directions.filter_normalized`)
or are given; with ``num_directions=K`` a sampler is drawn K times from one seeded generator, and
:func:`summarize` gives the mean ± std band over the K directions (one draw decides too much).
Results are tidy DataFrames — one row per (direction, α[, β]) with columns ``space``,
``direction``, ``alpha``[, ``beta``], ``loss``, ``accuracy`` (NaN when the task has none); their
``attrs`` say how the points were evaluated (``vectorized``, ``points_per_forward``, ``loop_reason``). Several
grid points share one vectorized forward where the model allows (:class:`~landscape.evaluate.PointEvaluator`).
With ``results_path`` the rows are written atomically as they come, and a probe started again with
the same arguments resumes where it stopped.

Under ``torchrun`` the (direction, point) pairs are split across ranks (rank r takes every W-th);
every rank draws the same directions from the seed (nothing large is sent), keeps its partial rows
in a shard file of its own, and one gather at the end gives every rank the whole frame — the same
numbers as one process.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from flatlora import distributed

from .directions import Sampler, filter_normalized, orthogonalize as gram_schmidt, sample
from .evaluate import Combinations, PointEvaluator
from .results import ResultsFile, fingerprint
from .guard import preserved
from .loss import Loss, require_loss
from .space import Direction, Selector, Space, as_space

__all__ = ["loss_line", "loss_plane", "symmetric_grid", "summarize"]

DirectionLike = Union[Sampler, Mapping[str, torch.Tensor]]
Grid = Union[int, Sequence[float], np.ndarray]


def symmetric_grid(span: float = 1.0, steps: int = 21) -> np.ndarray:
    """``steps`` evenly spaced points on [−span, span]: k·span/h for k = −h … h, h = (steps − 1)/2.
    ``steps`` must be odd, so 0 is a grid point, and the grid is exactly symmetric (g[−i] = −g[i])."""
    if not isinstance(steps, (int, np.integer)) or steps < 1 or steps % 2 == 0:
        raise ValueError(f"steps must be an odd positive integer (so that the grid contains 0), got {steps!r}")
    if not (isinstance(span, (int, float)) and math.isfinite(span) and span > 0):
        raise ValueError(f"span must be a finite number > 0, got {span!r}")
    half = steps // 2
    return np.arange(-half, half + 1) * (float(span) / half) if half else np.zeros(1)


def _axis(grid: Grid, span: float, what: str) -> np.ndarray:
    if isinstance(grid, (int, np.integer)):
        return symmetric_grid(span, int(grid))
    values = np.asarray(grid, dtype=float)
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"{what} must be an odd number of steps or a non-empty 1-D array of finite numbers")
    return values


def _check_common(loss: Loss, num_directions: int, where: str) -> None:
    require_loss(loss, where)
    if not isinstance(num_directions, (int, np.integer)) or num_directions < 1:
        raise ValueError(f"num_directions must be a positive integer, got {num_directions!r}")


def _draw_bases(sp: Space, samplers: Sequence[DirectionLike], num_directions: int, seed: int,
                orthogonal: bool) -> list[list[Direction]]:
    if num_directions > 1 and any(isinstance(s, Mapping) for s in samplers):
        raise ValueError("num_directions > 1 needs samplers: K copies of a given direction would all be the same")
    generator = torch.Generator().manual_seed(int(seed))
    bases = []
    for _ in range(num_directions):
        basis = [sample(s, sp, generator, f"direction {j + 1}") for j, s in enumerate(samplers)]
        if orthogonal:
            basis[1] = gram_schmidt(sp, basis[0], basis[1])
        bases.append(basis)
    return bases


def _key(index: int, coeffs: np.ndarray) -> tuple:
    """(direction, *coefficients) of point ``index`` of the flat (direction, coefficient) list."""
    k, i = divmod(index, len(coeffs))
    return (k, *(float(x) for x in coeffs[i]))


def _scan(model: nn.Module, loss: Loss, sp: Space, bases: list[list[Direction]], coeffs: np.ndarray,
          axes: list[str], probe: str, meta: dict, batch_points: Optional[int], results_path, progress: bool) -> pd.DataFrame:
    """Evaluate L(θ + Σ_j c_j d_j) for every coefficient row c and every basis; tidy rows."""
    meta = {"probe": probe, "space": sp.kind, "dim": sp.dim, "batches": len(loss.batches), "samples": loss.total,
            "train_mode": loss.train_mode, "coefficients": coeffs.tolist(),
            "directions": [[fingerprint(sp, d) for d in basis] for basis in bases], **meta}
    results = ResultsFile(results_path, meta)
    done = {(r["direction"], *(r[a] for a in axes)) for r in results.rows}
    # under torchrun, rank r evaluates points r, r + W, r + 2W … of the (direction, coefficient) list
    mine = set(distributed.shard(range(len(bases) * len(coeffs))))
    total = len(mine)
    with PointEvaluator(sp, loss, batch_points) as evaluator, \
            tqdm(total=total, initial=sum(1 for i in mine if _key(i, coeffs) in done), desc=f"{probe}[{sp.kind}]",
                 disable=not (progress and distributed.is_main()), dynamic_ncols=True) as bar:
        for k, basis in enumerate(bases):
            todo = [c for i, c in enumerate(coeffs, start=k * len(coeffs))
                    if i in mine and _key(i, coeffs) not in done]
            if not todo:
                continue
            # vectorized chunks make their offsets as one product C·[d₁; d₂]; looped points need none
            flat = ({n: torch.stack([d[n].reshape(-1) for d in basis]) for n in sp.names}
                    if evaluator.vectorized is not False else None)
            for i in range(0, len(todo), evaluator.points_per_call):
                chunk = np.stack(todo[i : i + evaluator.points_per_call])
                losses, accuracies = evaluator(Combinations(chunk, basis, flat))
                results.add([{"space": sp.kind, "direction": k, **{a: float(x) for a, x in zip(axes, c)},
                              "loss": float(l), "accuracy": float(acc)}
                             for c, l, acc in zip(chunk, losses, accuracies)])
                bar.update(len(chunk))
    frame = pd.DataFrame(results.gather(), columns=["space", "direction", *axes, "loss", "accuracy"])
    frame = frame.sort_values(["direction", *axes], ignore_index=True)
    frame.attrs.update(vectorized=evaluator.vectorized, points_per_forward=evaluator.points_per_call,
                       loop_reason=evaluator.fallback_reason)
    return frame


def loss_line(
    model: nn.Module,
    loss: Loss,
    *,
    space: Union[Space, Selector] = "lora",
    direction: DirectionLike = filter_normalized,
    alphas: Grid = 21,
    span: float = 1.0,
    num_directions: int = 1,
    seed: int = 0,
    batch_points: Optional[int] = None,
    results_path: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
) -> pd.DataFrame:
    """L(θ + α d) along one or K directions (Li et al., 2018).

    Args:
        model, loss: the model and the :class:`~landscape.Loss` to evaluate.
        space: a :class:`~landscape.Space` of ``model`` or a space selector (``"lora"``, ``"merged"`` …).
        direction: a direction (dict) or a sampler ``(space, generator) -> direction``.
        alphas: an odd number of steps of :func:`symmetric_grid` on [−span, span], or explicit values.
        num_directions: K draws of the sampler, from ``torch.Generator().manual_seed(seed)``.
        batch_points: grid points per vectorized forward (see :class:`~landscape.evaluate.PointEvaluator`).
        results_path: JSON file of partial results, written atomically; resumes a stopped probe.

    Returns:
        DataFrame with columns ``space``, ``direction``, ``alpha``, ``loss``, ``accuracy``.
    """
    _check_common(loss, num_directions, "loss_line")
    sp = as_space(model, space)
    grid = _axis(alphas, span, "alphas")
    with preserved(model):
        bases = _draw_bases(sp, [direction], num_directions, seed, orthogonal=False)
        return _scan(model, loss, sp, bases, grid[:, None], ["alpha"], "loss_line", {"seed": seed},
                     batch_points, results_path, progress)


def loss_plane(
    model: nn.Module,
    loss: Loss,
    *,
    space: Union[Space, Selector] = "lora",
    directions: Union[DirectionLike, tuple[DirectionLike, DirectionLike]] = filter_normalized,
    grid: Union[Grid, tuple[Grid, Grid]] = 21,
    span: float = 1.0,
    num_directions: int = 1,
    seed: int = 0,
    orthogonalize: bool = False,
    batch_points: Optional[int] = None,
    results_path: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
) -> pd.DataFrame:
    """L(θ + α d₁ + β d₂) on a grid (Li et al., 2018).

    Args:
        directions: one sampler (drawn for d₁ then d₂), or a pair (d₁, d₂) of directions / samplers.
        grid: an odd number of steps (both axes, :func:`symmetric_grid` on [−span, span]), one array
            of values for both axes, or a pair (alphas, betas).
        orthogonalize: replace d₂ by its Gram–Schmidt residual against d₁ (after any normalization
            by the sampler), rescaled to ‖d₂‖.
        Others as in :func:`loss_line`.

    Returns:
        DataFrame with columns ``space``, ``direction``, ``alpha``, ``beta``, ``loss``, ``accuracy``;
        row (α, β) is the loss at θ + α d₁ + β d₂.
    """
    _check_common(loss, num_directions, "loss_plane")
    sp = as_space(model, space)
    pair = tuple(directions) if isinstance(directions, (tuple, list)) else (directions, directions)
    if len(pair) != 2:
        raise ValueError(f"directions must be one sampler or a pair (d1, d2), got {len(pair)} items")
    if isinstance(grid, tuple) and len(grid) == 2:
        alphas, betas = _axis(grid[0], span, "grid[0]"), _axis(grid[1], span, "grid[1]")
    else:
        alphas = betas = _axis(grid, span, "grid")
    coeffs = np.array([(a, b) for a in alphas for b in betas], dtype=float)
    with preserved(model):
        bases = _draw_bases(sp, pair, num_directions, seed, orthogonal=orthogonalize)
        return _scan(model, loss, sp, bases, coeffs, ["alpha", "beta"], "loss_plane",
                     {"seed": seed, "orthogonalize": orthogonalize}, batch_points, results_path, progress)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over directions of a :func:`loss_line` / :func:`loss_plane` frame: one row per
    (space, α[, β] and any other label column), columns ``loss_mean``, ``loss_std``,
    ``accuracy_mean``, ``accuracy_std``, ``n`` (std is NaN for a single direction)."""
    keys = [c for c in frame.columns if c not in ("direction", "loss", "accuracy")]
    out = frame.groupby(keys, sort=True).agg(loss_mean=("loss", "mean"), loss_std=("loss", "std"),
                                             accuracy_mean=("accuracy", "mean"), accuracy_std=("accuracy", "std"),
                                             n=("loss", "size"))
    return out.reset_index()
