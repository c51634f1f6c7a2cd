"""Directions in a space, and the sampler API.

A direction is a dict ``name -> tensor`` shaped like the space's coordinates (:class:`Space`
``.shapes``). A **sampler** is any callable ``(space, generator) -> direction``; the probes call it
with a ``torch.Generator`` seeded from their ``seed``, so the same seed gives the same directions —
for every checkpoint and space of the same shapes (common random numbers). Randomness comes only
from that generator, never from the global RNG. In the tangent / normal spaces the built-in samplers
return projected directions (the probes project any offset anyway).

Built-in samplers (pass options with ``functools.partial``):

* :func:`gaussian` — d ~ N(0, I);  :func:`rademacher` — d ∈ {−1, +1} uniformly;
* :func:`filter_normalized` — Gaussian, then :func:`filter_normalize` (Li et al., 2018);
* :func:`flat_lora_noise` — ε_ij ~ N(0, σ²‖θ_i‖²/n) per filter i (Flat-LoRA, Li et al., ICML 2025);
* :func:`adaptive_noise` — ε ~ N(0, σ²θ²) elementwise (|θ|-scaled);

and factories of samplers: :func:`gradient` (the ascent direction ∇L), :func:`interpolation`
(toward another checkpoint). :func:`trajectory_pca` gives the principal directions of a training
trajectory; :func:`orthogonalize` is one Gram–Schmidt step.

A filter is an output unit whatever the storage (:meth:`Space.filters`): a row of an out × in weight,
an output channel of a conv kernel, a column of a GPT-2 ``Conv1D`` weight (stored in × out).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

import numpy as np
import pandas as pd
import torch
from torch import nn

from flatlora import filter_noise_std

from .guard import preserved
from .loss import Loss
from .space import Direction, Space, SpaceError

__all__ = [
    "Sampler", "ONE_D_POLICIES", "gaussian", "rademacher", "filter_normalize", "filter_normalized",
    "flat_lora_noise", "adaptive_noise", "gradient", "interpolation", "checkpoint_point", "trajectory_pca",
    "TrajectoryPCA", "orthogonalize", "sample",
]

Sampler = Callable[[Space, torch.Generator], Direction]
Checkpoint = Union[nn.Module, Mapping[str, torch.Tensor], str, os.PathLike]

#: what filter normalization and filter noise do with 1-D tensors (biases, norm-layer weights):
#: ``"zero"`` — leave them unperturbed; ``"filter"`` — treat the vector as one filter; ``"copy"``
#: (filter normalization only) — d = θ, as Li et al.'s reference code does (see :func:`filter_normalize`)
ONE_D_POLICIES = ("zero", "filter", "copy")


def _draw(space: Space, generator: torch.Generator, draw: Callable[[torch.Size, torch.Generator], torch.Tensor]) -> Direction:
    point = space.point()
    out = {n: draw(space.shapes[n], generator).to(device=point[n].device, dtype=point[n].dtype) for n in space.names}
    return space.project(out)


def gaussian(space: Space, generator: torch.Generator) -> Direction:
    """d ~ N(0, I) in every coordinate (projected in tangent / normal)."""
    return _draw(space, generator, lambda shape, g: torch.randn(shape, generator=g))


def rademacher(space: Space, generator: torch.Generator) -> Direction:
    """d_i = ±1 with probability ½ each (projected in tangent / normal)."""
    return _draw(space, generator, lambda shape, g: torch.randint(0, 2, shape, generator=g).mul_(2).sub_(1).float())


def _check_policy(one_d: str) -> None:
    if one_d not in ONE_D_POLICIES:
        raise ValueError(f"unknown 1-D policy {one_d!r}; choose one of {ONE_D_POLICIES}")


def _row_scale(target_norms: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    return torch.where(norms > 0, target_norms / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(norms))


def _scale_filters(space: Space, name: str, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``t`` with its filter i (an output unit, :meth:`Space.filters`) multiplied by ``scale[i]``."""
    return space.from_filters(name, space.filters(name, t) * scale.unsqueeze(1))


