"""Hessian-vector products of a :class:`landscape.Loss` in a :class:`landscape.Space`, batch by batch.

A backend computes, for a list B of (index b, batch, weight w_b = n_b / N),

    H_B v = Σ_{b ∈ B} w_b ∇²_δ ℓ_b(θ + Pδ)|_{δ=0} v,

with ℓ_b the batch's mean loss and P the space's projection. B is every batch, or one rank's share
under ``torchrun`` (:class:`landscape.hessian.operator.HessianOperator` chooses, and sums the ranks'
parts). Three backends:

* :class:`DoubleBackward` (``"double-backward"``, the default) — H_B v = ∂(g·v)/∂δ with g = ∇_δ ℓ
  (Pearlmutter 1994). Per list of batches one ``autograd.grad(create_graph=True)`` builds the
  gradient's graph once; every product is then one double backward through it (DESIGN §6 measured
  1.2–1.4× a gradient per product, against 2.7–2.9× when forward and gradient are recomputed).
  ``keep_graphs`` limits how many batches keep their graph (memory); the others are recomputed for
  every product. :meth:`~HVPBackend.release` drops the kept graphs.
* :class:`ForwardOverReverse` (``"func"``) — ``torch.func.jvp`` of ``torch.func.grad``, recomputed for
  every product; for models whose ops support forward-mode AD.
* :class:`FiniteDifference` (``"finite-difference"``) — H_B v ≈ [g(θ + hv) − g(θ − hv)] / (2h), first
  derivatives only: for kernels without double backward. h = ``fd_step``/‖v‖, default ``fd_step`` =
  ε^{1/3}·max(1, ‖θ‖) (ε the dtype's epsilon): the error is O(h²) from truncation plus O(ε/h) from
  rounding; in fp32 expect about 1e-4 relative, in fp64 about 1e-8.

Dropout in a train-mode loss draws from ``rng_seed + b`` for batch b, inside ``torch.random.fork_rng``:
the same masks for every product (H is one fixed matrix), and the global RNG is left alone.
"""
from __future__ import annotations

import abc
from typing import Any, Iterable, Optional, Sequence

import torch

from .attention import EAGER_HINT
from ..loss import Loss
from ..space import Direction, Space

__all__ = ["BACKENDS", "HessianError", "HVPBackend", "DoubleBackward", "ForwardOverReverse", "FiniteDifference",
           "make_backend"]

BACKENDS = ("double-backward", "func", "finite-difference")

WeightedBatches = Sequence[tuple[int, Any, float]]  # (index b, batch on the model's device, w_b = n_b / N)


class HessianError(RuntimeError):
    """A Hessian-vector product cannot be computed (a kernel without the derivative it needs)."""


def _norm64(d: Direction) -> float:
    """‖d‖₂ over all tensors, accumulated in float64."""
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in d.values())))


def _scaled(w: float, d: Direction) -> Direction:
    """w·d."""
    return {n: w * t for n, t in d.items()}


def _sum(directions: Iterable[Direction], like: Direction) -> Direction:
    """Σ d over the directions; zeros shaped like ``like`` when there are none."""
    out = {n: torch.zeros_like(t) for n, t in like.items()}
    for d in directions:
        out = {n: out[n] + d[n] for n in out}
    return out


class HVPBackend(abc.ABC):
    """``backend(v, batches)`` = H_B v (see the module docstring) as a direction of ``space``.

    Attributes:
        name: the backend's name in :data:`BACKENDS`.
        second_order: whether the backend differentiates twice (then attention must be eager).
    """

    name: str
    second_order = True

    def __init__(self, loss: Loss, space: Space, *, rng_seed: int = 0):
        self.loss, self.space, self.rng_seed = loss, space, int(rng_seed)

    def __call__(self, v: Direction, batches: WeightedBatches) -> Direction:
        """H_B v; a kernel without a second derivative raises :class:`HessianError` saying what to do."""
        try:
            return self._hvp(v, batches)
        except (RuntimeError, NotImplementedError) as err:
            if not self.second_order or not any(s in str(err).lower() for s in ("not implemented", "not supported")):
                raise
            raise HessianError(
                f"backend {self.name!r} needs a derivative that a kernel of this model lacks ({err}). For attention: "
                f"{EAGER_HINT}; otherwise use backend='finite-difference'") from err

    @abc.abstractmethod
    def _hvp(self, v: Direction, batches: WeightedBatches) -> Direction:
        """H_B v, unchecked."""

    def release(self) -> None:
        """Drop whatever was kept between products (only :class:`DoubleBackward` keeps graphs)."""

    def loss_at(self, delta: Direction, index: int, batch) -> torch.Tensor:
        """ℓ_b(θ + Pδ); dropout (train-mode losses) from the seed ``rng_seed + b``, global RNG untouched."""
        device = next(iter(delta.values())).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), self.space.at(delta):
            torch.manual_seed(self.rng_seed + index)
            return self.loss.batch_value(self.space.model, batch)

    def leaf(self, values: Optional[Direction] = None) -> Direction:
        """δ (zeros unless ``values``) as fresh leaves that require grad."""
        base = self.space.zeros() if values is None else values
        return {n: base[n].detach().clone().requires_grad_(True) for n in self.space.names}

    def grad(self, delta: Direction, index: int, batch, *, create_graph: bool) -> Direction:
        """∇_δ ℓ_b at δ (zeros where ℓ_b does not depend on a coordinate)."""
        names = self.space.names
        grads = torch.autograd.grad(self.loss_at(delta, index, batch), [delta[n] for n in names],
                                    create_graph=create_graph, allow_unused=True, materialize_grads=True)
        return dict(zip(names, grads))


