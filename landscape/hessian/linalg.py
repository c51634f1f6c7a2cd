"""Shared pieces of the Hessian algorithms: operator checks, product counting, seeded probes, and the
Krylov basis that Lanczos (:mod:`landscape.hessian.spectrum`) and SLQ (:mod:`landscape.hessian.density`)
both grow.

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

__all__ = ["CountingOperator", "as_operator", "rademacher", "gaussian", "sphere", "generator", "KrylovBasis"]


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


def sphere(gen: torch.Generator, n: int, m: int) -> np.ndarray:
    """An n×m matrix whose columns are independent and uniform on the sphere of radius √n (normalized
    Gaussians: E ωωᵀ = I, like Rademacher vectors, and rotation invariant), drawn from ``gen``."""
    g = torch.randn(n, m, generator=gen, dtype=torch.float64).numpy()
    return g * (np.sqrt(n) / np.linalg.norm(g, axis=0))


class KrylovBasis:
    """An orthonormal basis V = [v₁ … v_m] of a Krylov space of a symmetric operator A, with its Rayleigh
    quotient T = VᵀAV and residual r, such that

        A V = V T + r e_mᵀ,   Vᵀr = 0

    (a Krylov–Schur decomposition, Stewart, SIMAX 2002). :meth:`expand` appends v_{m+1} = r/‖r‖ for one
    product, orthogonalizing A v_{m+1} fully (classical Gram–Schmidt, twice: the basis stays orthonormal
    to rounding, so no spurious copies of converged Ritz values appear). Started at v₁ = v/‖v‖ and never
    restarted, T is the Lanczos tridiagonal. :meth:`ritz` gives the Ritz pairs (θᵢ, V sᵢ) of T = S Θ Sᵀ
    and their residual norms ‖A V sᵢ − θᵢ V sᵢ‖ = ‖r‖·|e_mᵀ sᵢ|, at no product. :meth:`restart` keeps
    p Ritz vectors, V ← V S_p, T ← Θ_p (thick restart, Wu & Simon, SIMAX 2000): the next :meth:`expand`
    computes their coupling to v_{m+1} with the rest of T, and the decomposition holds again.

    With ``deflate`` (orthonormal columns D), every vector is also kept orthogonal to D: the basis then
    spans a Krylov space of (I − DDᵀ) A (I − DDᵀ) restricted to the complement of D, whose eigenvalues are
    those of A with D's eigenpairs removed when D holds eigenvectors of A.
    """

    def __init__(self, A, v: np.ndarray, capacity: int, deflate: Optional[np.ndarray] = None):
        n = A.shape[0]
        self.A, self.capacity = A, int(capacity)
        self.D = np.zeros((n, 0)) if deflate is None else np.asarray(deflate, dtype=np.float64).reshape(n, -1)
        self.V = np.empty((n, self.capacity))
        self.T = np.zeros((self.capacity, self.capacity))
        self.m = 0
        self.r, _ = self._orthogonalize(np.asarray(v, dtype=np.float64))

    def _orthogonalize(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(w minus its components along D and V, the components along V), by two passes."""
        V = self.V[:, : self.m]
        h = np.zeros(self.m)
        for _ in range(2):
            w = w - self.D @ (self.D.T @ w)
            c = V.T @ w
            w = w - V @ c
            h += c
        return w, h

    @property
    def beta(self) -> float:
        """‖r‖."""
        return float(np.linalg.norm(self.r))

    @property
    def full(self) -> bool:
        """No room for another vector (``capacity`` reached)."""
        return self.m == self.capacity

    def invariant(self) -> bool:
        """Whether the space is invariant under A to rounding: ‖r‖ ≤ 1e-12·‖T‖ (then the Ritz pairs are exact)."""
        scale = np.abs(self.T[: self.m, : self.m]).max(initial=0.0)
        return self.beta <= 1e-12 * max(scale, np.finfo(float).tiny)

    def expand(self) -> None:
        """v_{m+1} = r/‖r‖, then one product A v_{m+1}: T's new row and column, and the new residual."""
        self.V[:, self.m] = self.r / self.beta
        self.m += 1
        w, h = self._orthogonalize(self.A.matvec(self.V[:, self.m - 1]))
        self.T[: self.m, self.m - 1] = self.T[self.m - 1, : self.m] = h
        self.r = w

    def new_direction(self, v: np.ndarray) -> None:
        """Continue from ``v`` (orthogonalized) in place of r: for an invariant space with eigenpairs still
        to find. Its coupling to V is zero."""
        self.r, _ = self._orthogonalize(np.asarray(v, dtype=np.float64))

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(θ, S, residual norms): the Ritz values in decreasing order, T's eigenvectors (columns, same
        order) and ‖r‖·|e_mᵀ sᵢ|."""
        theta, S = np.linalg.eigh(self.T[: self.m, : self.m])
        theta, S = theta[::-1], S[:, ::-1]
        return theta, S, self.beta * np.abs(S[-1])

    def vectors(self, S: np.ndarray) -> np.ndarray:
        """The Ritz vectors V S."""
        return self.V[:, : self.m] @ S

    def restart(self, theta: np.ndarray, S: np.ndarray) -> None:
        """Keep the Ritz pairs (θ, V S) (S: some columns of :meth:`ritz`'s S): V ← V S, T ← diag θ."""
        p = S.shape[1]
        self.V[:, :p] = self.vectors(S)
        self.T[:] = 0.0
        self.T[:p, :p] = np.diag(theta)
        self.m = p
