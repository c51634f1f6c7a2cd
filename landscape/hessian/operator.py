"""The Hessian of a loss in a parameter space, as a ``scipy.sparse.linalg.LinearOperator``.

For a :class:`landscape.Loss` over batches b with n_b samples (N = Σ n_b) and a space with
coordinates δ around the model's point θ (:func:`landscape.space`),

    H v = Σ_b (n_b / N) ∇²_δ ℓ_b(θ + Pδ)|_{δ=0} v,

with P the space's projection (the identity except for tangent / normal, where H is P H_merged P
in the ambient merged coordinates: zero on the complement). A backend of
:mod:`landscape.hessian.products` computes the sum over a list of batches: double backward (the
default, with the gradient's graph kept across products), ``torch.func`` forward-over-reverse, or
central finite differences of the gradient.

Products run in the model's dtype (a ``model.double()`` copy gives fp64 Hessians); the scipy side is
float64. The model is never written: the space's ``at`` evaluates at θ + δ; the loss's mode (eval
unless asked) and, for Hugging Face models without twice-differentiable attention, eager attention
(:mod:`landscape.hessian.attention`) hold only inside a session (:func:`product_session`), and the
global RNG is left alone (dropout in a train-mode loss draws from a fixed seed, the same masks for
every product, so H is one fixed matrix).

Under ``torchrun`` a single product (Lanczos, power iteration, SLQ) is averaged over data shards
(:func:`rank_batches`): each rank takes every W-th batch and one all-reduce sums the parts, so every
rank holds the same H v and runs the same iteration. A block of products (``matmat``: XTrace,
Hutch++, Hutchinson) is split by columns instead (:func:`split_columns`), each on all the data, and
gathered once. A rank's block is one batched computation of the backend (``block_products="batched"``,
:meth:`~landscape.hessian.products.HVPBackend.block`: a vectorized double backward, or ``vmap`` of
forward-over-reverse) or a loop of single products (``"loop"``); ``"auto"`` batches where the backend
can and falls back to the loop, for good, at the first failure (an operation without a batching rule).

:func:`run_on_hessian` is what every front-end (:func:`landscape.hessian_eigenvalues`,
:func:`~landscape.hessian_trace`, :func:`~landscape.hessian_density`, :func:`~landscape.dense_hessian`)
does: build the operator, run an algorithm on it in one session, and time it.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn
from tqdm.auto import tqdm

from flatlora import distributed

from ..guard import preserved
from ..loss import Loss, require_loss
from ..space import Direction, Selector, Space, as_space, space as build_space
from .attention import eager_attention, require_eager
from .products import BACKENDS, HessianError, make_backend

__all__ = ["HessianOperator", "HessianError", "BACKENDS", "BLOCK_PRODUCTS", "product_session", "rank_batches",
           "split_columns", "HessianRun", "run_on_hessian"]

BLOCK_PRODUCTS = ("auto", "batched", "loop")

T = TypeVar("T")


@contextlib.contextmanager
def product_session(model: nn.Module, loss: Loss, *, second_order: bool, switch_attention: bool,
                    desc: str = "Hessian-vector products", total: Optional[int] = None,
                    progress: bool = False) -> Iterator[tqdm]:
    """The state Hessian-vector products need, undone on exit: the loss's mode (:meth:`Loss.mode`), eager
    attention when the products differentiate twice (:func:`~landscape.hessian.attention.eager_attention`,
    switched only if ``switch_attention``), and the model as before afterwards (:func:`landscape.preserved`:
    modes, flags, RNG, parameters). Yields a progress bar of the products (hidden unless ``progress``)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(preserved(model))
        if second_order:
            stack.enter_context(eager_attention(model, switch=switch_attention))
        stack.enter_context(loss.mode(model))
        yield stack.enter_context(tqdm(total=total, desc=desc, unit="hvp", disable=not progress,
                                       dynamic_ncols=True, leave=False))


def rank_batches(loss: Loss, device: torch.device, *, shard: bool) -> list[tuple[int, Any, float]]:
    """(b, batch b on ``device``, n_b / N) for every batch — with ``shard``, under ``torchrun`` only this
    rank's share (every W-th batch), whose products the ranks then sum."""
    batches = [(i, b, n / loss.total) for i, (b, n) in enumerate(zip(loss.on(device), loss.weights))]
    return distributed.shard(batches) if shard else batches


def split_columns(apply: Callable[[np.ndarray], np.ndarray], X: np.ndarray) -> np.ndarray:
    """The matrix whose columns are those of ``apply(X)`` — ``apply`` maps a block of columns to a block —
    with the columns split across ranks under ``torchrun`` (rank r computes every W-th, as one block) and
    gathered once (no communication inside ``apply``)."""
    mine = list(distributed.shard(range(X.shape[1])))
    local = dict(zip(mine, apply(X[:, mine]).T)) if mine else {}
    out = np.empty(X.shape, dtype=np.float64)
    for part in distributed.all_gather_objects(local):
        for j, column in part.items():
            out[:, j] = column
    return out


