"""Extreme eigenvalues of a Hessian: Lanczos (default) and power iteration with deflation.

* :func:`lanczos` — thick-restart Lanczos (:class:`~landscape.hessian.linalg.KrylovBasis`; Wu & Simon,
  SIMAX 2000; Stewart's Krylov–Schur form, SIMAX 2002) on a symmetric ``LinearOperator``. A Ritz pair
  (θ, y), ‖y‖ = 1, is accepted when ‖Hy − θy‖ ≤ tol·|θ|: for a symmetric H some eigenvalue then lies
  within tol·|θ| of θ (and within (tol·θ)²/gap once the gap to the rest of the spectrum is resolved),
  so ``tol`` bounds the relative error. The test runs after *every* product. With ARPACK
  (``scipy.sparse.linalg.eigsh``, used here before) the basis size ``ncv`` decided the cost: ARPACK
  tests only once its basis is full, so k = 1 costs at least ncv + 1 products (21 with scipy's default
  ncv = 20), and a small basis restarts often for k = 5. Here ``ncv`` is a memory bound only
  (:func:`default_ncv`). Products on explicit fp64 Hessians of digits-mlp (its LoRA model; its
  pretrained MLP, all parameters, indefinite), 3 seeds — this function's main run (before the check
  below) against ARPACK with the best of the bases tried, and the range over those bases:

  ===========================  ============  ============  ==================================
  matrix, k, tol               main run      ARPACK, best  ARPACK, ncv 4, 6, 8, 12, 16 or 20
  ===========================  ============  ============  ==================================
  LoRA (808 coords), 1, 1e-6   10            10–11         10–21
  LoRA, 5, 1e-3                23–29         26–34         26–124
  LoRA, 5, 1e-6                32–34         34–45         34–226
  all (3466 coords), 5, 1e-6   42–44         50–51         46–210
  ===========================  ============  ============  ==================================

  **Repeated eigenvalues.** Lanczos from one start vector sees one direction per distinct eigenvalue,
  so it misses the second copy of a repeated one (and can miss a member of a tight cluster); for
  k > 1 a check follows (:func:`_with_missed_copies`): Lanczos from a fresh random vector on the
  complement of everything searched, which either finds an eigenvalue above λ_k (added, and the check
  repeats) or shows, with a gap-free probability bound, that none is left. For k = 1 no check is made:
  the largest value is right however often it is repeated. The check was chosen over a block method
  (LOBPCG, ``scipy.sparse.linalg.lobpcg``, a block of k Gaussian vectors from the same generator) by
  counting products, 3 seeds, tol 1e-3 / 1e-6 (fp64):

  ==============================================  ================  ================
  k = 3 unless said                               Lanczos + check   LOBPCG, block k
  ==============================================  ================  ================
  2/(3N)·I₃ ⊗ XᵀX: 18 coords, each λ three times  20–22 / 24        18–20 / 25–28
  multiplicity 2 (296 coords)                     20–21 / 25–26     18–19 / 25–26
  cluster of 3 within 1e-4 relative (296)         21–22 / 21–22     17–18 / 24–25
  indefinite test spectrum (200), k = 5           21–22 / 25–26     37–39 / 53–55
  digits-mlp LoRA (808), k = 5                    35–38 / 41–43     58–62 / 96–98
  digits-mlp all (3466), k = 5                    55–59 / 61        71–74 / 113–117
  ==============================================  ================  ================

  Where the copies are the whole difficulty the two are even; on Hessians' spectra (a few outliers
  over a wide bulk) the block method pays k products per step and spends up to twice as many.
  Smallest eigenvalues (``which="smallest"``) run the same on −H, with a basis twice as large (the
  bottom of a Hessian's spectrum is often the edge of the bulk, a cluster).
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

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
from scipy.sparse.linalg import LinearOperator

from .linalg import KrylovBasis, as_operator, gaussian, generator
from .operator import HessianOperator, run_on_hessian

__all__ = ["lanczos", "power_iteration", "HessianEigenvalues", "hessian_eigenvalues", "EIGEN_METHODS", "WHICH",
           "default_ncv", "BASIS_BYTES"]

EIGEN_METHODS = ("lanczos", "power")
WHICH = ("largest", "smallest")

#: the memory the Lanczos basis may take by default (float64, n × ncv): ncv ≤ BASIS_BYTES / (8n); the check
#: for repeated eigenvalues holds the searched space besides, at most about twice that
BASIS_BYTES = 2**30


def default_ncv(k: int, n: int, tol: float = 1e-6, which: str = "largest") -> int:
    """Lanczos basis size: 10 + k·(3 + d) vectors for tol = 10⁻ᵈ (twice that for ``which="smallest"``),
    at most n and at most :data:`BASIS_BYTES` of float64 (but always at least k + 2).

    The basis is a memory bound, not a cost: convergence is tested after every product, and a full
    basis is thick-restarted. Sized so that the runs of the module docstring's table finish without a
    restart (k = 5 at 1e-6 took 32–44 products on digits-mlp, under 10 + 5·9 = 55; k = 1 at 1e-6, 10–14
    under 19)."""
    digits = max(1, math.ceil(-math.log10(tol)))
    want = (10 + k * (3 + digits)) * (1 if which == "largest" else 2)
    return min(n, max(k + 2, min(want, BASIS_BYTES // (8 * n))))


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


def _largest(A, k: int, *, tol: float, ncv: int, maxiter: int, gen: torch.Generator,
             deflate: Optional[np.ndarray] = None, start: Optional[np.ndarray] = None,
             settled: Optional[Callable[[np.ndarray, np.ndarray, int], bool]] = None
             ) -> tuple[Optional[tuple[np.ndarray, np.ndarray]], KrylovBasis]:
    """The k largest eigenpairs of the symmetric A — on the complement of the orthonormal columns of
    ``deflate`` — by thick-restart Lanczos (:class:`~landscape.hessian.linalg.KrylovBasis`) from ``start``
    (default: a Gaussian vector drawn from ``gen``), and the final basis. Converged: every one of the top
    k Ritz pairs has ‖Ay − θy‖ ≤ tol·|θ|, tested after every product (or the space is invariant: the
    pairs are exact). ``settled(θ, residual norms, m)`` — the Ritz values, decreasing, after m products —
    may end the run early, without pairs (None)."""
    n = A.shape[0]
    room = n - (0 if deflate is None else deflate.shape[1])
    basis = KrylovBasis(A, gaussian(gen, n) if start is None else start, min(ncv, room), deflate)
    restarts = 0
    while True:
        basis.expand()
        theta, S, residuals = basis.ritz()
        exact = basis.invariant()
        if basis.m >= k and (exact or np.all(residuals[:k] <= tol * np.abs(theta[:k]))):
            return (theta[:k], basis.vectors(S[:, :k])), basis
        if settled is not None and settled(theta, residuals, basis.m):
            return None, basis
        if exact:  # fewer than k eigenvalues in this Krylov space: go on from a fresh direction
            basis.new_direction(gaussian(gen, n))
        elif basis.full:
            restarts += 1
            if restarts > maxiter:
                raise RuntimeError(f"Lanczos did not converge to tol={tol} after {maxiter} restarts of a basis of "
                                   f"{basis.capacity} vectors; raise maxiter or ncv, or loosen tol")
            keep = min(basis.capacity - 1, max(k, (basis.capacity + k) // 2))
            basis.restart(theta[:keep], S[:, :keep])


#: the chance, over the check's random start, that an eigenvalue above λ_k is missed (see :func:`_with_missed_copies`)
MISS_PROBABILITY = 1e-3


def _nothing_above(t: float, dim: int) -> Callable[[np.ndarray, np.ndarray, int], bool]:
    """The check's stopping rule: after m steps of Lanczos from a random start on an operator B of
    dimension ``dim``, with top Ritz value θ₁ < t and smallest eigenvalue a ≥ θ_min − r_min, an
    eigenvalue μ ≥ t of B would have been found unless the start was unlucky: the relative error
    (μ − θ₁)/(μ − a) of the top Ritz value of B − aI ≥ 0 is at least ε = (t − θ₁)/(t − a), which happens
    with probability at most 1.648·√dim·exp(−√ε·(2m − 1)) (Kuczyński & Woźniakowski, SIMAX 1992,
    Thm 4.2: gap-free). Stop once that is below :data:`MISS_PROBABILITY`."""
    def settled(theta: np.ndarray, residuals: np.ndarray, m: int) -> bool:
        if theta[0] >= t:
            return False
        eps = (t - theta[0]) / (t - (theta[-1] - residuals[-1]))
        return 1.648 * math.sqrt(dim) * math.exp(-math.sqrt(eps) * (2 * m - 1)) <= MISS_PROBABILITY

    return settled


def _with_missed_copies(A, values: np.ndarray, vectors: np.ndarray, searched: np.ndarray, *, tol: float, ncv: int,
                        maxiter: int, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenpairs, given the k that single-vector Lanczos found, with the copies it missed.

    Lanczos from one vector v sees one direction per distinct eigenvalue (the projection of v on its
    eigenspace), so a second copy of a repeated eigenvalue — or a member of a tight cluster — is missed:
    it is (nearly) orthogonal to the whole Krylov space K searched. Check: Lanczos from a fresh random
    vector on the complement of K (``searched``, and of every copy found since), until its top Ritz
    value exceeds t = λ_k + tol·|λ_k| — a missed eigenvalue that belongs to the top k: it is converged to
    tol (Lanczos on A deflated by the pairs found, started at that Ritz vector) and added, and the check
    runs again — or until :func:`_nothing_above` says that none above t is left. The complement of K,
    rather than of the k pairs only, holds less of the spectrum next to λ_k (K holds Ritz vectors for
    λ_{k+1}, λ_{k+2}, … too), which widens the gap the check must see across."""
    k = len(values)
    n = A.shape[0]
    while searched.shape[1] < n:
        t = values[k - 1] + tol * abs(values[k - 1])
        _, check = _largest(A, 1, tol=tol, ncv=ncv, maxiter=maxiter, gen=gen, deflate=searched,
                            settled=_nothing_above(t, n - searched.shape[1]))
        theta, S, _ = check.ritz()
        searched = np.column_stack([searched, check.vectors(np.eye(check.m))])
        if theta[0] <= t:
            break
        pair, _ = _largest(A, 1, tol=tol, ncv=ncv, maxiter=maxiter, gen=gen, deflate=vectors,
                           start=check.vectors(S[:, :1])[:, 0])
        values, vectors = np.append(values, pair[0]), np.column_stack([vectors, pair[1]])
        searched = np.linalg.qr(np.column_stack([searched, pair[1]]))[0]
        order = np.argsort(-values, kind="stable")
        values, vectors = values[order], vectors[:, order]
    return values[:k], vectors[:, :k]


