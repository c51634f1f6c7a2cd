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
import weakref
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from flatlora import distributed

from .loss import Loss
from .space import Direction, Space

__all__ = ["value_and_grad", "PointEvaluator", "Combinations", "VMAP_MAX_FLOATS", "VMAP_MAX_POINT_SECONDS"]

#: the auto choice of points per vectorized forward keeps P · dim under this many floats
VMAP_MAX_FLOATS = 2**24
_MAX_POINTS = 32
#: a looped point slower than this (seconds) decides for the loop without trying vmap: the forward's
#: arithmetic dominates (MiniLM on CPU: tens of ms per point; digits-mlp: well under 1 ms)
VMAP_MAX_POINT_SECONDS = 0.02
#: model -> {(space kind, dim, dtype, device, batches, samples, train mode, points per call): (vectorized, reason)}
_DECISIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


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


class Combinations(Mapping[str, torch.Tensor]):
    """The offsets δ_p = Σ_j c_pj d_j for the rows c_p of ``coeffs`` (P × J), d_j = ``basis[j]``, as a
    mapping name → stacked offsets (P × shape), each made on first access as one product C·[d₁; …; d_J]
    (``flat``: the directions flattened and stacked per name, J × numel, when the caller keeps them).
    :class:`PointEvaluator` loops over the points without making them (module docstring)."""

    def __init__(self, coeffs: np.ndarray, basis: Sequence[Direction], flat: Optional[Direction] = None):
        self.coeffs = np.atleast_2d(np.asarray(coeffs, dtype=float))
        self.basis = list(basis)
        self._flat = flat
        self._made: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._made:
            flat = (torch.stack([d[name].reshape(-1) for d in self.basis]) if self._flat is None
                    else self._flat[name])
            c = torch.as_tensor(self.coeffs, dtype=flat.dtype, device=flat.device)
            self._made[name] = (c @ flat).view(len(self.coeffs), *self.basis[0][name].shape)
        return self._made[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.basis[0])

    def __len__(self) -> int:
        return len(self.basis[0])