def _resolve_space(model: nn.Module, sp: Space | Selector, include_trainable: bool) -> Space:
    if isinstance(sp, Space) and include_trainable:
        raise ValueError("include_trainable applies when the space is given by its kind; "
                         "build the Space with landscape.space(model, kind, include_trainable=True)")
    return as_space(model, sp) if isinstance(sp, Space) else build_space(model, sp, include_trainable=include_trainable)


def _dtype_and_device(sp: Space, point: Direction) -> tuple[torch.dtype, torch.device]:
    """The one dtype of the space's coordinates (``point``: any direction of the space) and their device
    (TypeError when dtypes are mixed)."""
    dtypes = sorted({str(t.dtype) for t in point.values()})
    if len(dtypes) > 1:
        raise TypeError(f"the {sp.kind!r} space mixes dtypes {dtypes}; cast the model to one dtype "
                        "(model.float(), or a model.double() copy for fp64 Hessians)")
    first = point[sp.names[0]]
    return first.dtype, first.device


class HessianOperator(LinearOperator):
    """H (see the module docstring) of ``loss`` at the model's current parameters in ``space``:
    a symmetric ``LinearOperator`` whose ``matvec`` is H v.

    Args:
        model: the model.
        loss: a :class:`landscape.Loss`.
        space: a space kind (``"lora"``, ``"merged"``, ``"all"``, ``"tangent"``, ``"normal"``) or a ``Space``.
        backend: ``"double-backward"``, ``"func"`` or ``"finite-difference"`` (:mod:`landscape.hessian.products`).
        include_trainable: add the other trainable parameters (a classifier head) to a LoRA space
            given by its kind (an error when ``space`` is already a ``Space``: build it with the flag).
        switch_attention: switch a Hugging Face model whose attention has no double backward (SDPA,
            flash) to eager attention inside sessions, with a warning; ``False`` raises instead.
        keep_graphs: how many batches keep their gradient graph across products (default: all;
            double-backward only).
        block_products: a block of products as one batched computation (``"batched"``), one product per column
            (``"loop"``), or batched with the loop as fallback (``"auto"``; see the module docstring).
        max_block: columns per batched computation (memory grows with it).
        fd_step: the finite-difference step in the space's norm (default ε^{1/3}·max(1, ‖θ‖);
            finite-difference only).
        rng_seed: seed of the dropout masks when the loss is in train mode.

    Products outside a :meth:`session` work but rebuild every graph; inside one the graphs are kept.
    ``products`` counts the products made (one per column of a block); ``hvp`` is the backend
    (:class:`~landscape.hessian.products.HVPBackend`).

    Raises:
        ValueError / TypeError: bad arguments, before any forward pass.
        landscape.hessian.attention.AttentionError: ``switch_attention=False`` on a model whose
            attention has no double backward (double-backward and func backends).
    """

    def __init__(self, model: nn.Module, loss: Loss, space: Space | Selector = "lora", *,
                 backend: str = "double-backward", include_trainable: bool = False, switch_attention: bool = True,
                 keep_graphs: Optional[int] = None, fd_step: Optional[float] = None, rng_seed: int = 0,
                 block_products: str = "auto", max_block: int = 16):
        require_loss(loss, "HessianOperator")
        if block_products not in BLOCK_PRODUCTS:
            raise ValueError(f"block_products must be one of {BLOCK_PRODUCTS}, got {block_products!r}")
        if int(max_block) != max_block or max_block < 1:
            raise ValueError(f"max_block must be a positive integer, got {max_block!r}")
        self.model, self.loss, self.backend = model, loss, backend
        self.space = _resolve_space(model, space, include_trainable)
        self.hvp = make_backend(backend, loss, self.space, keep_graphs=keep_graphs, fd_step=fd_step,
                                rng_seed=rng_seed)
        self.dtype_torch, self.device = _dtype_and_device(self.space, self.hvp.zeros())
        self.switch_attention = bool(switch_attention)
        if self.hvp.second_order and not self.switch_attention:
            require_eager(model)
        self.block_products, self.max_block = block_products, int(max_block)
        #: why ``"auto"`` fell back to the loop (None: it did not)
        self.block_fallback: Optional[str] = None
        self.products = 0
        self._bar: Optional[tqdm] = None  # set while a session is open
        super().__init__(dtype=np.float64, shape=(self.space.dim, self.space.dim))

    @property
    def space_name(self) -> str:
        """The space's kind, with ``+trainable`` when other trainable parameters were added."""
        return self.space.kind + ("+trainable" if self.space.include_trainable else "")

    def to_direction(self, vector: np.ndarray) -> Direction:
        """A flat vector of this operator's coordinates as a direction dict of the space (model dtype)."""
        return {n: t.clone() for n, t in self.space.from_vector(
            torch.as_tensor(vector).to(device=self.device, dtype=self.dtype_torch)).items()}

    @contextlib.contextmanager
    def session(self, desc: str = "Hessian-vector products", total: Optional[int] = None,
                progress: bool = False) -> Iterator["HessianOperator"]:
        """Products inside share one :func:`product_session` and keep their gradient graphs; on exit the
        graphs are released and the model is as before. Sessions nest (the outer one holds)."""
        if self._bar is not None:
            yield self
            return
        with product_session(self.model, self.loss, second_order=self.hvp.second_order,
                             switch_attention=self.switch_attention, desc=desc, total=total,
                             progress=progress) as bar:
            self._bar = bar
            try:
                yield self
            finally:
                self._bar = None
                self.hvp.release()

    def _block(self, X: np.ndarray, *, shard: bool) -> np.ndarray:
        """H X for an n×b block: over this rank's batches and summed across ranks (``shard``), or over all
        batches here — in chunks of ``max_block`` columns, each batched or column by column
        (``block_products``; "auto" loops from the first chunk whose batched form fails on)."""
        out = []
        for i in range(0, X.shape[1], self.max_block):
            chunk = X[:, i : i + self.max_block]
            if self.block_products != "loop" and self.hvp.batched and chunk.shape[1] > 1:
                try:
                    out.append(self._batched(chunk, shard=shard))
                    continue
                except (RuntimeError, NotImplementedError) as err:  # no batching rule, or out of memory
                    if self.block_products == "batched":
                        raise
                    self.block_products, self.block_fallback = "loop", f"{type(err).__name__}: {err}"
            out += [self._batched(chunk[:, j : j + 1], shard=shard) for j in range(chunk.shape[1])]
        return np.hstack(out)

    def _batched(self, X: np.ndarray, *, shard: bool) -> np.ndarray:
        """H X by one call of the backend: its product for one column, its block for more."""
        b = X.shape[1]
        flat = torch.as_tensor(np.ascontiguousarray(X.T)).to(device=self.device, dtype=self.dtype_torch)
        batches = rank_batches(self.loss, self.device, shard=shard)
        if b == 1:
            hv = self.space.to_vector(self.hvp(self.space.from_vector(flat[0]), batches))[None]
        else:
            sizes = [self.space.shapes[n].numel() for n in self.space.names]
            V = {n: t.reshape(b, *self.space.shapes[n]) for n, t in zip(self.space.names, flat.split(sizes, dim=1))}
            hv = self.hvp.block(V, batches)
            hv = torch.cat([hv[n].reshape(b, -1) for n in self.space.names], dim=1)
        if shard:
            distributed.all_reduce_sum_([hv])
        self._bar.update(b)
        return hv.to(device="cpu", dtype=torch.float64).numpy().T

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        with self.session():
            hv = self._batched(np.reshape(x, (-1, 1)), shard=True)[:, 0]
        self.products += 1
        return hv

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:  # H is symmetric
        return self._matvec(x)

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        """H X: in one process, as one block (:meth:`_block`); under ``torchrun`` split by columns
        (:func:`split_columns`: each rank's block on all the data, no communication per product)."""
        with self.session():
            if distributed.world_size() == 1:
                out = self._block(X, shard=True)
            else:
                out = split_columns(lambda block: self._block(block, shard=False), X)
        self.products += X.shape[1]
        return out