class DoubleBackward(HVPBackend):
    """H_B v = ∂(g·v)/∂δ, g = Σ_b w_b ∇ℓ_b built with its graph; the graph over the first
    ``keep_graphs`` batches (default: all) is kept until :meth:`release`."""

    name = "double-backward"

    def __init__(self, loss: Loss, space: Space, *, keep_graphs: Optional[int] = None, rng_seed: int = 0):
        if keep_graphs is not None and (int(keep_graphs) != keep_graphs or keep_graphs < 0):
            raise ValueError(f"keep_graphs must be None (all batches) or an integer >= 0, got {keep_graphs!r}")
        super().__init__(loss, space, rng_seed=rng_seed)
        self.keep_graphs = len(loss.batches) if keep_graphs is None else min(int(keep_graphs), len(loss.batches))
        self._graphs: dict[tuple[int, ...], tuple[Direction, Direction]] = {}

    def release(self) -> None:
        self._graphs.clear()

    def _gradient(self, batches: WeightedBatches) -> tuple[Direction, Direction]:
        """(δ, Σ_b w_b ∇ℓ_b at δ = 0) with the gradient's graph."""
        delta = self.leaf()
        grads = (_scaled(w, self.grad(delta, i, batch, create_graph=True)) for i, batch, w in batches)
        return delta, _sum(grads, delta)

    def _grad_dot(self, delta: Direction, g: Direction, v: Direction, *, retain: bool) -> Direction:
        """∂(g·v)/∂δ by double backward (zeros for coordinates g does not depend on)."""
        names = [n for n in self.space.names if g[n].requires_grad]
        if not names:
            return {n: torch.zeros_like(t) for n, t in delta.items()}
        hv = torch.autograd.grad([g[n] for n in names], list(delta.values()), grad_outputs=[v[n] for n in names],
                                 retain_graph=retain, allow_unused=True, materialize_grads=True)
        return dict(zip(delta, hv))

    def _hvp(self, v: Direction, batches: WeightedBatches) -> Direction:
        kept = [b for b in batches if b[0] < self.keep_graphs]
        parts = []
        if kept:
            key = tuple(i for i, *_ in kept)  # this rank's kept batches, or all of them
            if key not in self._graphs:
                self._graphs[key] = self._gradient(kept)
            parts.append(self._grad_dot(*self._graphs[key], v, retain=True))
        parts += [self._grad_dot(*self._gradient([b]), v, retain=False) for b in batches if b[0] >= self.keep_graphs]
        return _sum(parts, v)


class ForwardOverReverse(HVPBackend):
    """H_B v = Σ_b w_b · d/dt ∇ℓ_b(t v)|_{t=0} by ``torch.func.jvp`` of ``torch.func.grad``."""

    name = "func"

    def _hvp(self, v: Direction, batches: WeightedBatches) -> Direction:
        from torch.func import grad, jvp

        zeros = self.space.zeros()

        def hv(index: int, batch) -> Direction:
            return jvp(grad(lambda d: self.loss_at(d, index, batch)), (zeros,), (dict(v),))[1]

        return _sum((_scaled(w, hv(i, batch)) for i, batch, w in batches), v)


class FiniteDifference(HVPBackend):
    """H_B v ≈ Σ_b w_b [∇ℓ_b(hv) − ∇ℓ_b(−hv)] / (2h), h = ``fd_step``/‖v‖ (module docstring)."""

    name = "finite-difference"
    second_order = False

    def __init__(self, loss: Loss, space: Space, *, fd_step: Optional[float] = None, rng_seed: int = 0):
        if fd_step is not None and not fd_step > 0:
            raise ValueError(f"fd_step must be > 0, got {fd_step}")
        super().__init__(loss, space, rng_seed=rng_seed)
        point = space.point()
        eps = torch.finfo(next(iter(point.values())).dtype).eps
        self.fd_step = fd_step or eps ** (1 / 3) * max(1.0, _norm64(point))

    def _hvp(self, v: Direction, batches: WeightedBatches) -> Direction:
        norm = _norm64(v)
        if norm == 0.0:
            return _sum((), v)
        h = self.fd_step / norm
        terms = []
        for sign in (1.0, -1.0):
            delta = self.leaf({n: sign * h * t for n, t in v.items()})
            terms += [_scaled(sign * w / (2 * h), self.grad(delta, i, batch, create_graph=False))
                      for i, batch, w in batches]
        return _sum(terms, v)


def make_backend(name: str, loss: Loss, space: Space, *, keep_graphs: Optional[int] = None,
                 fd_step: Optional[float] = None, rng_seed: int = 0) -> HVPBackend:
    """The backend ``name`` (one of :data:`BACKENDS`); ``keep_graphs`` goes to double-backward, ``fd_step``
    to finite-difference, and each checks its own option.

    Raises:
        ValueError: an unknown name, or a bad option of the chosen backend.
    """
    if name == "double-backward":
        return DoubleBackward(loss, space, keep_graphs=keep_graphs, rng_seed=rng_seed)
    if name == "func":
        return ForwardOverReverse(loss, space, rng_seed=rng_seed)
    if name == "finite-difference":
        return FiniteDifference(loss, space, fd_step=fd_step, rng_seed=rng_seed)
    raise ValueError(f"unknown Hessian backend {name!r}; choose one of {BACKENDS}")
