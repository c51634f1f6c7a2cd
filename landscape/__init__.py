"""landscape — loss-landscape sharpness of LoRA models in the LoRA, merged, tangent and normal spaces.

Imports :mod:`flatlora`, never the other way round. The Hessian lives in :mod:`landscape.hessian` (its
public names are re-exported here); one study's code in :mod:`landscape.study`, which this package
never imports.

* :func:`space` — named coordinates (``lora``, ``merged``, ``all``, ``tangent``, ``normal``, custom)
  that can be read, offset (:meth:`Space.at`, never writing the model) and differentiated;
* :class:`Loss` — one sample-weighted loss over fixed batches;
* :mod:`landscape.directions` — directions and samplers ``(space, generator) -> direction``;
* :func:`loss_line`, :func:`loss_plane` — random-direction loss curves and surfaces (Li et al., 2018);
* :func:`expected_loss` — ΔL(σ) under Gaussian weight noise, Monte Carlo with a t-interval;
* :func:`worst_case_sharpness` — max over ‖δ‖ ≤ ρ of L(θ + δ) − L(θ), plain or adaptive;
* :mod:`landscape.plot` — headless figures (PNG and PDF);
* :func:`balanced_copy` — a copy of a LoRA model in the balanced gauge (BᵀB = AAᵀ per layer), whose
  LoRA-space measures do not depend on the factors' scale (:mod:`landscape.gauge`);
* :func:`preserved` — the guard that leaves the model exactly as it was after every probe.
* :func:`hessian_eigenvalues`, :func:`hessian_trace`, :func:`hessian_density`, :func:`dense_hessian` —
  the Hessian spectrum in any space, on one :class:`HessianOperator` (a scipy ``LinearOperator``).
"""
from . import directions
from .curves import loss_line, loss_plane, summarize, symmetric_grid
from .guard import ModelChangedError, preserved, snapshot
from .gauge import balanced_copy
from .loss import Loss
from .noise import expected_loss
from .space import SPACES, Space, SpaceError, orthonormal_basis, space
from .worst_case import worst_case_sharpness
from .hessian import (AttentionError, HessianDensity, HessianEigenvalues, HessianError, HessianOperator,
                      TraceEstimate, dense_hessian, hessian_density, hessian_eigenvalues, hessian_trace)
from .plot import plot_hessian_density
