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
  rounding; in fp32 expect about 1e-4 relative, in fp64 about 1e-8 — for a smooth loss. It is
  **unreliable on piecewise-linear networks** (ReLU, max-pooling, absolute values): a step of h
  crosses kinks of some units, where the gradient jumps, so the difference measures those jumps and
  not the Hessian (on digits-mlp with ReLU, λ₁ 0.375 against 0.148 from double backward). Its first
  product is therefore checked once against one double-backward product where the model allows one
  (:meth:`FiniteDifference.check`), with a ``UserWarning`` when they differ by more than
  :attr:`FiniteDifference.CHECK_RTOL`; a model whose kernels lack double backward is not checked.

Dropout in a train-mode loss draws from ``rng_seed + b`` for batch b, inside ``torch.random.fork_rng``:
the same masks for every product (H is one fixed matrix), and the global RNG is left alone.

A block of products H_B [v₁ … v_b] (:meth:`HVPBackend.block`; block estimators such as XTrace and Hutch++
ask for one) is, by default, a loop of single products. Two backends batch it: double backward
differentiates g·vⱼ for all b tangents in one vectorized backward pass through the kept graph
(``torch.autograd.grad(..., is_grads_batched=True)``, which is ``torch.func.vmap`` over the columns), and
``func`` maps ``jvp(grad(ℓ))`` over the columns with ``torch.func.vmap``. Both give the loop's numbers
(to rounding); which is faster depends on the model (``analysis_scripts/benchmarks/bench_hessian.py``
records both), and :class:`~landscape.hessian.operator.HessianOperator`'s ``block_products`` option chooses.
"""
from __future__ import annotations

import abc
import itertools
import warnings
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
    """Σ d over the directions (the first one itself when it is alone: no extra operation in a graph);
    zeros shaped like ``like`` when there are none."""
    out = None
    for d in directions:
        out = d if out is None else {n: out[n] + d[n] for n in out}
    return {n: torch.zeros_like(t) for n, t in like.items()} if out is None else out


class HVPBackend(abc.ABC):
    """``backend(v, batches)`` = H_B v (see the module docstring) as a direction of ``space``.

    Attributes:
        name: the backend's name in :data:`BACKENDS`.
        second_order: whether the backend differentiates twice (then attention must be eager).
        batched: whether :meth:`block` is one batched computation rather than a loop of products.
    """

    name: str
    second_order = True
    batched = False

    def __init__(self, loss: Loss, space: Space, *, rng_seed: int = 0):
        self.loss, self.space, self.rng_seed = loss, space, int(rng_seed)
        self._zeros: Optional[Direction] = None

    def zeros(self) -> Direction:
        """The space's zero direction, made once (a merged space computes W + sBA to make it)."""
        if self._zeros is None:
            self._zeros = self.space.zeros()
        return self._zeros

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

    def block(self, V: Direction, batches: WeightedBatches) -> Direction:
        """H_B vⱼ for the b directions stacked along dim 0 of every tensor of ``V``, stacked the same way.
        A batched form that fails (an operation without a batching rule, dropout under ``vmap``) raises
        as it is: :class:`~landscape.hessian.operator.HessianOperator` then falls back to the loop."""
        return self._block(V, batches)

    @abc.abstractmethod
    def _hvp(self, v: Direction, batches: WeightedBatches) -> Direction:
        """H_B v, unchecked."""

    def _block(self, V: Direction, batches: WeightedBatches) -> Direction:
        """:meth:`block`: one product per direction."""
        count = next(iter(V.values())).shape[0]
        columns = [self({n: t[j] for n, t in V.items()}, batches) for j in range(count)]
        return {n: torch.stack([c[n] for c in columns]) for n in V}

    def release(self) -> None:
        """Drop whatever was kept between products (only :class:`DoubleBackward` keeps graphs)."""

    def doubt(self) -> Optional[str]:
        """Why this backend's products may be wrong, once a check has shown it (``None``: no such
        evidence). An algorithm that then fails to converge names this cause rather than its own
        settings (see :func:`landscape.hessian.operator.run_on_hessian`)."""
        return None

    def loss_at(self, delta: Direction, index: int, batch) -> torch.Tensor:
        """ℓ_b(θ + Pδ); dropout (train-mode losses) from the seed ``rng_seed + b``, global RNG untouched.
        An eval-mode loss draws nothing: no RNG is forked or seeded (``torch.manual_seed`` costs more than a
        small model's forward pass)."""
        if not self.loss.train_mode:
            with self.space.at(delta):
                return self.loss.batch_value(self.space.model, batch)
        device = next(iter(delta.values())).device
        cuda = device.type == "cuda"
        with torch.random.fork_rng(devices=[device] if cuda else []), self.space.at(delta):
            torch.default_generator.manual_seed(self.rng_seed + index)
            if cuda:
                index_of = torch.cuda.current_device() if device.index is None else device.index
                torch.cuda.default_generators[index_of].manual_seed(self.rng_seed + index)
            return self.loss.batch_value(self.space.model, batch)

    def leaf(self, values: Optional[Direction] = None) -> Direction:
        """δ (zeros unless ``values``) as fresh leaves that require grad."""
        base = self.zeros() if values is None else values
        return {n: base[n].detach().clone().requires_grad_(True) for n in self.space.names}

    def grad(self, delta: Direction, index: int, batch, *, create_graph: bool, weight: float = 1.0) -> Direction:
        """∇_δ (w ℓ_b) at δ (zeros where ℓ_b does not depend on a coordinate); the weight scales the loss, one
        operation, rather than every gradient tensor."""
        names = self.space.names
        value = self.loss_at(delta, index, batch)
        grads = torch.autograd.grad(value if weight == 1.0 else weight * value, [delta[n] for n in names],
                                    create_graph=create_graph, allow_unused=True, materialize_grads=True)
        return dict(zip(names, grads))