class PointEvaluator:
    """L and accuracy at many offsets of one space, ``points_per_call`` per forward where that pays.

    With ``batch_points=None`` it decides between ``torch.func.vmap`` and a loop on the first chunk of
    points, at no extra evaluation, and remembers the decision per model (see the module docstring);
    an explicit ``batch_points > 1`` always vectorizes unless vmap fails. Either way the numbers are
    the same.

    Use it as a context manager: inside, gradients are off and the model is in the loss's mode (set
    once for all the points, not per point)::

        with PointEvaluator(space, loss) as evaluate:
            losses, accuracies = evaluate(offsets)

    Args:
        space, loss: where and what to evaluate.
        batch_points: points per vectorized forward; ``None`` picks min(32, 2**24 // dim) and decides
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
        first = next(iter(space.point().values()))
        self._key = (space.kind, space.dim, first.dtype, first.device, len(loss.batches), loss.total, loss.train_mode,
                     self.points_per_call)
        if self.timed and self.vectorized is None:
            self.vectorized, self.fallback_reason = _DECISIONS.get(space.model, {}).get(self._key, (None, None))
        self._stack: Optional[contextlib.ExitStack] = None
        self._out: Optional[dict[str, torch.Tensor]] = None  # θ + δ of the looped points, reused
        self._theta: Optional[Direction] = None  # θ of the parameter coordinates (the model's, not copied)
        self._row: Optional[tuple] = None  # (directions, leading coefficients) of the row base
        self._base: dict[str, torch.Tensor] = {}  # θ + Σ_{j<J} c_j d_j of the current grid row

    def __enter__(self) -> "PointEvaluator":
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(torch.no_grad())
        self._stack.enter_context(self.loss.mode(self.space.model))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._stack, self._out, self._theta, self._row, self._base = None, None, None, None, {}

    def _point(self, delta: Direction, out: Optional[Direction] = None, filled: bool = False) -> torch.Tensor:
        """[L(θ + Pδ), number correct (NaN when the task has no accuracy)] for one offset."""
        model, loss = self.space.model, self.loss
        value, correct, has_accuracy = 0.0, 0.0, True
        with self.space.at(delta, out=out, filled=filled):
            for batch, w in zip(loss.on(next(iter(delta.values())).device), loss.weights):
                v, c = loss.batch_outputs(model, batch)
                value = value + v * (w / loss.total)
                if c is None:
                    has_accuracy = False
                else:
                    correct = correct + c
        accuracy = correct / loss.total if has_accuracy else torch.tensor(float("nan"))
        return torch.stack([torch.as_tensor(value, dtype=torch.float64), torch.as_tensor(accuracy, dtype=torch.float64)])

    def _buffers(self, like: Direction) -> Direction:
        """Reused tensors that receive θ + δ of a looped point, one per parameter coordinate."""
        if self._out is None:
            self._out = {n: torch.empty_like(like[n]) for n in self.space.parameter_names}
        return self._out

    def _looped(self, offsets: Mapping[str, torch.Tensor], start: int, stop: int) -> torch.Tensor:
        """Points ``start`` … ``stop − 1`` one at a time; a :class:`Combinations` without making its offsets."""
        if not isinstance(offsets, Combinations):
            out = self._buffers({n: t[0] for n, t in offsets.items()})
            return torch.stack([self._point({n: t[i] for n, t in offsets.items()}, out) for i in range(start, stop)])
        basis = offsets.basis
        out = self._buffers(basis[0])
        rows = []
        for c in offsets.coeffs[start:stop]:
            base = self._row_base(basis, c[:-1])
            delta = {n: sum(float(x) * d[n] for x, d in zip(c, basis)) for n in self.space.merged_names}
            for n in self.space.parameter_names:
                delta[n] = torch.add(base[n], basis[-1][n], alpha=float(c[-1]), out=out[n])
            rows.append(self._point(delta, out, filled=True))
        return torch.stack(rows)

    def _decide(self, vectorized: bool, reason: Optional[str]) -> None:
        self.vectorized, self.fallback_reason = vectorized, reason
        if self.timed:
            _DECISIONS.setdefault(self.space.model, {})[self._key] = (vectorized, reason)

    def __call__(self, offsets: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Losses and accuracies (NaN: none) at the offsets stacked along dim 0 of every tensor (a dict, or
        a :class:`Combinations` of directions)."""
        if self._stack is None:
            raise RuntimeError("use the evaluator inside `with PointEvaluator(space, loss) as evaluate:`")
        count = len(offsets.coeffs) if isinstance(offsets, Combinations) else next(iter(offsets.values())).shape[0]
        parts, done = [], 0
        if count > 1 and self.vectorized is None and self.timed:  # decide on this chunk (module docstring)
            start = time.perf_counter()
            parts.append(self._looped(offsets, 0, 1))
            looped, done = time.perf_counter() - start, 1
            if looped > VMAP_MAX_POINT_SECONDS:
                self._decide(False, f"a looped point takes {looped * 1e3:.0f} ms (> {VMAP_MAX_POINT_SECONDS * 1e3:.0f}"
                                    " ms: arithmetic dominates); vmap not tried")
        if count > done and self.vectorized is not False:
            rest = {n: t[done:] for n, t in offsets.items()}
            try:
                start = time.perf_counter()
                parts.append(torch.func.vmap(self._point)(rest))
                per_point = (time.perf_counter() - start) / (count - done)
            except Exception as exc:  # noqa: BLE001 — any failure of the first vmap means "not vmappable"
                if self.vectorized:
                    raise
                self._decide(False, f"{type(exc).__name__}: {exc}")
            else:
                if self.vectorized is None:
                    faster = not (self.timed and per_point >= looped)
                    self._decide(faster, None if faster else
                                 f"vmap {per_point * 1e3:.1f} ms per point, loop {looped * 1e3:.1f} ms")
                done = count
        if count > done:
            parts.append(self._looped(offsets, done, count))
        out = torch.cat(parts).cpu().numpy()
        return out[:, 0], out[:, 1]

    def _row_base(self, basis: Sequence[Direction], leading: np.ndarray) -> Direction:
        """θ + Σ_{j<J} c_j d_j of the parameter coordinates (θ itself for J = 1), computed once per grid row
        (per directions and leading coefficients)."""
        if self._theta is None:
            point = self.space.point()
            self._theta = {n: point[n] for n in self.space.parameter_names}
        if len(leading) == 0:
            return self._theta
        key = (tuple(id(d) for d in basis), tuple(float(x) for x in leading))
        if key != self._row:
            for n, theta in self._theta.items():
                if n not in self._base:
                    self._base[n] = torch.empty_like(theta)
                torch.add(theta, basis[0][n], alpha=float(leading[0]), out=self._base[n])
                for x, d in zip(leading[1:], basis[1:]):
                    self._base[n].add_(d[n], alpha=float(x))
            self._row = key
        return self._base
