"""Eigenvalue density of a Hessian by stochastic Lanczos quadrature (SLQ).

For a unit probe v and m steps of Lanczos started at v, the tridiagonal T = U diag(θ) Uᵀ gives the
Gauss quadrature rule of the spectral measure μ_v = Σᵢ (qᵢᵀv)² δ(λᵢ): nodes θⱼ, weights τⱼ = U₀ⱼ²,
exact for polynomials of degree ≤ 2m − 1 (Golub & Meurant, "Matrices, Moments and Quadrature",
2010). With v = z/‖z‖ for Rademacher z, E μ_v is the normalized spectral density (1/n) Σᵢ δ(λᵢ), so
averaging the rules over probes and smoothing each node with a Gaussian of width σ gives the density
φ(t) = (1/n_v) Σₗ Σⱼ τⱼˡ g_σ(t − θⱼˡ) (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao, ICML 2019).

Lanczos here (:class:`~landscape.hessian.linalg.KrylovBasis`, never restarted: T is the tridiagonal)
reorthogonalizes fully (m is small), and stops early when the Krylov space is invariant (β = 0): the
rule is then exact, and no random restart is mixed in (PyHessian draws a new vector, which makes the
quadrature wrong).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd
import torch

from .linalg import KrylovBasis, as_operator, generator, rademacher
from .operator import run_on_hessian

__all__ = ["stochastic_lanczos_quadrature", "HessianDensity", "hessian_density"]


def stochastic_lanczos_quadrature(op, num_probes: int = 2, num_steps: int = 60, *,
                                  seed: int | torch.Generator = 0) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Gauss quadrature rules (nodes, weights) of the spectral measure of ``op``, one per Rademacher probe.

    Returns:
        (nodes per probe, weights per probe (each summing to 1), number of products).
    """
    _check_slq_args(num_probes, num_steps)
    A = as_operator(op)
    probes = rademacher(generator(seed), A.shape[0], int(num_probes))
    nodes, weights = [], []
    for j in range(probes.shape[1]):
        basis = KrylovBasis(A, probes[:, j], int(num_steps))
        basis.expand()
        while not (basis.full or basis.invariant()):
            basis.expand()
        theta, U = np.linalg.eigh(basis.T[: basis.m, : basis.m])
        nodes.append(theta)
        weights.append(U[0] ** 2)
    return nodes, weights, A.products


def _check_slq_args(num_probes: int, num_steps: int) -> None:
    for name, value in (("num_probes", num_probes), ("num_steps", num_steps)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class HessianDensity:
    """SLQ quadrature rules of a Hessian's spectrum: per probe, nodes θ and weights τ (Σ τ = 1)."""

    nodes: list[np.ndarray] = field(repr=False)
    weights: list[np.ndarray] = field(repr=False)
    dim: int
    num_hvp: int
    space: str
    seconds: float

    def to_frame(self) -> pd.DataFrame:
        """One row per node: space, probe, node (an eigenvalue estimate), weight."""
        return pd.DataFrame([{"space": self.space, "probe": p, "node": float(t), "weight": float(w)}
                             for p, (ts, ws) in enumerate(zip(self.nodes, self.weights)) for t, w in zip(ts, ws)])

    def default_sigma(self) -> float:
        """1% of the range of the nodes (a scale-free default for the Gaussian smoothing width)."""
        allnodes = np.concatenate(self.nodes)
        return 0.01 * max(float(np.ptp(allnodes)), np.finfo(float).tiny) if allnodes.size > 1 else 1.0

    def smoothed(self, grid: Optional[np.ndarray] = None, *, sigma: Optional[float] = None,
                 num_points: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """The density φ(t) = (1/n_v) Σₗ Σⱼ τⱼˡ g_σ(t − θⱼˡ) on ``grid`` (default: ``num_points`` points
        spanning the nodes ± 5σ); it integrates to 1 over the real line.

        Returns:
            (grid, density).
        """
        sigma = self.default_sigma() if sigma is None else float(sigma)
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        nodes, weights = np.concatenate(self.nodes), np.concatenate(self.weights) / len(self.nodes)
        if grid is None:
            grid = np.linspace(nodes.min() - 5 * sigma, nodes.max() + 5 * sigma, int(num_points))
        grid = np.asarray(grid, dtype=float)
        kernel = np.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
        return grid, kernel @ weights

    def trace(self) -> float:
        """The SLQ estimate of tr H: n · mean over probes of Σⱼ τⱼθⱼ (= Hutchinson on the same probes)."""
        return self.dim * float(np.mean([t @ w for t, w in zip(self.nodes, self.weights)]))


def hessian_density(model, loss, space="lora", *, num_probes: int = 2, num_steps: int = 60,
                    seed: int | torch.Generator = 0, progress: bool = True, **operator_options) -> HessianDensity:
    """The eigenvalue density of the Hessian in ``space`` by SLQ (``num_probes`` × ``num_steps`` products).

    Args:
        model, loss, space: as for :func:`landscape.hessian_eigenvalues`.
        num_probes: Rademacher start vectors (the rules are averaged over them).
        num_steps: Lanczos steps per probe (nodes per rule).
        seed: seed or ``torch.Generator`` of the probes.
        **operator_options: passed to :class:`landscape.HessianOperator`.

    For tangent / normal the operator is P H P in the ambient merged coordinates, so the density
    has an extra spike at 0 of weight 1 − ``Space.subspace_dim`` / dim. Plot with
    :func:`landscape.plot_hessian_density`.
    """
    _check_slq_args(num_probes, num_steps)
    slq = functools.partial(stochastic_lanczos_quadrature, num_probes=num_probes, num_steps=num_steps, seed=seed)
    run = run_on_hessian(model, loss, space, slq, name="SLQ", total=int(num_probes) * int(num_steps),
                         progress=progress, **operator_options)
    nodes, weights, products = run.result
    return HessianDensity(nodes=nodes, weights=weights, dim=run.operator.shape[0], num_hvp=products,
                          space=run.space, seconds=run.seconds)