def filter_normalize(space: Space, d: Mapping[str, torch.Tensor], *, one_d: str = "zero") -> Direction:
    """Filter normalization (Li et al., NeurIPS 2018, "Visualizing the loss landscape of neural nets"):
    d_i ← d_i · ‖θ_i‖ / ‖d_i‖ for every filter i — one output unit, whatever the storage
    (:meth:`Space.filters`: a row of an out × in weight, an output channel of a conv kernel, a column
    of a GPT-2 ``Conv1D`` weight stored in × out) — of every tensor with two or more dimensions.

    1-D tensors follow ``one_d``: ``"zero"`` (default) sets them to 0 — the reference code with
    ``ignore='biasbn'``, as in its README's examples; ``"filter"`` rescales the whole vector, d ← d·‖θ‖/‖d‖;
    ``"copy"`` sets d = θ — the reference code without ``ignore`` (``normalize_directions_for_weights``
    in tomgoldstein/loss-landscape). ``"filter"`` is the better of the two that perturb 1-D tensors: it
    moves them as far (‖d‖ = ‖θ‖) but in a random direction, whereas with ``"copy"`` every direction
    holds the same d = θ there — the two directions of a plane share that component, and a step α
    rescales every bias and norm gain by 1 + α (α = −1 zeroes them) instead of perturbing them at random.

    In tangent / normal, rescaling filters would leave the subspace, so each projected merged weight
    is rescaled as a whole: ‖d_ℓ‖_F = ‖θ_ℓ‖_F (the total a filter-wise normalization would give).
    """
    _check_policy(one_d)
    space.check(d)
    theta = space.point()
    d = space.project(d)
    out = {}
    for n in space.names:
        t, w = d[n], theta[n]
        if t.dim() <= 1 and one_d != "filter":
            out[n] = w.clone() if one_d == "copy" else torch.zeros_like(t)
        elif t.dim() <= 1 or (space.projected and n in space.merged_names):
            out[n] = t * _row_scale(w.norm(), t.norm())
        else:
            norms = [space.filters(n, x).norm(dim=1) for x in (w, t)]
            out[n] = _scale_filters(space, n, t, _row_scale(*norms))
    return out


def filter_normalized(space: Space, generator: torch.Generator, *, one_d: str = "zero") -> Direction:
    """A Gaussian direction, filter-normalized (:func:`filter_normalize`): Li et al.'s random direction."""
    _check_policy(one_d)
    return filter_normalize(space, gaussian(space, generator), one_d=one_d)


def flat_lora_noise(space: Space, generator: torch.Generator, *, sigma: float = 1.0, one_d: str = "zero") -> Direction:
    """Flat-LoRA's filter-wise noise (Li et al., ICML 2025): ε_ij ~ N(0, std_i²), std_i = σ·‖θ_i‖₂/√n for
    filter i (an output unit, :meth:`Space.filters`) with n entries (:func:`flatlora.filter_noise_std`);
    1-D tensors per ``one_d``: ``"zero"`` or ``"filter"`` (std = σ‖θ‖/√n for the vector). Projected in
    tangent / normal."""
    if one_d == "copy":
        raise ValueError("one_d='copy' sets d = θ, a policy of filter_normalize; noise is random: "
                         "choose one_d='zero' or 'filter'")
    _check_policy(one_d)
    theta = space.point()
    out = {}
    for n in space.names:
        w = theta[n]
        z = torch.randn(w.shape, generator=generator).to(device=w.device, dtype=w.dtype)
        if w.dim() == 1:
            std = filter_noise_std(w.unsqueeze(0), sigma) if one_d == "filter" else torch.zeros(1, device=w.device)
            out[n] = z * std.to(w.dtype)
        else:
            out[n] = _scale_filters(space, n, z, filter_noise_std(space.filters(n, w), sigma).to(w.dtype))
    return space.project(out)


def adaptive_noise(space: Space, generator: torch.Generator, *, sigma: float = 1.0) -> Direction:
    """|θ|-scaled noise: ε = σ·|θ| ⊙ z, z ~ N(0, I) (the elementwise scale of adaptive sharpness,
    Kwon et al., 2021; Andriushchenko et al., 2023). Projected in tangent / normal."""
    theta = space.point()
    z = gaussian(space, generator)
    return space.project({n: sigma * theta[n].abs() * z[n] for n in space.names})


def gradient(loss: Loss, *, normalize: bool = True) -> Sampler:
    """A sampler returning the gradient ∇L(θ) in the space (the ascent direction; in tangent / normal
    the projected gradient P∇L), of unit norm if ``normalize``. The generator is not used."""
    from .evaluate import value_and_grad

    def sample_gradient(space: Space, generator: torch.Generator) -> Direction:
        with preserved(space.model):
            _, g = value_and_grad(space, loss, space.zeros())
        if normalize:
            norm = space.norm(g)
            if norm == 0:
                raise ValueError("the gradient is zero: it gives no direction")
            g = {n: t / norm for n, t in g.items()}
        return g

    return sample_gradient


def _state(checkpoint: Checkpoint, model: nn.Module) -> Mapping[str, torch.Tensor]:
    if isinstance(checkpoint, nn.Module):
        return {n: p.detach() for n, p in checkpoint.named_parameters()}
    if isinstance(checkpoint, (str, os.PathLike)):
        if Path(checkpoint).is_dir():  # a peft adapter folder: loaded into a copy, by peft's public API
            from peft import set_peft_model_state_dict
            from peft.utils import load_peft_weights

            clone = copy.deepcopy(model)
            set_peft_model_state_dict(clone, load_peft_weights(str(checkpoint), device="cpu"),
                                      adapter_name=getattr(model, "active_adapter", "default"))
            return {n: p.detach() for n, p in clone.named_parameters()}
        return torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, Mapping):
        return checkpoint
    raise TypeError("a checkpoint is a model, a state dict, the path of a saved state dict or a peft adapter "
                    f"folder, got {type(checkpoint).__name__}")


