"""One weight-perturbation mechanism: run adapted layers as if W' were W' + ΔW (DESIGN §3.2).

Flat-LoRA's noise, SAM's ascent step on the merged weights and every merged-space probe need the
same thing: forward and backward through each LoRA-adapted layer as if its base weight were
W + ΔW. :func:`perturbed` does it, in two modes:

* ``"exact"`` (default) — W is never written. Inside the context the base layer computes with
  W + ΔW in a transient buffer. A ΔW that comes from a seed (:class:`SeededGaussian`) is
  regenerated in backward instead of stored, so the extra memory is about one layer's weight at a
  time and the layer does the GEMMs of a plain layer (forward: y = x(W+ΔW)ᵀ; backward:
  ∂x = ∂y(W+ΔW), and ∂W = ∂yᵀx only when W is trainable). After any number of steps W is
  bit-identical.
* ``"inplace"`` — the reference code's path: W += ΔW on entry, W −= ΔW (regenerated) on exit.
  Cheapest in memory, but the round trip is not exact in floating point; the drift is measured by
  ``analysis_scripts/benchmarks/bench_flatlora_step.py``.

One rounding rule on every path: the layer computes with round(W + ΔW) — the sum taken in the wider
of the two dtypes (a bf16 W plus an fp32 ΔW is summed in fp32), rounded once to the dtype the layer
computes in (W's, or autocast's; inplace mode stores it in W's) — never with round(W) + round(ΔW).

ΔW is given per layer (keyed by the view's name) in the out × in layout of
:class:`~flatlora.lora_view.LoRALayerView`, as

* a :class:`DeltaSource` (``materialize(view) -> m×n tensor``), e.g. :class:`SeededGaussian`;
* a plain tensor (SAM's ascent step, a probe direction times α). A tensor that *requires grad*
  makes the layer differentiable in ΔW (plain autograd ops, double backward included): after
  ``backward`` its ``.grad`` is ∂L/∂W' of that layer — how SAM on the merged weights and the
  merged-space probes get the full-weight gradient without a trainable W.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Protocol, Sequence, Union, runtime_checkable

import torch
from .lora_view import LoRALayerView

__all__ = ["DeltaSource", "SeededGaussian", "perturbed", "PerturbationError", "MODES", "check_mode"]

MODES = ("exact", "inplace")


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else a ValueError that lists them."""
    if mode not in MODES:
        raise ValueError(f"unknown perturbation mode {mode!r}; choose one of {MODES}")
    return mode


class PerturbationError(RuntimeError):
    """Misuse of the perturbation mechanism (nested contexts, a differentiable ΔW in inplace mode…)."""


@runtime_checkable
class DeltaSource(Protocol):
    """Anything that can (re)produce a layer's ΔW as a fresh m×n tensor, identically on every call.

    A source may also define ``check(view)``, raising ``ValueError`` when it cannot fit the layer:
    :func:`perturbed` calls it on entry, before any layer is touched. Without it the shape is checked
    each time ΔW is materialized.
    """

    def materialize(self, view: LoRALayerView) -> torch.Tensor: ...


class SeededGaussian:
    """ΔW_ij = std_i · z_ij with z ~ N(0, 1) drawn from a dedicated generator seeded with ``seed``.

    Only the m row stds and the seed are kept (O(m) memory); the m×n noise is drawn again whenever
    it is needed. The global RNG is never touched.
    """

    def __init__(self, row_std: torch.Tensor, seed: int):
        if row_std.dim() != 1:
            raise ValueError(f"row_std must be 1-D (one std per output row), got shape {tuple(row_std.shape)}")
        self.row_std = row_std
        self.seed = int(seed)

    def check(self, view: LoRALayerView) -> None:
        """Raise ``ValueError`` unless there is one std per output unit (row) of the layer's weight."""
        if self.row_std.numel() != view.shape[0]:
            raise ValueError(f"{view.name}: {self.row_std.numel()} row stds for a weight of out × in shape "
                             f"{view.shape}; give one std per output unit ({view.shape[0]})")

    def materialize(self, view: LoRALayerView) -> torch.Tensor:
        self.check(view)
        m, n = view.shape
        device = self.row_std.device
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed)
        z = torch.randn(m, n, generator=gen, device=device, dtype=torch.float32)
        return z.mul_(self.row_std.to(torch.float32).unsqueeze(1))


Delta = Union[torch.Tensor, DeltaSource]


def _check_shape(d: torch.Tensor, view: LoRALayerView) -> None:
    if tuple(d.shape) != view.shape:
        raise ValueError(f"{view.name}: ΔW has shape {tuple(d.shape)}, expected the out × in shape {view.shape} "
                         "of the layer's weight (LoRALayerView.weight; a Conv1D weight stored in × out takes ΔW "
                         "transposed, a conv kernel flattened)")