class _BatchedBackend(HVPBackend):
    """A backend whose block is one batched computation, :meth:`_products` with ``batched=True``."""

    batched = True

    @abc.abstractmethod
    def _products(self, v: Direction, batches: WeightedBatches, *, batched: bool) -> Direction:
        """H_B v, or with ``batched`` H_B vⱼ for the directions stacked along dim 0 of v."""

    def _hvp(self, v: Direction, batches: WeightedBatches) -> Direction:
        return self._products(v, batches, batched=False)

    def _block(self, V: Direction, batches: WeightedBatches) -> Direction:
        return self._products(V, batches, batched=True)


class DoubleBackward(_BatchedBackend):
    """H_B v = ∂(g·v)/∂δ, g = Σ_b w_b ∇ℓ_b built with its graph; the graph over the first
    ``keep_graphs`` batches (default: all) is kept until :meth:`release`. A block is one vectorized
    backward pass per graph."""

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
        grads = (self.grad(delta, i, batch, create_graph=True, weight=w) for i, batch, w in batches)
        return delta, _sum(grads, delta)

    @staticmethod
    def _grad_dot(delta: Direction, g: Direction, v: Direction, *, retain: bool, batched: bool) -> Direction:
        """∂(g·v)/∂δ by double backward (zeros for coordinates g does not depend on); ``batched``: for each
        of the directions stacked along dim 0 of v, in one vectorized backward pass."""
        names = [n for n in g if g[n].requires_grad]
        hv = torch.autograd.grad([g[n] for n in names], list(delta.values()), grad_outputs=[v[n] for n in names],
                                 retain_graph=retain, allow_unused=True, is_grads_batched=batched) if names else ()
        lead = next(iter(v.values())).shape[:1] if batched else ()
        return {n: h if h is not None else t.new_zeros(lead + t.shape)
                for (n, t), h in itertools.zip_longest(delta.items(), hv)}

    def _products(self, v: Direction, batches: WeightedBatches, *, batched: bool) -> Direction:
        kept = [b for b in batches if b[0] < self.keep_graphs]
        parts = []
        if kept:
            key = tuple(i for i, *_ in kept)  # this rank's kept batches, or all of them
            if key not in self._graphs:
                self._graphs[key] = self._gradient(kept)
            parts.append(self._grad_dot(*self._graphs[key], v, retain=True, batched=batched))
        parts += [self._grad_dot(*self._gradient([b]), v, retain=False, batched=batched)
                  for b in batches if b[0] >= self.keep_graphs]
        return _sum(parts, v)


