"""Extreme eigenvalues of a Hessian: Lanczos (default) and power iteration with deflation.

* :func:`lanczos` — implicitly restarted Lanczos (ARPACK, ``scipy.sparse.linalg.eigsh``) on a
  symmetric ``LinearOperator``. ARPACK accepts a Ritz pair (θ, y), ‖y‖ = 1, when its residual
  satisfies ‖Hy − θy‖ ≤ tol·|θ|; for a symmetric H some eigenvalue λ then lies within tol·|θ| of θ
  (and within (tol·θ)²/gap once the gap to the rest of the spectrum is resolved), so ``tol`` bounds
  the relative error. The Krylov basis size ``ncv`` decides the cost. The top of a network's
  spectrum is a few isolated outliers, which a small basis finds: ``ncv = max(4, 2k + 2)`` (scipy's
  default, max(2k + 1, 20), spends 21 products for k = 1 at any tolerance; on the digits LoRA
  model, k = 1 took 5–9 products at tol 1e-3 with ncv = 4, and k = 5 took 17–21 with ncv = 12). The
  bottom is the edge of the bulk near 0, a cluster, where a small basis restarts hundreds of times:
  ``ncv = max(24, 4k + 12)`` for ``which="smallest"`` (k = 1 at tol 1e-3: 957 products with
  ncv = 4, 103 with 12, 49 with 24).
* :func:`power_iteration` — v ← Hv/‖Hv‖ with deflation against the eigenvectors already found
  (the method of PyHessian, Yao et al. 2020). It stops when the Rayleigh quotient ρ = vᵀHv changes by
  at most ``tol``·|ρ| between two iterations. **That is not the error**: with a small eigengap the
  quotient creeps and stops long before it is accurate. Plain power iteration finds the eigenvalue
  of largest *magnitude*, which PyHessian reports as "top" even when it is negative; here a negative
  dominant value is used as a shift σ (then H − σI ≥ 0 on the remaining subspace) and the iteration
  is rerun, so the values returned are the algebraically largest (``which="largest"``) or smallest.

:func:`hessian_eigenvalues` runs either on a model's Hessian in any parameter space and returns the
eigenvectors as direction dicts of that space.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd
import torch
from scipy.sparse.linalg import ArpackNoConvergence, eigsh

from .linalg import as_operator, gaussian, generator
from .operator import HessianOperator, run_on_hessian

__all__ = ["lanczos", "power_iteration", "HessianEigenvalues", "hessian_eigenvalues", "EIGEN_METHODS", "WHICH",
           "default_ncv"]

EIGEN_METHODS = ("lanczos", "power")
WHICH = ("largest", "smallest")


def default_ncv(k: int, n: int, which: str = "largest") -> int:
    """Lanczos basis size: max(4, 2k + 2) for the largest eigenvalues, max(24, 4k + 12) for the
    smallest (see the module docstring); at most n."""
    return min(n, max(4, 2 * k + 2) if which == "largest" else max(24, 4 * k + 12))


def _check_eigen_args(k: int, n: Optional[int], method: str, which: str, tol: float) -> None:
    if method not in EIGEN_METHODS:
        raise ValueError(f"unknown eigenvalue method {method!r}; choose one of {EIGEN_METHODS}")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH} (algebraic order), got {which!r}")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if n is not None and k >= n:
        raise ValueError(
            f"k={k} eigenvalues asked of a space with {n} coordinates; k must be smaller than the dimension "
            "(for the whole spectrum of a small space use landscape.dense_hessian and torch.linalg.eigvalsh)"
        )
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")


def _sorted(values: np.ndarray, vectors: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-values if which == "largest" else values, kind="stable")
    return values[order], vectors[:, order]


def lanczos(op, k: int = 1, *, which: str = "largest", tol: float = 1e-6, ncv: Optional[int] = None,
            maxiter: Optional[int] = None, seed: int | torch.Generator = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """The k algebraically largest (or smallest) eigenpairs of a symmetric operator by ARPACK's Lanczos.

    Args:
        op: a symmetric n×n ``LinearOperator`` (or array).
        k: number of eigenpairs, 1 ≤ k < n.
        which: ``"largest"`` (ARPACK ``LA``) or ``"smallest"`` (``SA``, the most negative).
        tol: relative accuracy, ‖Hy − θy‖ ≤ tol·|θ| for every returned pair.
        ncv: Krylov basis size (default :func:`default_ncv`).
        maxiter: ARPACK restarts (default: ARPACK's, 10·n).
        seed: seed or ``torch.Generator`` of the start vector (ARPACK's own random start is not used).

    Returns:
        (eigenvalues, eigenvectors as an n×k array, number of products), sorted largest first for
        ``which="largest"`` and smallest first for ``"smallest"``.
    """
    A = as_operator(op)
    n = A.shape[0]
    _check_eigen_args(k, n, "lanczos", which, tol)
    ncv = default_ncv(k, n, which) if ncv is None else int(ncv)
    if not k < ncv <= n:
        raise ValueError(f"ncv must satisfy k < ncv <= n (k={k}, n={n}), got {ncv}")
    v0 = gaussian(generator(seed), n)
    try:
        values, vectors = eigsh(A, k=k, which="LA" if which == "largest" else "SA", tol=tol, ncv=ncv,
                                maxiter=maxiter, v0=v0)
    except ArpackNoConvergence as err:
        raise RuntimeError(
            f"Lanczos did not converge to tol={tol} after {A.products} products ({len(err.eigenvalues)} of {k} "
            "eigenvalues converged); raise maxiter or ncv, or loosen tol"
        ) from err
    values, vectors = _sorted(values, vectors, which)
    return values, vectors, A.products


def _orthogonalize(w: np.ndarray, basis: list[np.ndarray]) -> np.ndarray:
    """w minus its components along the orthonormal ``basis`` (Gram–Schmidt applied twice)."""
    for _ in range(2):
        for q in basis:
            w = w - (q @ w) * q
    return w


def power_iteration(op, k: int = 1, *, which: str = "largest", tol: float = 1e-6, maxiter: int = 1000,
                    seed: int | torch.Generator = 0) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """The k algebraically largest (or smallest) eigenpairs by power iteration with deflation.

    Each eigenpair: v ← (H − σI)v / ‖(H − σI)v‖ on the orthogonal complement of the pairs already
    found, until |ρₜ − ρₜ₋₁| ≤ tol·|ρₜ| for the Rayleigh quotient ρ (a stopping rule, not an error
    bound) or ``maxiter`` products. σ = 0 until a dominant eigenvalue comes out negative; σ is then
    set to it and the pair recomputed (see the module docstring).

    Returns:
        (eigenvalues, eigenvectors n×k, number of products, whether every pair met ``tol``).
    """
    A = as_operator(op)
    n = A.shape[0]
    _check_eigen_args(k, n, "power", which, tol)
    if int(maxiter) < 2:
        raise ValueError(f"maxiter must be >= 2, got {maxiter}")
    sign = 1.0 if which == "largest" else -1.0  # the largest of sign·H
    gen = generator(seed)
    values: list[float] = []
    vectors: list[np.ndarray] = []
    shift, converged = 0.0, True
    for _ in range(k):
        shifted = False
        while True:
            mu, v, ok = _dominant(lambda x: sign * A.matvec(x) - shift * x, vectors, gaussian(gen, n), tol, maxiter)
            if mu < 0 and not shifted:  # dominant in magnitude and negative: the smallest left; shift past it
                shift, shifted = shift + mu, True
                continue
            break
        converged &= ok
        values.append(sign * (mu + shift))
        vectors.append(v)
    if not converged:
        warnings.warn(f"power iteration stopped at maxiter={maxiter} before the Rayleigh quotient changed by "
                      f"less than tol={tol}", RuntimeWarning, stacklevel=2)
    vals, vecs = _sorted(np.array(values), np.column_stack(vectors), which)
    return vals, vecs, A.products, converged


def _dominant(apply, basis: list[np.ndarray], v: np.ndarray, tol: float, maxiter: int):
    """Power iteration for the dominant eigenpair of ``apply`` on the complement of ``basis``."""
    v = _orthogonalize(v, basis)
    v /= np.linalg.norm(v)
    rho_prev = None
    for _ in range(int(maxiter)):
        w = _orthogonalize(apply(v), basis)
        rho = float(v @ w)
        norm = np.linalg.norm(w)
        if norm == 0.0:  # v is in the null space of the deflated operator: exact eigenpair (0, v)
            return rho, v, True
        v = w / norm
        if rho_prev is not None and abs(rho - rho_prev) <= tol * abs(rho):
            return rho, v, True
        rho_prev = rho
    return rho, v, False


@dataclass
class HessianEigenvalues:
    """Extreme eigenvalues of a Hessian in one space.

    Attributes:
        eigenvalues: largest first (``which="largest"``) or smallest first (``"smallest"``).
        eigenvectors: one unit direction per eigenvalue, as a dict name → tensor of the space
            (usable by :func:`landscape.loss_line` and ``Space.at``).
        num_hvp: Hessian-vector products used.
        converged: whether the stopping rule was met (Lanczos raises instead of returning unconverged).
        seconds: wall time.
    """

    eigenvalues: np.ndarray
    eigenvectors: list[dict[str, torch.Tensor]] = field(repr=False)
    num_hvp: int
    method: str
    which: str
    space: str
    tol: float
    converged: bool
    seconds: float

    def to_frame(self) -> pd.DataFrame:
        """One row per eigenvalue: space, method, which, rank (1 = most extreme), eigenvalue, num_hvp."""
        return pd.DataFrame({"space": self.space, "method": self.method, "which": self.which,
                             "rank": np.arange(1, len(self.eigenvalues) + 1), "eigenvalue": self.eigenvalues,
                             "num_hvp": self.num_hvp})


def hessian_eigenvalues(model, loss, space="lora", k: int = 1, *, method: str = "lanczos", which: str = "largest",
                        tol: float = 1e-6, maxiter: Optional[int] = None, ncv: Optional[int] = None,
                        seed: int | torch.Generator = 0, progress: bool = True,
                        **operator_options) -> HessianEigenvalues:
    """The k algebraically largest (or, with ``which="smallest"``, most negative) Hessian eigenvalues.

    Args:
        model: the model (a peft LoRA model for the ``lora`` / ``merged`` / ``tangent`` / ``normal`` spaces).
        loss: a :class:`landscape.Loss` (fixed batches, averaged by sample count).
        space: a space kind (``"lora"``, ``"merged"``, ``"all"``, ``"tangent"``, ``"normal"``) or a
            ``Space`` from :func:`landscape.space`.
        k: number of eigenvalues (smaller than the space's dimension).
        method: ``"lanczos"`` (ARPACK; ``tol`` bounds the relative residual) or ``"power"`` (deflated
            power iteration; ``tol`` is the relative change of the Rayleigh quotient, not the error).
        which: ``"largest"`` or ``"smallest"``.
        maxiter: Lanczos restarts (ARPACK default) / power iterations per eigenvalue (default 1000).
        ncv: Lanczos basis size (default :func:`default_ncv`).
        seed: seed or ``torch.Generator`` of the start vectors.
        progress: show a progress bar of the Hessian-vector products.
        **operator_options: passed to :class:`landscape.HessianOperator` (``backend``,
            ``include_trainable``, ``switch_attention``, ``keep_graphs``, ``fd_step``, ``rng_seed``).

    Raises:
        ValueError: unknown method or ``which``, k out of range, bad ``tol`` — before any work.
    """
    _check_eigen_args(k, None, method, which, tol)

    def eigenpairs(op: HessianOperator) -> tuple[np.ndarray, np.ndarray, int, bool]:
        if method == "lanczos":
            return (*lanczos(op, k, which=which, tol=tol, ncv=ncv, maxiter=maxiter, seed=seed), True)
        return power_iteration(op, k, which=which, tol=tol, maxiter=1000 if maxiter is None else maxiter, seed=seed)

    run = run_on_hessian(model, loss, space, eigenpairs, name=method, progress=progress,
                         check=lambda n: _check_eigen_args(k, n, method, which, tol), **operator_options)
    values, vectors, products, converged = run.result
    return HessianEigenvalues(
        eigenvalues=values, eigenvectors=[run.operator.to_direction(v) for v in vectors.T], num_hvp=products,
        method=method, which=which, space=run.space, tol=tol, converged=converged, seconds=run.seconds)
