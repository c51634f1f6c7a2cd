"""Parameter spaces (DESIGN §3.3): named coordinates of a model that can be read, offset and differentiated.

===========  =====================================================================================
``lora``     the LoRA factors A (r×n, as stored) and B (m×r) of every adapted layer
``merged``   the merged weights W' = W + s·B·A of the adapted layers, each an m×n (out × in) matrix —
             the paper's "full space"
``all``      every parameter of the model, as stored (the full fine-tuning space)
``tangent``  the merged-space directions LoRA can express to first order,
             T = { s(δB·A + B·δA) } = { X : X = P_T(X) },  P_T(X) = P_U X + X P_V − P_U X P_V,
             with U, V orthonormal bases of col(B) and row(A) from a rank-revealing (column-pivoted)
             QR, each of its numerical rank
``normal``   the merged-space directions LoRA cannot express to first order, (I − P_T)(X) =
             (I − P_U) X (I − P_V)
custom       a list of parameter names, or a predicate ``(name, param) -> bool``
===========  =====================================================================================

A point or a direction is a dict ``name -> tensor`` keyed by :attr:`Space.names`: parameter names
for parameter coordinates, the LoRA module's name (as in :func:`flatlora.lora_layers`) for a merged
weight. ``include_trainable=True`` adds the other trainable parameters (a classifier head, peft's
``modules_to_save``) to the lora / merged / tangent / normal spaces, as stored and unprojected.
Parameter coordinates keep their stored layout (a GPT-2 ``Conv1D`` weight is in × out);
:meth:`Space.filters` presents any coordinate with one row per output unit.

Rank deficiency: peft initialises B = 0, so col(B) = {0}, U is empty and T = { s·δB·A } = the
matrices whose row space lies in row(A) (P_T(X) = X P_V). Scaling (cB, A/c) changes neither col(B)
nor row(A): T, and every measure taken in it, is free of LoRA's scale gauge.

:meth:`Space.at` evaluates the model at θ + δ without writing it: merged coordinates go through
:func:`flatlora.perturbed` (exact mode, ΔW a tensor), parameter coordinates through
``torch.func``-style reparametrization (``functional_call``'s mechanism), and inside the context the
model is a function of δ alone (every other parameter is detached), so ``torch.autograd.grad`` with
respect to δ gives the gradient in the space — for tangent / normal that of L(θ + P δ) — and
double backward works (Hessian-vector products).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import scipy.linalg
import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from flatlora import lora_layers
from flatlora.lora_view import LoRALayerView, transposed_weights
from flatlora.perturb import perturbed

__all__ = ["Space", "space", "as_space", "SPACES", "SpaceError", "orthonormal_basis"]

SPACES = ("lora", "merged", "all", "tangent", "normal")
_PROJECTED = ("tangent", "normal")
_MERGED_FAMILY = ("merged", "tangent", "normal")

Direction = dict[str, torch.Tensor]
Selector = Union[str, Sequence[str], Callable[[str, nn.Parameter], bool]]


class SpaceError(ValueError):
    """An unknown space, a direction that does not fit a space, or a space with no coordinate."""


def orthonormal_basis(columns: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (k columns) of the column space of an m×r matrix, k its numerical rank.

    Rank-revealing QR with column pivoting (LAPACK geqp3, in float64): M P = Q R with |R_11| ≥ |R_22|
    ≥ …; the rank k counts the |R_ii| > max(m, r) · ε · |R_11| (ε of the input's dtype, as
    ``numpy.linalg.matrix_rank``), and the basis is Q's first k columns. A zero matrix gives k = 0.
    """
    m = columns.detach().to("cpu", torch.float64).numpy()
    if m.size == 0:
        return columns.new_zeros((columns.shape[0], 0))
    q, r, _ = scipy.linalg.qr(m, mode="economic", pivoting=True)
    diag = np.abs(np.diag(r))
    tol = max(m.shape) * torch.finfo(columns.dtype).eps * (diag[0] if diag.size else 0.0)
    k = int((diag > tol).sum()) if diag.size and diag[0] > 0 else 0
    return torch.from_numpy(np.ascontiguousarray(q[:, :k])).to(device=columns.device, dtype=columns.dtype)