def checkpoint_point(space: Space, checkpoint: Checkpoint) -> Direction:
    """The coordinates of ``checkpoint`` in ``space``: a model of the same architecture (e.g. from
    :func:`flatlora.load_run`), a state dict in the model's parameter names (partial: the rest is the
    model's), the path of one saved with ``torch.save``, or a peft adapter folder (``save_pretrained``;
    a run's ``OUT/adapter``)."""
    return space.point_at(_state(checkpoint, space.model))


def interpolation(target: Checkpoint) -> Sampler:
    """A sampler returning d = θ_target − θ (projected): L(θ + α d) interpolates from the model (α = 0)
    to the checkpoint (α = 1) — Goodfellow et al., 2015."""

    def toward(space: Space, generator: torch.Generator) -> Direction:
        end, start = checkpoint_point(space, target), space.point()
        return space.project({n: end[n] - start[n] for n in space.names})

    return toward


@dataclass
class TrajectoryPCA:
    """Principal directions of a trajectory: ``directions`` (unit norm, orthogonal), the
    ``explained_variance_ratio`` of each, and ``coordinates`` — each checkpoint's projection onto
    them (columns ``checkpoint``, ``alpha``, ``beta`` …), to draw the path over a :func:`loss_plane`."""

    directions: list[Direction]
    explained_variance_ratio: np.ndarray
    coordinates: pd.DataFrame


def trajectory_pca(space: Space, checkpoints: Sequence[Checkpoint], *, k: int = 2) -> TrajectoryPCA:
    """PCA of a training trajectory (Li et al., 2018, §7): with θ the model's point (the final one),
    M = [θ_0 − θ; …; θ_T − θ] (projected in tangent / normal), centred by columns; its top-k right
    singular vectors are the directions, s_j² / Σ s² the explained variance ratios."""
    if k < 1 or len(checkpoints) < max(2, k):
        raise ValueError(f"trajectory_pca needs k >= 1 and at least max(2, k) checkpoints, got k={k}, {len(checkpoints)}")
    final = space.point()
    diffs = []
    for c in checkpoints:
        p = checkpoint_point(space, c)
        diffs.append(space.to_vector(space.project({n: p[n] - final[n] for n in space.names})).double())
    m = torch.stack(diffs)
    _, s, vh = torch.linalg.svd(m - m.mean(0), full_matrices=False)
    if s[k - 1] <= s[0] * 1e-12:
        raise ValueError(f"the trajectory spans fewer than {k} dimensions")
    dtype = next(iter(final.values())).dtype
    directions = [space.from_vector(vh[j].to(dtype)) for j in range(k)]
    coords = (m @ vh[:k].t()).numpy()
    axes = ["alpha", "beta"] + [f"c{j}" for j in range(2, k)]
    frame = pd.DataFrame(coords, columns=axes[:k])
    frame.insert(0, "checkpoint", range(len(checkpoints)))
    return TrajectoryPCA(directions, (s[:k] ** 2 / (s ** 2).sum()).numpy(), frame)


def orthogonalize(space: Space, d1: Mapping[str, torch.Tensor], d2: Mapping[str, torch.Tensor]) -> Direction:
    """One Gram–Schmidt step: d2 − (⟨d2, d1⟩/⟨d1, d1⟩) d1, rescaled to ‖d2‖ (so a normalization's scale
    survives)."""
    n11, n22 = space.inner(d1, d1), space.inner(d2, d2)
    if n11 == 0 or n22 == 0:
        raise ValueError("cannot orthogonalize with a zero direction")
    out = {n: d2[n] - (space.inner(d2, d1) / n11) * d1[n] for n in space.names}
    norm = space.norm(out)
    if norm <= n22.sqrt() * 1e-6:
        raise ValueError("d2 is parallel to d1: nothing is left after orthogonalizing")
    return {n: t * (n22.sqrt() / norm) for n, t in out.items()}


def sample(sampler: Union[Sampler, Mapping[str, torch.Tensor]], space: Space, generator: torch.Generator,
           what: str = "direction") -> Direction:
    """A direction from a sampler (or a given direction), checked against the space: names, shapes,
    and finite values (a NaN or inf is an error that names the sampler and the tensor)."""
    d = dict(sampler) if isinstance(sampler, Mapping) else sampler(space, generator)
    if not isinstance(d, Mapping):
        raise SpaceError(f"a sampler must return a dict name -> tensor, {sampler!r} returned {type(d).__name__}")
    space.check(d, what)
    bad = [n for n in space.names if not torch.isfinite(d[n]).all()]
    if bad:
        source = "the given direction" if isinstance(sampler, Mapping) else f"the sampler {getattr(sampler, '__name__', sampler)!r}"
        raise SpaceError(f"{source} returned NaN or inf in {bad[:3]}{' …' if len(bad) > 3 else ''}; "
                         "a direction must be finite")
    return d
