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

__all__ = ["DeltaSource", "SeededGaussian", "perturbed", "PerturbationError", "MODES"]

MODES = ("exact", "inplace")


class PerturbationError(RuntimeError):
    """Misuse of the perturbation mechanism (nested contexts, a differentiable ΔW in inplace mode…)."""


@runtime_checkable
class DeltaSource(Protocol):
    """Anything that can (re)produce a layer's ΔW as an m×n tensor, identically on every call."""

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

    def materialize(self, view: LoRALayerView) -> torch.Tensor:
        m, n = view.shape
        if self.row_std.numel() != m:
            raise ValueError(f"{view.name}: {self.row_std.numel()} row stds for a weight with {m} rows")
        device = self.row_std.device
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed)
        z = torch.randn(m, n, generator=gen, device=device, dtype=torch.float32)
        return z.mul_(self.row_std.to(torch.float32).unsqueeze(1))


Delta = Union[torch.Tensor, DeltaSource]


def _as_matrix(delta: Delta, view: LoRALayerView) -> torch.Tensor:
    d = delta.materialize(view) if isinstance(delta, DeltaSource) else delta
    if tuple(d.shape) != view.shape:
        raise ValueError(f"{view.name}: ΔW has shape {tuple(d.shape)}, expected the out × in shape {view.shape}")
    return d


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def _effective_weight(view: LoRALayerView, delta: Delta, dtype: torch.dtype) -> torch.Tensor:
    """(W + ΔW) as an m×n tensor in ``dtype``, built in a fresh transient buffer."""
    w = view.weight
    d = _as_matrix(delta, view)
    if isinstance(delta, DeltaSource):  # freshly materialized: add W into it, no second buffer
        out = d.to(torch.promote_types(w.dtype, d.dtype)).add_(w)
    else:
        out = torch.add(w, d)
    return out.to(dtype)


class _ExactPerturbedLayer(torch.autograd.Function):
    """y = layer(x; W + ΔW), storing neither W + ΔW (rebuilt in backward) nor, when W is frozen, x."""

    @staticmethod
    def forward(ctx, x, weight, bias, view, delta):
        dtype = _compute_dtype(x, weight)
        ctx.view, ctx.delta, ctx.dtype = view, delta, dtype
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            w = _effective_weight(view, delta, dtype)
            y = view.base_forward(xc, w)
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
                    w = view.to_stored(_effective_weight(view, ctx.delta, ctx.dtype))
                    gx = torch.nn.grad.conv2d_input(ctx.x_shape, w, gy, *conv_args)
                    del w
                if need_w:
                    gw = torch.nn.grad.conv2d_weight(xc, view.weight_param.shape, gy, *conv_args)
                if need_b:
                    gb = gy.sum(dim=(0, 2, 3))
            else:
                if need_x:
                    w = _effective_weight(view, ctx.delta, ctx.dtype)
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
            gw = gw.to(view.weight_param.dtype)
        if gb is not None:
            gb = gb.to(ctx.bias_dtype)
        return gx, gw, gb, None, None


def _exact_forward(view: LoRALayerView, delta: Delta):
    def forward(x, *args, **kwargs):
        if isinstance(delta, torch.Tensor) and (delta.requires_grad or not torch.is_grad_enabled()):
            # differentiable in ΔW (and twice differentiable): plain autograd ops. Without grad there
            # is no backward to save memory for, and plain ops compose with torch.func.vmap
            return view.base_forward(x, view.weight + delta.to(view.weight.dtype))
        return _ExactPerturbedLayer.apply(x, view.weight_param, view.base_layer.bias, view, delta)

    return forward


@contextlib.contextmanager
def perturbed(
    views: Sequence[LoRALayerView], deltas: Mapping[str, Delta], mode: str = "exact"
) -> Iterator[None]:
    """Inside the context, forward and backward see W + ΔW in every layer named in ``deltas``.

    Args:
        views: the model's LoRA layer views (:func:`flatlora.lora_layers`).
        deltas: view name → ΔW (m×n tensor or :class:`DeltaSource`). Layers not named are untouched.
        mode: ``"exact"`` (W never written) or ``"inplace"`` (W += ΔW, restored on exit).

    Run forward *and* backward inside the context. Contexts do not nest on the same layer.
    """
    if mode not in MODES:
        raise ValueError(f"unknown perturbation mode {mode!r}; choose one of {MODES}")
    by_name = {v.name: v for v in views}
    unknown = sorted(set(deltas) - set(by_name))
    if unknown:
        raise KeyError(f"ΔW given for layers that are not LoRA layers of this model: {unknown[:5]}")
    chosen = [(by_name[name], d) for name, d in deltas.items()]
    for view, d in chosen:
        if "forward" in vars(view.base_layer) or getattr(view.base_layer, "_flatlora_inplace", False):
            raise PerturbationError(f"{view.name} is already perturbed; perturbation contexts do not nest")
        if not isinstance(d, (torch.Tensor, DeltaSource)):
            raise TypeError(f"{view.name}: ΔW must be a tensor or a DeltaSource, got {type(d).__name__}")
        if mode == "inplace" and isinstance(d, torch.Tensor) and d.requires_grad:
            raise PerturbationError("a ΔW that requires grad needs mode='exact'")
    if mode == "exact":
        for view, d in chosen:
            view.base_layer.forward = _exact_forward(view, d)
        try:
            yield
        finally:
            for view, _ in chosen:
                del view.base_layer.forward
    else:
        applied: list[LoRALayerView] = []
        try:
            with torch.no_grad():
                for view, d in chosen:
                    view.weight_param.add_(view.to_stored(_as_matrix(d, view)).to(view.weight_param.dtype))
                    view.base_layer._flatlora_inplace = True
                    applied.append(view)
            yield
        finally:
            with torch.no_grad():
                for view in applied:
                    d = _as_matrix(deltas[view.name], view)
                    view.weight_param.sub_(view.to_stored(d).to(view.weight_param.dtype))
                    del view.base_layer._flatlora_inplace