@dataclass
class HessianRun(Generic[T]):
    """What :func:`run_on_hessian` returns: the algorithm's result, the operator it ran on, the wall time."""

    result: T
    operator: HessianOperator
    seconds: float

    @property
    def space(self) -> str:
        """The operator's :attr:`~HessianOperator.space_name`."""
        return self.operator.space_name


def run_on_hessian(model: nn.Module, loss: Loss, space: Space | Selector, algorithm: Callable[[HessianOperator], T],
                   *, name: str, total: Optional[int] = None, progress: bool = True,
                   check: Optional[Callable[[int], None]] = None, **operator_options) -> HessianRun[T]:
    """``algorithm(H)`` for the :class:`HessianOperator` H of ``loss`` in ``space``, inside one session.

    Args:
        algorithm: what to compute from the operator (Lanczos, Hutch++, SLQ, the dense matrix…).
        name: the progress bar's label, shown as ``"name (space)"``; total: products expected.
        check: called with the operator's dimension n before the session opens (argument checks
            that need n raise here, before any work).
        **operator_options: passed to :class:`HessianOperator`.

    Returns:
        The result, the operator and the seconds the session took.

    Raises:
        RuntimeError: the algorithm failed (a Lanczos that did not converge…) after the backend found
            its own products suspect (:meth:`~landscape.hessian.products.HVPBackend.doubt`: finite
            differences across ReLU kinks) — the message names that cause, not only the algorithm's.
    """
    op = HessianOperator(model, loss, space, **operator_options)
    if check is not None:
        check(op.shape[0])
    start = time.perf_counter()
    with op.session(desc=f"{name} ({op.space_name})", total=total, progress=progress):
        try:
            result = algorithm(op)
        except RuntimeError as err:
            doubt = op.hvp.doubt()
            if doubt is None:
                raise
            raise RuntimeError(f"{name} failed ({err}), and the products are suspect: {doubt}") from err
    return HessianRun(result, op, time.perf_counter() - start)