def _complement(q: np.ndarray) -> np.ndarray:
    """An orthonormal basis (m − k columns) of the orthogonal complement of an m×k orthonormal ``q``."""
    if q.shape[1] == 0:
        return np.eye(q.shape[0])
    return np.linalg.qr(q, mode="complete")[0][:, q.shape[1]:]


@dataclass
class _Projector:
    """P_T(X) = P_U X + X P_V − P_U X P_V for one layer; U (m×k), V (n×l) orthonormal."""

    u: torch.Tensor
    v: torch.Tensor

    def tangent(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.u.to(x.dtype), self.v.to(x.dtype)
        ux = u @ (u.transpose(-1, -2) @ x)  # P_U X
        return ux + (x - ux) @ v @ v.transpose(-1, -2)  # + (I − P_U) X P_V

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.tangent(x)


class Space:
    """Named coordinates of a model (build with :func:`space`).

    Attributes:
        model: the model.
        kind: ``lora``, ``merged``, ``all``, ``tangent``, ``normal`` or ``custom``.
        names: coordinate names, in a fixed order (that of :meth:`to_vector`).
        shapes: name → ``torch.Size`` of each coordinate (m×n for a merged weight, as stored otherwise).
        dim: total number of scalar coordinates (for tangent / normal: of the ambient merged space;
            the subspace's own dimension is :attr:`subspace_dim`).
        include_trainable: whether other trainable parameters were added.
    """

    def __init__(self, model: nn.Module, kind: str, params: dict[str, nn.Parameter],
                 views: dict[str, LoRALayerView], include_trainable: bool = False):
        if not params and not views:
            raise SpaceError(f"the {kind!r} space of this model has no coordinate")
        self.model = model
        self.kind = kind
        self.include_trainable = include_trainable
        self._params = params  # coordinate name -> parameter (offset by reparametrization)
        self._views = views  # coordinate name (LoRA module name) -> view (offset through perturbed)
        self.names = list(views) + list(params)
        self.shapes = {n: torch.Size(v.shape) for n, v in views.items()}
        self.shapes.update({n: p.shape for n, p in params.items()})
        self.dim = sum(s.numel() for s in self.shapes.values())
        self._transposed = transposed_weights(model) & set(params)  # stored in × out (Conv1D)
        self._projectors: dict[str, _Projector] = {}
        if kind in _PROJECTED:
            with torch.no_grad():
                for name, view in views.items():
                    self._projectors[name] = _Projector(orthonormal_basis(view.lora_B), orthonormal_basis(view.lora_A.t()))
        # inside at() the model depends on δ alone: the other trainable parameters are detached
        offset = {id(p) for p in params.values()}
        self._frozen = {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in offset}
        # every name of a tied parameter (GPT-2's wte / lm_head) is replaced together; found once here
        names_of: dict[int, list[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            names_of.setdefault(id(p), []).append(n)
        self._aliases = {n: names_of[id(p)] for n, p in model.named_parameters()}

    def __repr__(self) -> str:
        return f"Space({self.kind!r}, {len(self.names)} tensors, dim={self.dim})"

    # --- reading --------------------------------------------------------------------------------
    @property
    def subspace_dim(self) -> int:
        """Dimension of the space itself: for tangent, Σ k·n + l·m − k·l per layer (k = rank B, l = rank A);
        for normal, the ambient dimension minus that; otherwise :attr:`dim`."""
        if self.kind not in _PROJECTED:
            return self.dim
        tangent = sum(p.u.shape[1] * self.shapes[n][1] + p.v.shape[1] * self.shapes[n][0] - p.u.shape[1] * p.v.shape[1]
                      for n, p in self._projectors.items())
        merged = sum(self.shapes[n].numel() for n in self._views)
        return self.dim - merged + (tangent if self.kind == "tangent" else merged - tangent)

    def basis(self) -> torch.Tensor:
        """An orthonormal basis Q of the tangent / normal space in the ambient coordinates (the order of
        :meth:`to_vector`): a dense :attr:`dim` × :attr:`subspace_dim` float64 matrix with Q Qᵀ = P, so
        that Qᵀ H Q is the Hessian restricted to the subspace (its spectrum without P H P's zeros).

        Per merged weight X (m×n, flattened row by row, where vec(M X Nᵀ) = (M ⊗ N) vec X), with U, V the
        bases of col(B), row(A) and U_⊥, V_⊥ their orthonormal complements:
        P_T = I − (I − P_U) ⊗ (I − P_V), tangent basis [U ⊗ I_n, U_⊥ ⊗ V], normal basis U_⊥ ⊗ V_⊥; other
        coordinates (``include_trainable``) unprojected, the identity. For small spaces: Q is dense."""
        if self.kind not in _PROJECTED:
            raise SpaceError(f"basis() is for the tangent and normal spaces; the {self.kind!r} space's basis is "
                             "the identity (its coordinates themselves)")
        blocks = []
        for name, proj in self._projectors.items():
            u, v = (t.detach().to("cpu", torch.float64).numpy() for t in (proj.u, proj.v))
            u_perp, v_perp = _complement(u), _complement(v)
            blocks.append(np.hstack([np.kron(u, np.eye(v.shape[0])), np.kron(u_perp, v)]) if self.kind == "tangent"
                          else np.kron(u_perp, v_perp))
        blocks += [np.eye(self.shapes[n].numel()) for n in self._params]
        return torch.from_numpy(scipy.linalg.block_diag(*blocks))

    def point(self) -> Direction:
        """The current coordinates θ, detached (parameters are shared with the model, not copied:
        clone before modifying). Merged / tangent / normal coordinates are W' = W + s·B·A."""
        with torch.no_grad():
            out = {n: v.merged_weight().detach() for n, v in self._views.items()}
        out.update({n: p.detach() for n, p in self._params.items()})
        return out

    @property
    def merged_names(self) -> list[str]:
        """The coordinates that are merged weights W' (m×n; projected in tangent / normal)."""
        return list(self._views)

    @property
    def parameter_names(self) -> list[str]:
        """The coordinates that are parameters, offset by reparametrization (the others are merged weights)."""
        return list(self._params)

    @property
    def projected(self) -> bool:
        """True for tangent / normal: offsets are projected (:meth:`project`) before use."""
        return self.kind in _PROJECTED

    def point_at(self, state: Mapping[str, torch.Tensor]) -> Direction:
        """The coordinates the model would have with the parameter / buffer values ``state`` (keyed like
        ``model.state_dict()``; entries not given keep the model's values) — a checkpoint's point. The
        model is not written."""
        known = dict(self.model.named_parameters())
        known.update(self.model.named_buffers())
        for k, t in state.items():
            if k not in known:
                raise SpaceError(f"checkpoint entry {k!r} is not a parameter or buffer of the model")
            if tuple(t.shape) != tuple(known[k].shape):
                raise SpaceError(f"checkpoint entry {k!r} has shape {tuple(t.shape)}, the model's has {tuple(known[k].shape)}")
        state = {k: t.to(known[k].device) for k, t in state.items()}
        with _reparametrize_module(self.model, state, tie_weights=True), torch.no_grad():
            out = {n: v.merged_weight().detach().clone() for n, v in self._views.items()}
        out.update({n: state[n].detach().clone() if n in state else p.detach().clone() for n, p in self._params.items()})
        return out

    def filters(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t``, shaped like coordinate ``name`` (two or more dimensions), as a matrix with one row per
        filter — an output unit, whatever the storage (Li et al., 2018): a merged weight is m×n (out × in)
        already; a conv kernel (out, in, kh, kw) is flattened to out × in·kh·kw; a weight stored in × out
        (transformers' ``Conv1D``: :func:`flatlora.lora_view.transposed_weights`) is transposed.
        Inverse: :meth:`from_filters`."""
        if t.dim() < 2:
            raise SpaceError(f"coordinate {name!r}: a {t.dim()}-D tensor has no filters")
        return t.t() if name in self._transposed else t.flatten(1)

    def from_filters(self, name: str, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`filters`: a matrix with one row per filter back to the shape of coordinate ``name``."""
        return matrix.t() if name in self._transposed else matrix.reshape(self.shapes[name])

    def zeros(self) -> Direction:
        """A zero direction."""
        point = self.point()
        return {n: torch.zeros_like(point[n]) for n in self.names}

    # --- checking and algebra --------------------------------------------------------------------
    def check(self, d: Mapping[str, torch.Tensor], what: str = "direction") -> None:
        """Raise :class:`SpaceError` (a ValueError) naming the first wrong key, type or shape of ``d``."""
        if not isinstance(d, Mapping):
            raise SpaceError(f"a {what} is a dict name -> tensor, got {type(d).__name__}")
        extra = [k for k in d if k not in self.shapes]
        if extra:
            raise SpaceError(f"{what} has key(s) {extra[:3]} that are not coordinates of the {self.kind!r} space "
                             f"(its coordinates: {self.names[:3]}{' …' if len(self.names) > 3 else ''})")
        missing = [n for n in self.names if n not in d]
        if missing:
            raise SpaceError(f"{what} lacks coordinate(s) {missing[:3]} of the {self.kind!r} space "
                             f"({len(missing)} of {len(self.names)} missing)")
        for n in self.names:
            t = d[n]
            if not torch.is_tensor(t) or not t.is_floating_point():
                raise SpaceError(f"{what}[{n!r}] must be a floating-point tensor, got {type(t).__name__}"
                                 f"{'' if not torch.is_tensor(t) else ' of dtype ' + str(t.dtype)}")
            if t.shape != self.shapes[n]:
                raise SpaceError(f"{what}[{n!r}] has shape {tuple(t.shape)}, expected {tuple(self.shapes[n])}")

    def project(self, d: Mapping[str, torch.Tensor]) -> Direction:
        """P d: P_T (tangent) or I − P_T (normal) on each merged weight; the identity otherwise."""
        if self.kind not in _PROJECTED:
            return dict(d)
        out = dict(d)
        for n, proj in self._projectors.items():
            out[n] = proj.tangent(d[n]) if self.kind == "tangent" else proj.normal(d[n])
        return out

    def inner(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """⟨a, b⟩ = Σ over coordinates of Σ a·b (Frobenius)."""
        return sum((a[n] * b[n]).sum() for n in self.names)

    def norm(self, d: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """‖d‖₂ over all coordinates."""
        return self.inner(d, d).sqrt()

    def to_vector(self, d: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Flatten ``d`` into one 1-D tensor, coordinates in :attr:`names` order."""
        self.check(d)
        return torch.cat([d[n].reshape(-1) for n in self.names])

    def from_vector(self, v: torch.Tensor) -> Direction:
        """Inverse of :meth:`to_vector`."""
        if v.dim() != 1 or v.numel() != self.dim:
            raise SpaceError(f"a vector of the {self.kind!r} space is 1-D with {self.dim} entries, got shape {tuple(v.shape)}")
        out, i = {}, 0
        for n in self.names:
            k = self.shapes[n].numel()
            out[n] = v[i : i + k].view(self.shapes[n])
            i += k
        return out

    # --- evaluating at an offset ----------------------------------------------------------------
    @contextlib.contextmanager
    def at(self, delta: Mapping[str, torch.Tensor], *, out: Optional[Mapping[str, torch.Tensor]] = None,
           filled: bool = False) -> Iterator[nn.Module]:
        """Inside the context the model computes at θ + P δ (P the space's projection, the identity
        except for tangent / normal); the model is never written.

        δ tensors may require grad: gradients (and double backward) flow into δ and nowhere else —
        every other parameter is detached inside. Use ``torch.autograd.grad`` with respect to δ;
        composes with ``torch.func.vmap`` over a batch of δ.

        ``out`` (no-grad loops only): tensors, one per :attr:`parameter_names` entry, that receive
        θ + δ instead of fresh ones — a point then costs no allocation of the size of the space
        (which, for large tensors, costs more than the addition: fresh pages). With ``filled``, ``out``
        already holds θ + δ (the caller updated it, e.g. from the previous grid point) and is used as it
        is: δ's parameter entries are not read.
        """
        self.check(delta, "offset")
        delta = self.project(delta)
        replaced = {n: p.detach() for n, p in self._frozen.items()}
        if out is None:
            replaced.update({n: p.detach() + delta[n] for n, p in self._params.items()})
        elif filled:
            replaced.update({n: out[n] for n in self._params})
        else:
            replaced.update({n: torch.add(p.detach(), delta[n], out=out[n]) for n, p in self._params.items()})
        replaced = {alias: t for n, t in replaced.items() for alias in self._aliases[n]}
        with contextlib.ExitStack() as stack:
            if self._views:
                stack.enter_context(perturbed(list(self._views.values()), {n: delta[n] for n in self._views}))
            stack.enter_context(_reparametrize_module(self.model, replaced))
            yield self.model


def _lora_factor_ids(views: Sequence[LoRALayerView]) -> set[int]:
    return {id(p) for v in views for p in (v.lora_A_param, v.lora_B_param)}


def space(model: nn.Module, kind: Selector, *, include_trainable: bool = False) -> Space:
    """Build the space ``kind`` of ``model`` (see the module docstring).

    Args:
        model: any ``nn.Module``; ``lora`` / ``merged`` / ``tangent`` / ``normal`` need peft LoRA layers
            (:func:`flatlora.lora_layers`).
        kind: one of :data:`SPACES`, a list of parameter names, or a predicate ``(name, param) -> bool``.
        include_trainable: add the trainable parameters other than the LoRA factors (classifier head,
            ``modules_to_save``) to a lora / merged / tangent / normal space.

    The tangent / normal projectors are computed from A and B now: rebuild the space after the
    model's adapter changes.

    Raises:
        SpaceError: an unknown kind, unknown parameter names, ``include_trainable`` with ``all`` or a
            custom space, or a space with no coordinate.
        flatlora.UnsupportedAdapterError: a LoRA space of a model without plain LoRA layers.
    """
    named = dict(model.named_parameters())
    if isinstance(kind, str):
        if kind not in SPACES:
            raise SpaceError(f"unknown space {kind!r}; choose one of {SPACES}, a list of parameter names or a predicate")
        if kind == "all":
            if include_trainable:
                raise SpaceError("include_trainable adds parameters to lora / merged / tangent / normal; 'all' has them all")
            return Space(model, "all", named, {})
        views = lora_layers(model)
        factors = _lora_factor_ids(views)
        extra = {n: p for n, p in named.items() if p.requires_grad and id(p) not in factors} if include_trainable else {}
        if kind == "lora":
            names_of = {id(p): n for n, p in named.items()}
            params = {names_of[id(p)]: p for v in views for p in (v.lora_A_param, v.lora_B_param)}
            return Space(model, kind, {**params, **extra}, {}, include_trainable)
        return Space(model, kind, extra, {v.name: v for v in views}, include_trainable)
    if include_trainable:
        raise SpaceError("include_trainable applies to the lora / merged / tangent / normal spaces, not to a custom one")
    if callable(kind):
        params = {n: p for n, p in named.items() if kind(n, p)}
    else:
        wanted = list(kind)
        unknown = [n for n in wanted if n not in named]
        if unknown:
            raise SpaceError(f"unknown parameter name(s) {unknown[:3]}; the model's parameters include {list(named)[:3]}")
        params = {n: named[n] for n in wanted}
    return Space(model, "custom", params, {})


def as_space(model: nn.Module, s: Union[Space, Selector]) -> Space:
    """A :class:`Space` given or built from a selector (for probes that accept either)."""
    if isinstance(s, Space):
        if s.model is not model:
            raise SpaceError("the space was built for another model")
        return s
    return space(model, s)