class ForwardOverReverse(_BatchedBackend):
    """H_B v = Σ_b w_b · d/dt ∇ℓ_b(t v)|_{t=0} by ``torch.func.jvp`` of ``torch.func.grad``; a block maps
    it over the directions with ``torch.func.vmap``."""

    name = "func"

    def _products(self, v: Direction, batches: WeightedBatches, *, batched: bool) -> Direction:
        from torch.func import grad, jvp, vmap

        zeros = self.zeros()

        def hv(index: int, batch) -> Direction:
            product = lambda u: jvp(grad(lambda d: self.loss_at(d, index, batch)), (zeros,), (u,))[1]  # noqa: E731
            return (vmap(product) if batched else product)(dict(v))

        return _sum((_scaled(w, hv(i, batch)) for i, batch, w in batches), v)



class FiniteDifference(HVPBackend):
    """H_B v ≈ Σ_b w_b [∇ℓ_b(hv) − ∇ℓ_b(−hv)] / (2h), h = ``fd_step``/‖v‖ (module docstring); the first
    product is checked against double backward where that is possible (:meth:`check`)."""

    name = "finite-difference"
    second_order = False
    CHECK_RTOL = 1e-2  # ‖fd − exact‖ / ‖exact‖ above which the first product warns (smooth fp32: ~1e-4)

    def __init__(self, loss: Loss, space: Space, *, fd_step: Optional[float] = None, rng_seed: int = 0):
        if fd_step is not None and not fd_step > 0:
            raise ValueError(f"fd_step must be > 0, got {fd_step}")
        super().__init__(loss, space, rng_seed=rng_seed)
        point = space.point()
        eps = torch.finfo(next(iter(point.values())).dtype).eps
        self.fd_step = fd_step or eps ** (1 / 3) * max(1.0, _norm64(point))
        self.checked = False
        self.check_error: Optional[float] = None

    def _hvp(self, v: Direction, batches: WeightedBatches) -> Direction:
        hv = self._difference(v, batches)
        if not self.checked:
            self.checked = True
            self.check(v, hv, batches)
        return hv

    def check(self, v: Direction, hv: Direction, batches: WeightedBatches) -> Optional[float]:
        """‖hv − H_B v‖ / ‖H_B v‖ with H_B v from one double-backward product (one extra product, made
        once per backend), warning when it exceeds :attr:`CHECK_RTOL`; ``None`` when the model's kernels
        have no double backward (nothing to compare with)."""
        try:
            exact = DoubleBackward(self.loss, self.space, keep_graphs=0, rng_seed=self.rng_seed)._hvp(v, batches)
        except (RuntimeError, NotImplementedError):
            return None
        scale = _norm64(exact)
        error = _norm64({n: hv[n] - exact[n] for n in hv}) / scale if scale > 0 else _norm64(hv)
        self.check_error = error
        if error > self.CHECK_RTOL:
            warnings.warn(self.doubt(), stacklevel=2)
        return error

    def doubt(self) -> Optional[str]:
        if self.check_error is None or not self.check_error > self.CHECK_RTOL:
            return None
        return (f"backend='finite-difference' differs from double backward by {self.check_error:.1%} (relative) on "
                f"its first Hessian-vector product (fd_step {self.fd_step:.3g}): finite differences are unreliable "
                "where the loss is not smooth at the step's scale — piecewise-linear activations (ReLU, max-pooling) "
                "put kinks there. Use backend='double-backward' (or 'func'), or a smooth activation.")

    def _difference(self, v: Direction, batches: WeightedBatches) -> Direction:
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
