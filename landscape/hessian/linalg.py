"""Shared pieces of the Hessian algorithms: operator checks, product counting, seeded probes.

Every algorithm (:mod:`landscape.hessian.spectrum`, :mod:`landscape.hessian.trace`,
:mod:`landscape.hessian.density`) consumes a symmetric ``scipy.sparse.linalg.LinearOperator`` —
the Hessian operator of :mod:`landscape.hessian.operator`, or any explicit matrix in the tests — and
reports how many matrix-vector products it used, counted here.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, aslinearoperator

__all__ = ["CountingOperator", "as_operator", "rademacher", "gaussian", "generator"]


class CountingOperator(LinearOperator):
    """Wraps a linear operator and counts its products: one per column of a ``matmat``.

    Always float64 on the scipy side (ARPACK then orthogonalizes in double precision, whatever the
    precision of the products themselves).
    """

    def __init__(self, op: LinearOperator):
        super().__init__(dtype=np.float64, shape=op.shape)
        self.op = op
        self.products = 0

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        self.products += 1
        return np.asarray(self.op.matvec(np.asarray(x, dtype=np.float64)), dtype=np.float64).reshape(-1)

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        self.products += X.shape[1]
        return np.asarray(self.op.matmat(np.asarray(X, dtype=np.float64)), dtype=np.float64).reshape(X.shape[0], -1)

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:  # symmetric
        return self._matvec(x)


def as_operator(op) -> CountingOperator:
    """A :class:`CountingOperator` for a square ``LinearOperator``, dense array or sparse matrix.

    Raises:
        ValueError: the operator is not square or has no rows.
    """
    lin = aslinearoperator(op)
    n, m = lin.shape
    if n != m:
        raise ValueError(f"a Hessian operator must be square, got shape {lin.shape}")
    if n < 1:
        raise ValueError("the operator has no coordinates (an empty space?)")
    return CountingOperator(lin)


def generator(seed: Optional[int | torch.Generator]) -> torch.Generator:
    """A CPU ``torch.Generator``: the one given, or a fresh one seeded with ``seed`` (never the global RNG)."""
    if isinstance(seed, torch.Generator):
        return seed
    if seed is None:
        raise ValueError("give a seed (int) or a torch.Generator: the Hessian algorithms never use the global RNG")
    return torch.Generator().manual_seed(int(seed))


def rademacher(gen: torch.Generator, n: int, m: int) -> np.ndarray:
    """An n×m matrix of independent ±1 entries (float64) drawn from ``gen``."""
    return (torch.randint(0, 2, (n, m), generator=gen, dtype=torch.float64) * 2 - 1).numpy()


def gaussian(gen: torch.Generator, n: int) -> np.ndarray:
    """A standard normal vector (float64) drawn from ``gen``."""
    return torch.randn(n, generator=gen, dtype=torch.float64).numpy()