def _check_on_entry(view: LoRALayerView, delta: Delta, mode: str) -> None:
    if not isinstance(delta, (torch.Tensor, DeltaSource)):
        raise TypeError(f"{view.name}: ΔW must be a tensor or a DeltaSource, got {type(delta).__name__}")
    if mode == "inplace" and view.weight_param.is_meta:
        raise PerturbationError(f"{view.name}: W is offloaded (on the meta device), inplace mode cannot write it; "
                                "use mode='exact'")
    if isinstance(delta, torch.Tensor):
        _check_shape(delta, view)
        if mode == "inplace" and delta.requires_grad:
            raise PerturbationError(f"{view.name}: a ΔW that requires grad needs mode='exact'")
    elif callable(getattr(delta, "check", None)):
        delta.check(view)


def _as_matrix(delta: Delta, view: LoRALayerView) -> torch.Tensor:
    d = delta.materialize(view) if isinstance(delta, DeltaSource) else delta
    _check_shape(d, view)
    return d


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def _effective_weight(view: LoRALayerView, weight: torch.Tensor, delta: Delta, dtype: torch.dtype) -> torch.Tensor:
    """round(W + ΔW) as an m×n tensor in ``dtype`` (the sum in the wider dtype), in a fresh transient
    buffer; ``weight`` is W as stored."""
    w = view.to_matrix(weight)
    d = _as_matrix(delta, view)
    if isinstance(delta, DeltaSource):  # freshly materialized: add W into it, no second buffer
        out = d.to(torch.promote_types(w.dtype, d.dtype)).add_(w)
    else:
        out = torch.add(w, d)
    return out.to(dtype)


