"""Trace of a Hessian by randomized estimators, with a standard error.

* Hutchinson (1989): for Rademacher z (entries ±1, E zzᵀ = I), E[zᵀHz] = tr H, so
  tr H ≈ (1/m) Σᵢ zᵢᵀHzᵢ with standard error sd(zᵢᵀHzᵢ)/√m (m products).
* Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021): spend m/3 products on a sketch Q = orth(HS)
  of the dominant range, take its part exactly and Hutchinson only on the rest:
  tr H ≈ tr(QᵀHQ) + (1/g) Σᵢ gᵢᵀ(I−QQᵀ)H(I−QQᵀ)gᵢ. The first term is exact given Q, so the standard
  error is that of the second, sd/√g. For the spiky spectra of trained networks the deflated
  remainder has far smaller variance: the error falls as 1/m instead of 1/√m.

Probes come from a ``torch.Generator`` (seeded), never the global RNG.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .linalg import as_operator, generator, rademacher
from .operator import run_on_hessian

__all__ = ["hutchinson", "hutch_plus_plus", "TraceEstimate", "hessian_trace", "TRACE_METHODS"]

TRACE_METHODS = ("hutchinson", "hutch++")


def _check_trace_args(method: str, num_samples: int) -> None:
    if method not in TRACE_METHODS:
        raise ValueError(f"unknown trace method {method!r}; choose one of {TRACE_METHODS}")
    least = 2 if method == "hutchinson" else 4
    if int(num_samples) != num_samples or num_samples < least:
        raise ValueError(f"{method} needs num_samples >= {least} products (for a standard error), got {num_samples!r}")


def _quadratic_forms(A, Z: np.ndarray) -> np.ndarray:
    """zᵢᵀ A zᵢ for every column zᵢ of Z."""
    return np.einsum("ij,ij->j", Z, A.matmat(Z))


def hutchinson(op, num_samples: int = 100, *, seed: int | torch.Generator = 0) -> tuple[float, float, np.ndarray, int]:
    """Hutchinson's estimate of tr H.

    Returns:
        (estimate, standard error, the m quadratic forms zᵢᵀHzᵢ, number of products).
    """
    _check_trace_args("hutchinson", num_samples)
    A = as_operator(op)
    samples = _quadratic_forms(A, rademacher(generator(seed), A.shape[0], int(num_samples)))
    return float(samples.mean()), float(samples.std(ddof=1) / np.sqrt(len(samples))), samples, A.products


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
    return head + float(samples.mean()), float(samples.std(ddof=1) / np.sqrt(len(samples))), samples, A.products


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


def hessian_trace(model, loss, space="lora", *, method: str = "hutch++", num_samples: int = 99,
                  seed: int | torch.Generator = 0, progress: bool = True, **operator_options) -> TraceEstimate:
    """Trace of the Hessian of ``loss`` in ``space`` by Hutch++ (default) or Hutchinson.

    Args:
        model, loss, space: as for :func:`landscape.hessian_eigenvalues`.
        method: ``"hutch++"`` or ``"hutchinson"``.
        num_samples: Hessian-vector products in all (Hutch++ splits them in thirds).
        seed: seed or ``torch.Generator`` of the Rademacher probes.
        **operator_options: passed to :class:`landscape.HessianOperator`.

    Raises:
        ValueError: unknown method or too few samples — before any work.
    """
    _check_trace_args(method, num_samples)
    estimator = functools.partial(hutchinson if method == "hutchinson" else hutch_plus_plus,
                                  num_samples=num_samples, seed=seed)
    run = run_on_hessian(model, loss, space, estimator, name=method, total=int(num_samples), progress=progress,
                         **operator_options)
    estimate, stderr, samples, products = run.result
    return TraceEstimate(estimate=estimate, stderr=stderr, num_hvp=products, method=method, space=run.space,
                         seconds=run.seconds, samples=samples)
