"""Worst-case (SAM-style) sharpness: S(ρ) = max over ‖δ‖₂ ≤ ρ of L(θ + δ) − L(θ), in any space.

Solved approximately by k steps of projected normalized-gradient ascent from δ₀ = 0:

    u_{t+1} = Π_ρ( u_t + η · g_t / ‖g_t‖ ),   g_t = ∇_u L(θ + δ(u_t)),   Π_ρ the projection onto ‖u‖ ≤ ρ,

with δ(u) = u (plain), or δ(u) = |θ| ⊙ u (adaptive: the constraint is ‖δ ⊘ |θ|‖₂ ≤ ρ, Andriushchenko
et al., ICML 2023, "A modern look at the relationship between sharpness and generalization"; its
first step is ASAM's ε = ρ·T²g/‖Tg‖ with T = |θ|, Kwon et al., 2021). k = 1 is SAM's first-order step
ε = ρ g/‖g‖ (Foret et al., 2021), for which S = ρ‖g‖ + ½ρ² ĝᵀHĝ + O(ρ³). The reported sharpness is
the largest L(θ + δ(u_t)) − L(θ) over t = 1 … k (a lower bound on the true maximum).

In tangent / normal the gradient is that of L(θ + Pδ), so the ascent stays in the subspace.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .evaluate import value_and_grad
from .guard import preserved
from .loss import Loss, require_loss
from .space import Selector, Space, as_space

__all__ = ["worst_case_sharpness"]


def worst_case_sharpness(
    model: nn.Module,
    loss: Loss,
    *,
    space: Union[Space, Selector] = "merged",
    rho: Union[float, Sequence[float]],
    steps: int = 1,
    adaptive: bool = False,
    step_size: float = 1.0,
    progress: bool = False,
) -> pd.DataFrame:
    """S(ρ) for each ρ (see the module docstring).

    Args:
        rho: radius ρ > 0, or several.
        steps: k ≥ 1 ascent steps (k forward-backward passes and one forward per ρ).
        adaptive: constrain ‖δ ⊘ |θ|‖₂ ≤ ρ instead of ‖δ‖₂ ≤ ρ.
        step_size: η as a fraction of ρ (1: the first step reaches the sphere).

    Returns:
        DataFrame, one row per ρ: ``space``, ``rho``, ``adaptive``, ``steps``, ``base_loss``, ``loss``
        (the worst loss found), ``sharpness`` (= loss − base_loss), ``delta_norm`` (‖δ‖₂ of the worst
        point), ``grad_norm`` (‖∇_u L‖ at θ).
    """
    require_loss(loss, "worst_case_sharpness")
    rhos = [float(r) for r in np.atleast_1d(np.asarray(rho, dtype=float))]
    if not rhos or not all(math.isfinite(r) and r > 0 for r in rhos):
        raise ValueError(f"rho must be finite and > 0, got {rhos}")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be > 0, got {step_size}")
    sp = as_space(model, space)
    rows = []
    with preserved(model):
        scale = {n: t.abs() for n, t in sp.point().items()} if adaptive else None

        def offset(u):
            return {n: scale[n] * t for n, t in u.items()} if adaptive else u

        def value_and_u_grad(u):
            value, g = value_and_grad(sp, loss, offset(u))
            return value, ({n: scale[n] * t for n, t in g.items()} if adaptive else g)

        base, g0 = value_and_u_grad(sp.zeros())
        grad_norm = float(sp.norm(g0))
        for r in tqdm(rhos, desc=f"worst_case[{sp.kind}]", disable=not progress):
            u, g = sp.zeros(), g0
            best, best_norm = -math.inf, 0.0
            for t in range(steps):
                norm = sp.norm(g)
                if norm == 0:
                    break
                u = {n: u[n] + (step_size * r / norm) * g[n] for n in sp.names}
                u_norm = float(sp.norm(u))
                if u_norm > r:
                    u = {n: x * (r / u_norm) for n, x in u.items()}
                if t + 1 < steps:
                    value, g = value_and_u_grad(u)
                else:
                    value = _value(sp, loss, offset(u))
                if value > best:
                    best, best_norm = value, float(sp.norm(sp.project(offset(u))))
            if best == -math.inf:  # zero gradient: θ is stationary to first order, no ascent direction
                best = base
            rows.append({"space": sp.kind, "rho": r, "adaptive": adaptive, "steps": int(steps), "base_loss": base,
                         "loss": best, "sharpness": best - base, "delta_norm": best_norm, "grad_norm": grad_norm})
    return pd.DataFrame(rows)


def _value(sp: Space, loss: Loss, delta) -> float:
    """L(θ + Pδ) without gradients."""
    with torch.no_grad(), loss.mode(sp.model), sp.at(delta):
        return float(loss.value(sp.model))