def lanczos(op, k: int = 1, *, which: str = "largest", tol: float = 1e-6, ncv: Optional[int] = None,
            maxiter: int = 100, seed: int | torch.Generator = 0,
            check_repeated: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """The k algebraically largest (or smallest) eigenpairs of a symmetric operator, repeated ones included.

    Args:
        op: a symmetric n×n ``LinearOperator`` (or array).
        k: number of eigenpairs, 1 ≤ k < n.
        which: ``"largest"`` or ``"smallest"`` (the most negative).
        tol: relative accuracy, ‖Hy − θy‖ ≤ tol·|θ| for every returned pair.
        ncv: Krylov basis size, a memory bound (default :func:`default_ncv`).
        maxiter: thick restarts of a full basis before giving up.
        seed: seed or ``torch.Generator`` of the start vectors.
        check_repeated: for k > 1, look for copies of repeated eigenvalues that one start vector
            misses (:func:`_with_missed_copies`); ``False`` saves those products and can be wrong there.

    Returns:
        (eigenvalues, eigenvectors as an n×k array, number of products), sorted largest first for
        ``which="largest"`` and smallest first for ``"smallest"``.
    """
    A = as_operator(op)
    n = A.shape[0]
    _check_eigen_args(k, n, "lanczos", which, tol)
    ncv = default_ncv(k, n, tol, which) if ncv is None else int(ncv)
    if not k < ncv <= n:
        raise ValueError(f"ncv must satisfy k < ncv <= n (k={k}, n={n}), got {ncv}")
    gen = generator(seed)
    sign = 1.0 if which == "largest" else -1.0
    signed = A if sign > 0 else LinearOperator(A.shape, matvec=lambda x: -A.matvec(x), dtype=np.float64)
    (values, vectors), basis = _largest(signed, k, tol=tol, ncv=ncv, maxiter=maxiter, gen=gen)
    if k > 1 and check_repeated:  # for k = 1 the value is right even when it is repeated: no check
        values, vectors = _with_missed_copies(signed, values, vectors, basis.vectors(np.eye(basis.m)), tol=tol,
                                              ncv=default_ncv(1, n, tol, which), maxiter=maxiter, gen=gen)
    values, vectors = _sorted(sign * values, vectors, which)
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
                        seed: int | torch.Generator = 0, check_repeated: bool = True, progress: bool = True,
                        **operator_options) -> HessianEigenvalues:
    """The k algebraically largest (or, with ``which="smallest"``, most negative) Hessian eigenvalues.

    Args:
        model: the model (a peft LoRA model for the ``lora`` / ``merged`` / ``tangent`` / ``normal`` spaces).
        loss: a :class:`landscape.Loss` (fixed batches, averaged by sample count).
        space: a space kind (``"lora"``, ``"merged"``, ``"all"``, ``"tangent"``, ``"normal"``) or a
            ``Space`` from :func:`landscape.space`.
        k: number of eigenvalues (smaller than the space's dimension).
        method: ``"lanczos"`` (thick-restart Lanczos, repeated eigenvalues included; ``tol`` bounds the
            relative residual) or ``"power"`` (deflated power iteration; ``tol`` is the relative change of
            the Rayleigh quotient, not the error).
        which: ``"largest"`` or ``"smallest"``.
        maxiter: Lanczos thick restarts (default 100) / power iterations per eigenvalue (default 1000).
        ncv: Lanczos basis size, a memory bound (default :func:`default_ncv`).
        seed: seed or ``torch.Generator`` of the start vectors.
        check_repeated: Lanczos with k > 1: look for copies of repeated eigenvalues (see :func:`lanczos`).
        progress: show a progress bar of the Hessian-vector products.
        **operator_options: passed to :class:`landscape.HessianOperator` (``backend``,
            ``include_trainable``, ``switch_attention``, ``keep_graphs``, ``fd_step``, ``rng_seed``).

    Raises:
        ValueError: unknown method or ``which``, k out of range, bad ``tol`` — before any work.
    """
    _check_eigen_args(k, None, method, which, tol)

    def eigenpairs(op: HessianOperator) -> tuple[np.ndarray, np.ndarray, int, bool]:
        if method == "lanczos":
            return (*lanczos(op, k, which=which, tol=tol, ncv=ncv, maxiter=100 if maxiter is None else maxiter,
                             seed=seed, check_repeated=check_repeated), True)
        return power_iteration(op, k, which=which, tol=tol, maxiter=1000 if maxiter is None else maxiter, seed=seed)

    run = run_on_hessian(model, loss, space, eigenpairs, name=method, progress=progress,
                         check=lambda n: _check_eigen_args(k, n, method, which, tol), **operator_options)
    values, vectors, products, converged = run.result
    return HessianEigenvalues(
        eigenvalues=values, eigenvectors=[run.operator.to_direction(v) for v in vectors.T], num_hvp=products,
        method=method, which=which, space=run.space, tol=tol, converged=converged, seconds=run.seconds)
