"""Trace of a Hessian by randomized estimators from m products, with a standard error.

* Hutchinson (1989): for Rademacher z (entries ±1, E zzᵀ = I), E[zᵀHz] = tr H, so
  tr H ≈ (1/m) Σᵢ zᵢᵀHzᵢ with standard error sd(zᵢᵀHzᵢ)/√m (m products).
* Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021): spend m/3 products on a sketch Q = orth(HS)
  of the dominant range, take its part exactly and Hutchinson only on the rest:
  tr H ≈ tr(QᵀHQ) + (1/g) Σᵢ gᵢᵀ(I−QQᵀ)H(I−QQᵀ)gᵢ. The first term is exact given Q, so the standard
  error is that of the second, sd/√g. For the spiky spectra of trained networks the deflated
  remainder has far smaller variance: the error falls as 1/m instead of 1/√m.
* XTrace (Epperly, Tropp & Webber, SIMAX 2024, "XTrace: making the most of every sample in stochastic
  trace estimation", :func:`xtrace`) — the default: Hutch++ uses each probe either for the sketch or
  for Hutchinson; XTrace uses every one for both. With s = m/2 probes Ω = [ω₁ … ω_s] and Q₍ᵢ₎ a basis
  of H Ω without ωᵢ, each

      tᵢ = tr(Q₍ᵢ₎ᵀHQ₍ᵢ₎) + ωᵢᵀ(I − Q₍ᵢ₎Q₍ᵢ₎ᵀ)H(I − Q₍ᵢ₎Q₍ᵢ₎ᵀ)ωᵢ

  is unbiased (ωᵢ is independent of Q₍ᵢ₎), and tr H ≈ mean tᵢ with standard error sd(tᵢ)/√s (the
  paper's error estimate; the tᵢ are exchangeable, not independent). All s leave-one-out bases come
  from one QR of HΩ and s more products HQ (:func:`xtrace`'s formulas). On digits-mlp (808 coords,
  20 seeds; DESIGN §6) curvlinops' XTrace had about half the RMS error of Hutch++ at m = 102 and 198.
* XNysTrace (same paper, :func:`xnystrace`), for **positive semi-definite** operators only: the
  leave-one-out Nyström approximations Ĥ₍ᵢ₎ = HΩ₍ᵢ₎(Ω₍ᵢ₎ᵀHΩ₍ᵢ₎)⁺(HΩ₍ᵢ₎)ᵀ replace the projections, so
  every product is a probe (s = m). A Hessian away from a minimum is indefinite: use XTrace there.

XTrace and XNysTrace use probes uniform on the sphere of radius √n and rescale the Hutchinson term
to the dimension of the complement it lives in (the papers' "improved" variants; exact, not only
unbiased, once s = n), and evaluate H + νI with ν = ε·‖HΩ‖_F/√n (subtracting νn afterwards), which
keeps the QR / Cholesky factors nonsingular when H has low rank.

Probes come from a ``torch.Generator`` (seeded), never the global RNG.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.linalg
import torch

from .linalg import as_operator, generator, rademacher, sphere
from .operator import run_on_hessian

__all__ = ["hutchinson", "hutch_plus_plus", "xtrace", "xnystrace", "TraceEstimate", "hessian_trace",
           "TRACE_METHODS"]

#: the fewest products of each method that still give a standard error (two samples)
_LEAST = {"xtrace": 4, "xnystrace": 2, "hutch++": 4, "hutchinson": 2}
TRACE_METHODS = tuple(_LEAST)


def _check_trace_args(method: str, num_samples: int) -> None:
    if method not in TRACE_METHODS:
        raise ValueError(f"unknown trace method {method!r}; choose one of {TRACE_METHODS}")
    least = _LEAST[method]
    if int(num_samples) != num_samples or num_samples < least:
        raise ValueError(f"{method} needs num_samples >= {least} products (for a standard error), got {num_samples!r}")


def _mean_and_stderr(samples: np.ndarray) -> tuple[float, float]:
    return float(samples.mean()), float(samples.std(ddof=1) / np.sqrt(len(samples)))


def _shift(Y: np.ndarray, Omega: np.ndarray) -> tuple[np.ndarray, float]:
    """(H + νI)Ω from Y = HΩ, and ν = ε·‖Y‖_F/√n: a shift at rounding level that makes the factors of
    :func:`xtrace` and :func:`xnystrace` nonsingular for a low-rank H."""
    nu = float(np.finfo(np.float64).eps * np.linalg.norm(Y) / np.sqrt(Y.shape[0]))
    return Y + nu * Omega, nu


def _columnwise(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """xᵢᵀyᵢ for every column pair."""
    return np.einsum("ij,ij->j", X, Y)


def _quadratic_forms(A, Z: np.ndarray) -> np.ndarray:
    """zᵢᵀ A zᵢ for every column zᵢ of Z."""
    return _columnwise(Z, A.matmat(Z))


def hutchinson(op, num_samples: int = 100, *, seed: int | torch.Generator = 0) -> tuple[float, float, np.ndarray, int]:
    """Hutchinson's estimate of tr H.

    Returns:
        (estimate, standard error, the m quadratic forms zᵢᵀHzᵢ, number of products).
    """
    _check_trace_args("hutchinson", num_samples)
    A = as_operator(op)
    samples = _quadratic_forms(A, rademacher(generator(seed), A.shape[0], int(num_samples)))
    return (*_mean_and_stderr(samples), samples, A.products)


def hutch_plus_plus(op, num_samples: int = 100, *,
                    seed: int | torch.Generator = 0) -> tuple[float, float, np.ndarray, int]:
    """Hutch++ estimate of tr H with ``num_samples`` products in all (⌊m/3⌋ sketch, ⌊m/3⌋ for QᵀHQ, the
    rest for Hutchinson on the deflated remainder).

    Returns:
        (estimate, standard error of the remainder term, its quadratic forms, number of products).
    """
    _check_trace_args("hutch++", num_samples)
    A = as_operator(op)
    n, m = A.shape[0], int(num_samples)
    n_sketch = m // 3
    gen = generator(seed)
    S = rademacher(gen, n, n_sketch)
    G = rademacher(gen, n, m - 2 * n_sketch)
    Q, _ = np.linalg.qr(A.matmat(S))
    head = float(np.trace(Q.T @ A.matmat(Q)))
    G = G - Q @ (Q.T @ G)
    samples = _quadratic_forms(A, G)
    mean, stderr = _mean_and_stderr(samples)
    return head + mean, stderr, samples, A.products


def xtrace(op, num_samples: int = 100, *, seed: int | torch.Generator = 0) -> tuple[float, float, np.ndarray, int]:
    """XTrace estimate of tr H (module docstring) with s = ⌊m/2⌋ probes (at most n) and 2s products.

    With HΩ = QR, the basis without ωᵢ is Q₍ᵢ₎Q₍ᵢ₎ᵀ = Q(I − sᵢsᵢᵀ)Qᵀ, sᵢ the i-th column of R⁻ᵀ
    normalized (it is orthogonal to every column of R but the i-th). With Z = HQ, K = QᵀZ, W = QᵀΩ
    and cᵢ = wᵢ − sᵢ(sᵢᵀwᵢ), the complement's part of ωᵢ is uᵢ = ωᵢ − Qcᵢ, and (H symmetric, so
    Zᵀωᵢ = QᵀHωᵢ = R eᵢ)

        tr(Q₍ᵢ₎ᵀHQ₍ᵢ₎) = tr K − sᵢᵀKsᵢ,   uᵢᵀHuᵢ = ωᵢᵀHωᵢ − 2 rᵢᵀcᵢ + cᵢᵀKcᵢ,   ‖uᵢ‖² = n − ‖wᵢ‖² + (sᵢᵀwᵢ)²,

    and tᵢ = tr K − sᵢᵀKsᵢ + (n − s + 1)·uᵢᵀHuᵢ/‖uᵢ‖² (uᵢ/‖uᵢ‖ is uniform on the unit sphere of the
    complement, of dimension n − s + 1).

    Returns:
        (estimate, standard error sd(tᵢ)/√s, the s estimates tᵢ, number of products).
    """
    _check_trace_args("xtrace", num_samples)
    A = as_operator(op)
    n = A.shape[0]
    s = min(int(num_samples) // 2, n)
    Omega = sphere(generator(seed), n, s)
    Y, nu = _shift(A.matmat(Omega), Omega)
    Q, R = np.linalg.qr(Y)
    K = Q.T @ A.matmat(Q) + nu * np.eye(s)
    K = (K + K.T) / 2
    S = np.linalg.inv(R).T
    S /= np.linalg.norm(S, axis=0)
    W = Q.T @ Omega
    SW = _columnwise(S, W)
    C = W - S * SW
    complement = _columnwise(Omega, Y) - 2 * _columnwise(R, C) + _columnwise(C, K @ C)
    scale = (n - s + 1) / (n - _columnwise(W, W) + SW**2)
    samples = np.trace(K) - _columnwise(S, K @ S) + scale * complement - nu * n
    return (*_mean_and_stderr(samples), samples, A.products)


def xnystrace(op, num_samples: int = 100, *,
              seed: int | torch.Generator = 0) -> tuple[float, float, np.ndarray, int]:
    """XNysTrace estimate of tr H for a **positive semi-definite** H, with s = m probes (at most n).

    With Y = HΩ, G = ΩᵀY = LLᵀ and M = L⁻¹: the Nyström approximation Ĥ = YG⁻¹Yᵀ has tr Ĥ = ‖YL⁻ᵀ‖²_F;
    leaving ωᵢ out removes the rank-one part zᵢzᵢᵀ, zᵢ = YG⁻¹eᵢ/√(G⁻¹)ᵢᵢ (a rank-one downdate of G⁻¹),
    with (G⁻¹)ᵢᵢ = ‖Meᵢ‖²; and since Ĥ₍ᵢ₎ interpolates H on the other probes and Ĥ on ωᵢ,
    ωᵢᵀ(H − Ĥ₍ᵢ₎)ωᵢ = (zᵢᵀωᵢ)² = 1/(G⁻¹)ᵢᵢ. H − Ĥ₍ᵢ₎ vanishes on the other probes, so its trace lives on a
    complement of dimension n − s + 1 in which ωᵢ has squared norm 1/((ΩᵀΩ)⁻¹)ᵢᵢ: rescaled,

        tᵢ = tr Ĥ − ‖zᵢ‖² + (n − s + 1)·((ΩᵀΩ)⁻¹)ᵢᵢ / (G⁻¹)ᵢᵢ.

    Returns:
        (estimate, standard error sd(tᵢ)/√s, the s estimates tᵢ, number of products).

    Raises:
        ValueError: ΩᵀHΩ is not positive definite — H is not PSD (use :func:`xtrace`).
    """
    _check_trace_args("xnystrace", num_samples)
    A = as_operator(op)
    n = A.shape[0]
    s = min(int(num_samples), n)
    Omega = sphere(generator(seed), n, s)
    Y, nu = _shift(A.matmat(Omega), Omega)
    G = Omega.T @ Y
    try:
        L = np.linalg.cholesky((G + G.T) / 2)
    except np.linalg.LinAlgError as err:
        raise ValueError("xnystrace needs a positive semi-definite operator, but ΩᵀHΩ is not positive definite "
                         "(negative curvature); use method='xtrace'") from err
    M = scipy.linalg.solve_triangular(L, np.eye(s), lower=True)
    B = Y @ M.T  # Y L⁻ᵀ
    inverse_diag = _columnwise(M, M)  # (G⁻¹)ᵢᵢ
    leave_out = _columnwise(B @ M, B @ M) / inverse_diag  # ‖zᵢ‖²
    P = np.linalg.inv(np.linalg.qr(Omega)[1])
    samples = np.sum(B**2) - leave_out + (n - s + 1) * np.sum(P**2, axis=1) / inverse_diag - nu * n
    return (*_mean_and_stderr(samples), samples, A.products)


@dataclass
class TraceEstimate:
    """A trace estimate of a Hessian in one space, with its standard error."""

    estimate: float
    stderr: float
    num_hvp: int
    method: str
    space: str
    seconds: float
    samples: np.ndarray = field(repr=False)

    def to_frame(self) -> pd.DataFrame:
        """One row: space, method, estimate, stderr, num_hvp, seconds."""
        return pd.DataFrame([{"space": self.space, "method": self.method, "estimate": self.estimate,
                              "stderr": self.stderr, "num_hvp": self.num_hvp, "seconds": self.seconds}])


_ESTIMATORS = {"xtrace": xtrace, "xnystrace": xnystrace, "hutch++": hutch_plus_plus, "hutchinson": hutchinson}


def hessian_trace(model, loss, space="lora", *, method: str = "xtrace", num_samples: int = 100,
                  seed: int | torch.Generator = 0, progress: bool = True, **operator_options) -> TraceEstimate:
    """Trace of the Hessian of ``loss`` in ``space`` by XTrace (default), XNysTrace, Hutch++ or Hutchinson.

    XTrace is the default: at equal products it had the smallest error of the estimators valid for any
    symmetric H (module docstring); XNysTrace is better still, but only for a PSD H.

    Args:
        model, loss, space: as for :func:`landscape.hessian_eigenvalues`.
        method: ``"xtrace"``, ``"xnystrace"`` (PSD only), ``"hutch++"`` or ``"hutchinson"``.
        num_samples: Hessian-vector products in all (XTrace uses an even number, at most 2n; XNysTrace
            at most n; Hutch++ splits them in thirds).
        seed: seed or ``torch.Generator`` of the probes.
        **operator_options: passed to :class:`landscape.HessianOperator`.

    Raises:
        ValueError: unknown method or too few samples — before any work; ``xnystrace`` on an operator
            that is not positive semi-definite.
    """
    _check_trace_args(method, num_samples)
    estimator = functools.partial(_ESTIMATORS[method], num_samples=num_samples, seed=seed)
    run = run_on_hessian(model, loss, space, estimator, name=method, total=int(num_samples), progress=progress,
                         **operator_options)
    estimate, stderr, samples, products = run.result
    return TraceEstimate(estimate=estimate, stderr=stderr, num_hvp=products, method=method, space=run.space,
                         seconds=run.seconds, samples=samples)
