"""Evaluating a :class:`Loss` at offsets in a :class:`Space`: one point with its gradient, or many points
at once. (Resumable result files: :mod:`landscape.results`.)

:class:`PointEvaluator` evaluates L(θ + δ_p) for a stack of offsets δ_1 … δ_P. Where the model
allows it (``torch.func.vmap`` over :meth:`Space.at`) and it pays (small models such as the digits
MLP, where Python overhead dominates a forward pass), the P points share one vectorized forward;
otherwise — vmap fails (``train_mode`` with dropout or BatchNorm, data-dependent control flow) or is
slower (MiniLM on CPU: batched products of per-point weights are slower than plain ones) — it loops,
decided once on the first chunk. The results are the same either way.
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional

import numpy as np
import torch

from flatlora import distributed

from .loss import Loss
from .space import Direction, Space

__all__ = ["value_and_grad", "PointEvaluator", "VMAP_MAX_FLOATS"]

#: the auto choice of points per vectorized forward keeps P · dim under this many floats
VMAP_MAX_FLOATS = 2**24
_MAX_POINTS = 32


def value_and_grad(space: Space, loss: Loss, delta: Direction) -> tuple[float, Direction]:
    """L(θ + Pδ) and its gradient with respect to δ, accumulated batch by batch (one batch's graph
    in memory at a time), in the loss's mode. The model's ``.grad`` fields are not touched.

    Under ``torchrun`` each rank takes every W-th batch and one all-reduce sums the parts."""
    model = space.model
    leaves = {n: delta[n].detach().requires_grad_() for n in space.names}
    grad = {n: torch.zeros_like(t) for n, t in leaves.items()}
    device = next(iter(leaves.values())).device
    value = torch.zeros((), dtype=torch.float64, device=device)
    with loss.mode(model), torch.enable_grad():
        for batch, w in distributed.shard(list(zip(loss.on(device), loss.weights))):
            with space.at(leaves):
                v = loss.batch_value(model, batch) * (w / loss.total)
                parts = torch.autograd.grad(v, [leaves[n] for n in space.names], allow_unused=True)
            value += v.detach().double()
            for n, g in zip(space.names, parts):
                if g is not None:
                    grad[n] += g
    distributed.all_reduce_sum_([value])
    distributed.all_reduce_sum_(list(grad.values()))
    return float(value), grad


class PointEvaluator:
    """L and accuracy at many offsets of one space, ``points_per_call`` per forward where that pays.

    With ``batch_points=None`` it tries ``torch.func.vmap`` on the first chunk of points and times it
    against one looped point, and keeps whichever is faster (see the module docstring); an explicit
    ``batch_points > 1`` always vectorizes unless vmap fails. Either way the numbers are the same.

    Use it as a context manager: inside, gradients are off and the model is in the loss's mode (set
    once for all the points, not per point)::

        with PointEvaluator(space, loss) as evaluate:
            losses, accuracies = evaluate(offsets)

    Args:
        space, loss: where and what to evaluate.
        batch_points: points per vectorized forward; ``None`` picks min(32, 2**24 // dim) and times it
            (1 — a plain loop — in ``train_mode``); 1 disables vectorization.
    """

    def __init__(self, space: Space, loss: Loss, batch_points: Optional[int] = None):
        self.timed = batch_points is None  # auto: vmap only where it beats the loop
        if batch_points is None:
            batch_points = 1 if loss.train_mode else max(1, min(_MAX_POINTS, VMAP_MAX_FLOATS // max(space.dim, 1)))
        if int(batch_points) < 1:
            raise ValueError(f"batch_points must be >= 1, got {batch_points}")
        self.space, self.loss = space, loss
        self.points_per_call = int(batch_points)
        self.vectorized: Optional[bool] = None if self.points_per_call > 1 else False
        self.fallback_reason: Optional[str] = None
        self._stack: Optional[contextlib.ExitStack] = None
        self._out: Optional[dict[str, torch.Tensor]] = None  # θ + δ of the looped points, reused

    def __enter__(self) -> "PointEvaluator":
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(torch.no_grad())
        self._stack.enter_context(self.loss.mode(self.space.model))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._stack, self._out = None, None

    def _point(self, delta: Direction, out: Optional[Direction] = None) -> torch.Tensor:
        """[L(θ + Pδ), number correct (NaN when the task has no accuracy)] for one offset."""
        model, loss = self.space.model, self.loss
        value, correct, has_accuracy = 0.0, 0.0, True
        with self.space.at(delta, out=out):
            for batch, w in zip(loss.on(next(iter(delta.values())).device), loss.weights):
                v, c = loss.batch_outputs(model, batch)
                value = value + v * (w / loss.total)
                if c is None:
                    has_accuracy = False
                else:
                    correct = correct + c
        accuracy = correct / loss.total if has_accuracy else torch.tensor(float("nan"))
        return torch.stack([torch.as_tensor(value, dtype=torch.float64), torch.as_tensor(accuracy, dtype=torch.float64)])

    def _looped(self, offsets: Direction, count: int) -> torch.Tensor:
        if self._out is None:
            self._out = {n: torch.empty_like(offsets[n][0]) for n in self.space.parameter_names}
        return torch.stack([self._point({n: t[i] for n, t in offsets.items()}, self._out) for i in range(count)])

    def __call__(self, offsets: Direction) -> tuple[np.ndarray, np.ndarray]:
        """Losses and accuracies (NaN: none) at the offsets stacked along dim 0 of every tensor."""
        if self._stack is None:
            raise RuntimeError("use the evaluator inside `with PointEvaluator(space, loss) as evaluate:`")
        count = next(iter(offsets.values())).shape[0]
        out = None
        if count > 1 and self.vectorized is not False:
            try:
                start = time.perf_counter()
                out = torch.func.vmap(self._point)(offsets)
                per_point = (time.perf_counter() - start) / count
            except Exception as exc:  # noqa: BLE001 — any failure of the first vmap means "not vmappable"
                if self.vectorized:
                    raise
                self.vectorized, self.fallback_reason = False, f"{type(exc).__name__}: {exc}"
            else:
                if self.vectorized is None and self.timed:  # first chunk: keep vmap if it beats the loop
                    start = time.perf_counter()
                    self._looped(offsets, 1)
                    looped = time.perf_counter() - start
                    if per_point >= looped:
                        self.fallback_reason = f"vmap {per_point * 1e3:.1f} ms per point, loop {looped * 1e3:.1f} ms"
                self.vectorized = self.fallback_reason is None
        if out is None:
            out = self._looped(offsets, count)
        out = out.cpu().numpy()
        return out[:, 0], out[:, 1]
