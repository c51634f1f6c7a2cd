"""The Hessian of a loss in a parameter space, as a ``scipy.sparse.linalg.LinearOperator``.

For a :class:`landscape.Loss` over batches b with n_b samples (N = Σ n_b) and a space with
coordinates δ around the model's point θ (:func:`landscape.space`),

    H v = Σ_b (n_b / N) ∇²_δ ℓ_b(θ + Pδ)|_{δ=0} v,

with P the space's projection (the identity except for tangent / normal, where H is P H_merged P
in the ambient merged coordinates: zero on the complement). Three backends compute the product:

* ``"double-backward"`` (default) — Hv = ∂(∇ℓ·v)/∂δ (Pearlmutter 1994). Per batch one
  ``autograd.grad(create_graph=True)`` builds the gradient's graph once; every product is then one
  double backward through it (DESIGN §6 measured 1.2–1.4× a gradient per product, against 2.7–2.9×
  when forward and gradient are recomputed). ``keep_graphs`` limits how many batches keep their
  graph (memory); the others are recomputed for every product.
* ``"func"`` — ``torch.func.jvp`` of ``torch.func.grad`` (forward-over-reverse), recomputed for
  every product; for models whose ops support forward-mode AD.
* ``"finite-difference"`` — Hv ≈ [g(θ + hv) − g(θ − hv)] / (2h) with g the gradient (first order
  only: for kernels without double backward). h = ``fd_step``/‖v‖, default ``fd_step`` =
  ε^{1/3}·max(1, ‖θ‖) (ε the dtype's epsilon): the error is O(h²) from truncation plus O(ε/h) from
  rounding; in fp32 expect about 1e-4 relative, in fp64 about 1e-8.

Products run in the model's dtype (a ``model.double()`` copy gives fp64 Hessians); the scipy side is
float64. The model is never written: the space's ``at`` evaluates at θ + δ; the loss's mode (eval
unless asked) and, for Hugging Face models without twice-differentiable attention, eager attention
(:mod:`landscape.hessian.attention`) hold only inside :meth:`HessianOperator.session`, and the global
RNG is left alone (dropout in a train-mode loss draws from a fixed seed, the same masks for every
product, so H is one fixed matrix).

Under ``torchrun`` a single product (Lanczos, power iteration, SLQ) is averaged over data shards:
each rank takes every W-th batch and one all-reduce sums the parts, so every rank holds the same
H v and runs the same iteration. A block of products (``matmat``: Hutchinson, Hutch++) is split by
columns instead, each on all the data, and gathered once.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from tqdm.auto import tqdm

from flatlora import distributed

from ..guard import preserved
from .attention import EAGER_HINT, eager_attention, require_eager
from ..loss import Loss
from ..space import Space, space as build_space

__all__ = ["HessianOperator", "HessianError", "BACKENDS"]

BACKENDS = ("double-backward", "func", "finite-difference")


class HessianError(RuntimeError):
    """A Hessian-vector product cannot be computed (a kernel without the derivative it needs)."""


class HessianOperator(LinearOperator):
    """H (see the module docstring) of ``loss`` at the model's current parameters in ``space``.

    Args:
        model: the model.
        loss: a :class:`landscape.Loss`.
        space: a space kind (``"lora"``, ``"merged"``, ``"all"``, ``"tangent"``, ``"normal"``) or a ``Space``.
        backend: ``"double-backward"``, ``"func"`` or ``"finite-difference"``.
        include_trainable: add the other trainable parameters (a classifier head) to a LoRA space
            given by its kind (an error when ``space`` is already a ``Space``: build it with the flag).
        switch_attention: switch a Hugging Face model whose attention has no double backward (SDPA,
            flash) to eager attention inside sessions, with a warning; ``False`` raises instead.
        keep_graphs: how many batches keep their gradient graph across products (default: all).
        fd_step: the finite-difference step in the space's norm (default ε^{1/3}·max(1, ‖θ‖)).
        rng_seed: seed of the dropout masks when the loss is in train mode.

    Products outside a :meth:`session` work but rebuild every graph; inside one the graphs are kept.
    ``products`` counts the products made.

    Raises:
        ValueError / TypeError: bad arguments, before any forward pass.
        landscape.hessian.attention.AttentionError: ``switch_attention=False`` on a model whose
            attention has no double backward (double-backward and func backends).
    """

    def __init__(self, model: torch.nn.Module, loss: Loss, space="lora", *, backend: str = "double-backward",
                 include_trainable: bool = False, switch_attention: bool = True, keep_graphs: Optional[int] = None,
                 fd_step: Optional[float] = None, rng_seed: int = 0):
        if not isinstance(loss, Loss):
            raise TypeError(f"loss must be a landscape.Loss (e.g. Loss(task.batches('test', 64, limit=256))), "
                            f"got {type(loss).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown Hessian backend {backend!r}; choose one of {BACKENDS}")
        if keep_graphs is not None and (int(keep_graphs) != keep_graphs or keep_graphs < 0):
            raise ValueError(f"keep_graphs must be None (all batches) or an integer >= 0, got {keep_graphs!r}")
        if fd_step is not None and not fd_step > 0:
            raise ValueError(f"fd_step must be > 0, got {fd_step}")
        if isinstance(space, Space):
            if space.model is not model:
                raise ValueError("the space was built for another model")
            if include_trainable:
                raise ValueError("include_trainable applies when the space is given by its kind; "
                                 "build the Space with landscape.space(model, kind, include_trainable=True)")
            self.space = space
        else:
            self.space = build_space(model, space, include_trainable=include_trainable)
        self.model, self.loss, self.backend = model, loss, backend
        self.switch_attention = bool(switch_attention)
        if backend != "finite-difference" and not self.switch_attention:
            require_eager(model)
        point = self.space.point()
        dtypes = sorted({str(t.dtype) for t in point.values()})
        if len(dtypes) > 1:
            raise TypeError(f"the {self.space.kind!r} space mixes dtypes {dtypes}; cast the model to one dtype "
                            "(model.float(), or a model.double() copy for fp64 Hessians)")
        first = point[self.space.names[0]]
        self.dtype_torch, self.device = first.dtype, first.device
        if backend == "finite-difference":
            theta = float(torch.sqrt(sum((t.double() ** 2).sum() for t in point.values())))
            self.fd_step = fd_step or float(torch.finfo(self.dtype_torch).eps) ** (1 / 3) * max(1.0, theta)
        self.keep_graphs = len(loss.batches) if keep_graphs is None else min(int(keep_graphs), len(loss.batches))
        self.rng_seed = int(rng_seed)
        self.products = 0
        self._session: Optional[dict] = None
        super().__init__(dtype=np.float64, shape=(self.space.dim, self.space.dim))

    # --- public helpers ------------------------------------------------------------------------------
    @property
    def space_name(self) -> str:
        """The space's kind, with ``+trainable`` when other trainable parameters were added."""
        return self.space.kind + ("+trainable" if self.space.include_trainable else "")

    def to_direction(self, vector: np.ndarray) -> dict[str, torch.Tensor]:
        """A flat vector of this operator's coordinates as a direction dict of the space (model dtype)."""
        return {n: t.clone() for n, t in self.space.from_vector(
            torch.as_tensor(vector).to(device=self.device, dtype=self.dtype_torch)).items()}

    @contextlib.contextmanager
    def session(self, desc: str = "Hessian-vector products", total: Optional[int] = None,
                progress: bool = False) -> Iterator["HessianOperator"]:
        """Within the session: the loss's mode, eager attention where needed, and kept gradient graphs;
        on exit the graphs are released and the model is as before (:func:`landscape.preserved`:
        modes, flags, RNG, parameters). Sessions nest (the outer one holds)."""
        if self._session is not None:
            yield self
            return
        with contextlib.ExitStack() as stack:
            stack.enter_context(preserved(self.model))
            if self.backend != "finite-difference":
                stack.enter_context(eager_attention(self.model, switch=self.switch_attention))
            stack.enter_context(self.loss.mode(self.model))
            bar = stack.enter_context(tqdm(total=total, desc=desc, unit="hvp", disable=not progress,
                                           dynamic_ncols=True, leave=False))
            self._session = {"bar": bar, "graphs": {}, "shard_data": True}
            try:
                yield self
            finally:
                self._session = None

    # --- the product ---------------------------------------------------------------------------------
    def _matmat(self, X: np.ndarray) -> np.ndarray:
        """H X. Under ``torchrun`` the columns are split across ranks (each product on all the data
        on one rank, no communication per product) and gathered once; in one process, column by column."""
        if distributed.world_size() == 1 or X.shape[1] < 2:
            return super()._matmat(X)  # LinearOperator's: one matvec per column
        if self._session is None:
            with self.session():
                return self._matmat(X)
        mine = distributed.shard(range(X.shape[1]))
        self._session["shard_data"] = False
        try:
            local = {j: self._matvec(X[:, j]) for j in mine}
        finally:
            self._session["shard_data"] = True
        out = np.empty((X.shape[0], X.shape[1]), dtype=np.float64)
        for part in distributed.all_gather_objects(local):
            for j, column in part.items():
                out[:, j] = column
        self.products += X.shape[1] - len(mine)  # count every column once, whichever rank made it
        return out

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        if self._session is None:
            with self.session():
                return self._matvec(x)
        v = self.space.from_vector(torch.as_tensor(np.ascontiguousarray(x).reshape(-1)).to(
            device=self.device, dtype=self.dtype_torch))
        try:
            hv = {"double-backward": self._double_backward, "func": self._func,
                  "finite-difference": self._finite_difference}[self.backend](v)
        except (RuntimeError, NotImplementedError) as err:
            if self.backend == "finite-difference" or not any(
                    s in str(err).lower() for s in ("not implemented", "not supported")):
                raise
            raise HessianError(
                f"backend {self.backend!r} needs a derivative that a kernel of this model lacks ({err}). For attention: "
                f"{EAGER_HINT}; otherwise use backend='finite-difference'") from err
        vector = self.space.to_vector(hv)
        if self._session["shard_data"]:
            distributed.all_reduce_sum_([vector])  # Σ over the ranks' batches
        self.products += 1
        self._session["bar"].update(1)
        return vector.to(device="cpu", dtype=torch.float64).numpy()

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:  # H is symmetric
        return self._matvec(x)

    def _batches(self):
        """(index, batch, weight n_b / N) for every batch, on the model's device — under ``torchrun``
        this rank's share (every W-th batch) unless a product runs on all the data (:meth:`_matmat`)."""
        batches = list(enumerate(zip(self.loss.on(self.device), self.loss.weights)))
        for i, (batch, n) in (distributed.shard(batches) if self._session["shard_data"] else batches):
            yield i, batch, n / self.loss.total

    def _loss_at(self, delta: dict, index: int, batch) -> torch.Tensor:
        """ℓ_b(θ + Pδ); dropout (train-mode losses) from a fixed seed per batch, global RNG untouched."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.space.at(delta):
            torch.manual_seed(self.rng_seed + index)
            return self.loss.batch_value(self.model, batch)

    def _grad(self, delta: dict, index: int, batch, create_graph: bool) -> list[torch.Tensor]:
        """∇_δ ℓ_b at δ (zeros where ℓ_b does not depend on a coordinate)."""
        leaves = [delta[n] for n in self.space.names]
        return list(torch.autograd.grad(self._loss_at(delta, index, batch), leaves, create_graph=create_graph,
                                        allow_unused=True, materialize_grads=True))

    def _leaf(self, values: Optional[dict] = None) -> dict:
        base = self.space.zeros() if values is None else values
        return {n: base[n].detach().clone().requires_grad_(True) for n in self.space.names}

    @staticmethod
    def _grad_dot(grads: list[torch.Tensor], delta: dict, names: list[str], v: dict, retain: bool) -> list[torch.Tensor]:
        """∂(g·v)/∂δ by double backward (zeros for coordinates g does not depend on)."""
        pairs = [(g, v[n]) for g, n in zip(grads, names) if g.requires_grad]
        if not pairs:
            return [torch.zeros_like(delta[n]) for n in names]
        return list(torch.autograd.grad([g for g, _ in pairs], [delta[n] for n in names],
                                        grad_outputs=[u for _, u in pairs], retain_graph=retain,
                                        allow_unused=True, materialize_grads=True))

    def _double_backward(self, v: dict) -> dict:
        names = self.space.names
        session = self._session
        graph = session["graphs"].get(session["shard_data"])  # this rank's batches, or all of them
        if graph is None and self.keep_graphs > 0:  # Σ_b w_b ∇ℓ_b over the kept batches, once
            delta = self._leaf()
            total = None
            for i, batch, w in self._batches():
                if i >= self.keep_graphs:
                    break
                g = [w * t for t in self._grad(delta, i, batch, create_graph=True)]
                total = g if total is None else [a + b for a, b in zip(total, g)]
            graph = session["graphs"][session["shard_data"]] = (delta, total)
        out = [torch.zeros_like(v[n]) for n in names]
        if self.keep_graphs > 0 and graph[1] is not None:
            delta, total = graph
            out = self._grad_dot(total, delta, names, v, retain=True)
        for i, batch, w in self._batches():
            if i < self.keep_graphs:
                continue
            delta = self._leaf()
            hv = self._grad_dot(self._grad(delta, i, batch, create_graph=True), delta, names, v, retain=False)
            out = [a + w * b for a, b in zip(out, hv)]
        return dict(zip(names, out))

    def _func(self, v: dict) -> dict:
        from torch.func import grad, jvp

        names = self.space.names
        zeros = self.space.zeros()
        out = {n: torch.zeros_like(v[n]) for n in names}
        for i, batch, w in self._batches():
            _, hv = jvp(grad(lambda d: self._loss_at(d, i, batch)), (zeros,), (dict(v),))
            out = {n: out[n] + w * hv[n] for n in names}
        return out

    def _finite_difference(self, v: dict) -> dict:
        names = self.space.names
        norm = float(torch.sqrt(sum((v[n].double() ** 2).sum() for n in names)))
        if norm == 0.0:
            return {n: torch.zeros_like(v[n]) for n in names}
        h = self.fd_step / norm
        out = {n: torch.zeros_like(v[n]) for n in names}
        for sign in (1.0, -1.0):
            delta = self._leaf({n: sign * h * v[n] for n in names})
            for i, batch, w in self._batches():
                g = self._grad(delta, i, batch, create_graph=False)
                out = {n: out[n] + (sign * w / (2 * h)) * t for n, t in zip(names, g)}
        return out