def _compute(view: LoRALayerView, x: torch.Tensor, weight: torch.Tensor, delta: Delta
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) in the compute dtype, y = layer(x; round(W + ΔW)); autocast is off inside (casts by hand)."""
    dtype = _compute_dtype(x, weight)
    with torch.autocast(x.device.type, enabled=False):
        xc = x.to(dtype)
        return xc, view.base_forward(xc, _effective_weight(view, weight, delta, dtype))


class _ExactPerturbedLayer(torch.autograd.Function):
    """y = layer(x; W + ΔW), storing neither W + ΔW (rebuilt in backward) nor, when W is frozen, x."""

    @staticmethod
    def forward(ctx, x, weight, bias, view, delta):
        xc, y = _compute(view, x, weight, delta)
        # W itself (a reference, not a copy) for backward: an offloading hook (accelerate) may have put
        # the layer's attribute on the meta device by then
        ctx.view, ctx.delta, ctx.dtype, ctx.weight = view, delta, xc.dtype, weight
        # x is needed only for ∂W; with W frozen (LoRA) keeping it would hold an activation per layer
        ctx.save_for_backward(xc if ctx.needs_input_grad[1] else None)
        ctx.x_shape, ctx.x_dtype = xc.shape, x.dtype
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, gy):
        (xc,) = ctx.saved_tensors
        view = ctx.view
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        with torch.autocast(gy.device.type, enabled=False):
            gy = gy.to(ctx.dtype)
            if view.kind == "conv2d":
                layer = view.base_layer
                conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups)
                if need_x:
                    w = view.to_stored(_effective_weight(view, ctx.weight, ctx.delta, ctx.dtype))
                    gx = torch.nn.grad.conv2d_input(ctx.x_shape, w, gy, *conv_args)
                    del w
                if need_w:
                    gw = torch.nn.grad.conv2d_weight(xc, ctx.weight.shape, gy, *conv_args)
                if need_b:
                    gb = gy.sum(dim=(0, 2, 3))
            else:
                if need_x:
                    w = _effective_weight(view, ctx.weight, ctx.delta, ctx.dtype)
                    gx = gy @ w
                    del w
                if need_w:
                    m, n = view.shape
                    gw = view.to_stored(gy.reshape(-1, m).t() @ xc.reshape(-1, n))
                if need_b:
                    gb = gy.reshape(-1, gy.shape[-1]).sum(0)
        if gx is not None:
            gx = gx.to(ctx.x_dtype)
        if gw is not None:
            gw = gw.to(ctx.weight.dtype)
        if gb is not None:
            gb = gb.to(ctx.bias_dtype)
        return gx, gw, gb, None, None


def _exact_forward(view: LoRALayerView, delta: Delta):
    def forward(x, *args, **kwargs):
        if isinstance(delta, torch.Tensor) and (delta.requires_grad or not torch.is_grad_enabled()):
            # differentiable in ΔW (and twice differentiable): plain autograd ops. Without grad there
            # is no backward to save memory for, and plain ops compose with torch.func.vmap
            return _compute(view, x, view.weight_param, delta)[1]
        return _ExactPerturbedLayer.apply(x, view.weight_param, view.base_layer.bias, view, delta)

    return forward


_MARK = "_flatlora_perturbed"  # instance attribute of a base layer while a context perturbs it
_MISSING = object()


def _forward_slot(view: LoRALayerView) -> str:
    """The instance attribute to set so that the layer computes with W + ΔW: ``_old_forward`` under an
    accelerate hook (``add_hook_to_module``: its instance ``forward`` runs the hook's pre-forward,
    ``module._old_forward``, then its post-forward), else ``forward``."""
    layer = view.base_layer
    attrs = vars(layer)
    if "_hf_hook" in attrs and "_old_forward" in attrs:
        return "_old_forward"
    own = attrs.get("forward", _MISSING)
    if own is not _MISSING and not (getattr(own, "__self__", None) is layer
                                    and getattr(own, "__func__", None) is type(layer).forward):
        raise PerturbationError(
            f"{view.name}: the base layer has an instance `forward` ({own!r}) set by something other than an "
            "accelerate hook; exact mode would bypass it. Remove it (del layer.forward) or use mode='inplace'."
        )
    return "forward"


@contextlib.contextmanager
def _instance_attribute(module: torch.nn.Module, name: str, value) -> Iterator[None]:
    """``module.<name> = value`` as an instance attribute; on exit exactly what was there is put back."""
    previous = vars(module).get(name, _MISSING)
    setattr(module, name, value)
    try:
        yield
    finally:
        if previous is _MISSING:
            delattr(module, name)
        else:
            setattr(module, name, previous)


@contextlib.contextmanager
def _written(view: LoRALayerView, delta: Delta) -> Iterator[None]:
    """W += ΔW now, W −= ΔW (regenerated) on exit. ``add_`` sums in the wider dtype and rounds once."""
    with torch.no_grad():
        view.weight_param.add_(view.to_stored(_as_matrix(delta, view)))
    try:
        yield
    finally:
        with torch.no_grad():
            view.weight_param.sub_(view.to_stored(_as_matrix(delta, view)))


@contextlib.contextmanager
def perturbed(
    views: Sequence[LoRALayerView], deltas: Mapping[str, Delta], mode: str = "exact"
) -> Iterator[None]:
    """Inside the context, forward and backward see W + ΔW in every layer named in ``deltas``.

    Args:
        views: the model's LoRA layer views (:func:`flatlora.lora_layers`).
        deltas: view name → ΔW (m×n tensor or :class:`DeltaSource`). Layers not named are untouched.
        mode: ``"exact"`` (W never written) or ``"inplace"`` (W += ΔW, restored on exit).

    Run forward *and* backward inside the context. Every ΔW is checked on entry, before any layer is
    touched: a tensor must have its layer's out × in shape, a source with a ``check`` method is asked.
    The layer computes with round(W + ΔW): the sum in the wider dtype, rounded once (module docstring).

    Contexts do not nest on the same layer: while perturbed, a base layer carries the marker attribute
    ``_flatlora_perturbed``, and a second context on it raises :class:`PerturbationError`. Exact mode
    swaps the layer's computation by setting an instance attribute — ``forward``, or, under an
    accelerate hook (models loaded with ``device_map`` or offloading), ``_old_forward``, which the
    hook's ``forward`` calls between its pre- and post-forward, so the hook keeps running (an offloaded
    W is loaded before the layer reads it, and backward uses the W of forward) — and on exit puts back
    exactly what was there. Inplace mode cannot write an offloaded W and says so.

    Not thread-safe: the context patches module attributes (and inplace mode writes W), so another
    thread running the same model meanwhile sees the perturbation; give each thread its own model.

    ``torch.compile`` (measured with torch 2.13, CPU, a compiled two-layer LoRA model, a fresh context
    and ΔW every step; ``TORCH_LOGS=recompiles``): with tensor ΔWs (either exact path, or inplace) it
    does *not* recompile per step — one graph inside contexts, one outside, each compiled once, results
    equal eager's. A :class:`SeededGaussian` breaks the graph wherever ΔW is regenerated (dynamo cannot
    trace a ``torch.Generator``: 18 graph breaks a step for two layers), so the noise runs eagerly
    between compiled pieces; those recompile during the first two steps (per layer shape, then once
    more when the seed turns dynamic) and never after. Check other versions with ``TORCH_LOGS=recompiles``.
    """
    check_mode(mode)
    by_name = {v.name: v for v in views}
    unknown = sorted(set(deltas) - set(by_name))
    if unknown:
        raise KeyError(f"ΔW given for layers that are not LoRA layers of this model: {unknown[:5]}")
    chosen = [(by_name[name], d) for name, d in deltas.items()]
    slots = {}
    for view, d in chosen:  # every check before any layer is touched
        if _MARK in vars(view.base_layer):
            raise PerturbationError(f"{view.name} is already perturbed; perturbation contexts do not nest")
        _check_on_entry(view, d, mode)
        if mode == "exact":
            slots[view.name] = _forward_slot(view)
    with contextlib.ExitStack() as stack:
        for view, d in chosen:
            stack.enter_context(_instance_attribute(view.base_layer, _MARK, True))
            if mode == "exact":
                stack.enter_context(_instance_attribute(view.base_layer, slots[view.name], _exact_forward(view, d)))
            else:
                stack.enter_context(_written(view, d))
        yield
