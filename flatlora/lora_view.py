"""One view of a LoRA layer — the only module that knows peft's internals.

For every LoRA-adapted module of a peft model, :func:`lora_layers` returns a :class:`LoRALayerView`
that presents the layer in one convention, whatever the storage:

* ``weight``  — the frozen base weight W as an m×n matrix (out × in). For ``nn.Linear`` this is the
  stored weight; for GPT-2's ``Conv1D`` (stored in × out, ``fan_in_fan_out=True``) it is the
  transpose; for ``nn.Conv2d`` it is the kernel flattened to out × (in·kh·kw). All are *views*
  sharing storage with the parameter, never copies.
* ``lora_A`` (r×n), ``lora_B`` (m×r) — the factors, again as views of the parameters;
* ``scaling`` — s = α/r (or α/√r with rsLoRA), as peft computed it;
* ``merged_weight()`` — W' = W + s·B·A, the weight the merged model uses.

Everything else in the toolkit (Flat-LoRA's noise, SAM on merged weights, the merged / tangent /
normal spaces of the landscape probes) goes through these views. Adapters whose merged weight is not
W + sBA (AdaLoRA, DoRA, LoHa, …), several active adapters, and models without LoRA layers raise
:class:`UnsupportedAdapterError` instead of being silently ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRALayerView", "UnsupportedAdapterError", "lora_layers", "base_weight_names", "transposed_weights"]


class UnsupportedAdapterError(ValueError):
    """The model's adapter is not plain LoRA (W' = W + s·B·A) on a supported layer type."""


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep the view usable without it
        return ()
    return (Conv1D,)


@dataclass
class LoRALayerView:
    """A LoRA-adapted layer seen as W' = W + s·B·A with W of shape out × in (m × n).

    Attributes:
        name: the qualified name of the peft LoRA module in the model.
        module: the peft LoRA module (``peft.tuners.lora.Linear`` / ``Conv2d``).
        base_layer: the wrapped layer that holds W (``nn.Linear``, ``Conv1D`` or ``nn.Conv2d``).
        adapter: the active adapter's name.
        kind: ``"linear"``, ``"conv1d"`` (GPT-2 ``Conv1D``, stored transposed) or ``"conv2d"``.
    """

    name: str
    module: nn.Module
    base_layer: nn.Module
    adapter: str
    kind: str

    # --- parameters as stored -------------------------------------------------------------------
    @property
    def weight_param(self) -> nn.Parameter:
        """The base weight parameter as stored by the layer."""
        return self.base_layer.weight

    @property
    def weight_name(self) -> str:
        """Qualified name of the base weight parameter (for ``named_parameters``/state dicts)."""
        return f"{self.name}.base_layer.weight"

    @property
    def lora_A_param(self) -> nn.Parameter:
        return self.module.lora_A[self.adapter].weight

    @property
    def lora_B_param(self) -> nn.Parameter:
        return self.module.lora_B[self.adapter].weight

    # --- the out × in convention ----------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) = (out, in) of the matrix view of W."""
        return tuple(self.weight.shape)

    @property
    def weight(self) -> torch.Tensor:
        """W as an m×n (out × in) view of the stored base weight."""
        return self.to_matrix(self.weight_param)

    @property
    def lora_A(self) -> torch.Tensor:
        """A as an r×n view (a conv's A kernel flattened)."""
        return self.lora_A_param.flatten(1)

    @property
    def lora_B(self) -> torch.Tensor:
        """B as an m×r view."""
        return self.lora_B_param.flatten(1)

    @property
    def scaling(self) -> float:
        return float(self.module.scaling[self.adapter])

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])

    def to_matrix(self, stored: torch.Tensor) -> torch.Tensor:
        """Map a tensor in the base weight's stored layout to the m×n (out × in) layout."""
        if self.kind == "conv1d":
            return stored.t()
        return stored.flatten(1) if stored.dim() > 2 else stored

    def to_stored(self, matrix: torch.Tensor) -> torch.Tensor:
        """Map an m×n (out × in) tensor to the base weight's stored layout (inverse of to_matrix)."""
        if self.kind == "conv1d":
            return matrix.t()
        return matrix.reshape(self.weight_param.shape)

    def delta_weight(self) -> torch.Tensor:
        """s·B·A as an m×n matrix (differentiable in A and B)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def merged_weight(self) -> torch.Tensor:
        """W' = W + s·B·A as an m×n matrix (differentiable in A and B, W is frozen)."""
        return self.weight + self.delta_weight().to(self.weight.dtype)

    # --- the layer's own computation, with another weight ----------------------------------------
    def base_forward(self, x: torch.Tensor, weight_matrix: torch.Tensor) -> torch.Tensor:
        """The base layer's output for input ``x`` computed with the m×n weight ``weight_matrix``.

        Used by the perturbation mechanism to run the layer at W + ΔW without writing W.
        """
        layer = self.base_layer
        bias = layer.bias
        if bias is not None and bias.dtype != weight_matrix.dtype:
            bias = bias.to(weight_matrix.dtype)
        if self.kind == "conv2d":
            return _conv_forward(layer)(x, self.to_stored(weight_matrix), bias)
        return F.linear(x, weight_matrix, bias)


def _conv_forward(layer: nn.Conv2d) -> Callable:
    def run(x, w, b):
        return F.conv2d(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)

    return run


_UNSUPPORTED_TUNERS = {
    "AdaLoraLayer": "AdaLoRA (its SVD-form update P·Λ·Q is not W + s·B·A)",
    "LoHaLayer": "LoHa",
    "LoKrLayer": "LoKr",
    "IA3Layer": "IA³",
    "OFTLayer": "OFT",
    "BOFTLayer": "BOFT",
    "VeraLayer": "VeRA",
}


def _reject_other_tuners(model: nn.Module) -> None:
    for name, module in model.named_modules():
        for cls in type(module).__mro__:
            if cls.__name__ in _UNSUPPORTED_TUNERS:
                raise UnsupportedAdapterError(
                    f"module {name!r} is adapted with {_UNSUPPORTED_TUNERS[cls.__name__]}, which flatlora does "
                    "not support: its merged weight is not W + s·B·A. Use a plain peft LoraConfig."
                )


def lora_layers(model: nn.Module) -> list[LoRALayerView]:
    """Return a :class:`LoRALayerView` for every LoRA-adapted module of ``model``, in module order.

    Raises:
        UnsupportedAdapterError: the model has no LoRA layer; uses AdaLoRA / DoRA / another tuner;
            has several active adapters; or adapts a layer type other than Linear, Conv1D, Conv2d.
    """
    from peft.tuners.lora import LoraLayer  # the one import of peft's internals

    _reject_other_tuners(model)
    conv1d = _conv1d_type()
    views: list[LoRALayerView] = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        factors = (module.lora_A, getattr(module, "lora_embedding_A", {}))
        active = [a for a in module.active_adapters if any(a in f for f in factors)]
        if not active:
            continue
        if len(active) > 1:
            raise UnsupportedAdapterError(
                f"module {name!r} has several active adapters {active}; activate one with "
                "model.set_adapter(name) before using flatlora."
            )
        adapter = active[0]
        if module.use_dora.get(adapter, False) or adapter in getattr(module, "lora_variant", {}):
            raise UnsupportedAdapterError(
                f"module {name!r} uses a LoRA variant (DoRA or similar) whose merged weight is not W + s·B·A; "
                "flatlora supports plain LoRA only (LoraConfig(use_dora=False))."
            )
        if getattr(module, "merged", False):
            raise UnsupportedAdapterError(
                f"module {name!r} is merged; call model.unmerge_adapter() first (W would already contain s·B·A)."
            )
        base = module.get_base_layer()
        if isinstance(base, nn.Linear):
            kind = "linear"
        elif conv1d and isinstance(base, conv1d):
            kind = "conv1d"
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise UnsupportedAdapterError(f"module {name!r}: grouped Conv2d (groups={base.groups}) is not supported.")
            if base.padding_mode != "zeros":  # found here, when FlatLoRA, SAM or a space is built
                raise UnsupportedAdapterError(f"module {name!r}: Conv2d with padding_mode={base.padding_mode!r} is not "
                                              "supported (the perturbed convolution pads with zeros); use "
                                              "padding_mode='zeros'.")
            kind = "conv2d"
        else:
            raise UnsupportedAdapterError(
                f"module {name!r}: LoRA on {type(base).__name__} is not supported "
                "(supported base layers: nn.Linear, transformers Conv1D, nn.Conv2d)."
            )
        views.append(LoRALayerView(name=name, module=module, base_layer=base, adapter=adapter, kind=kind))
    if not views:
        raise UnsupportedAdapterError(
            "the model has no active LoRA layer: wrap it with peft.get_peft_model(model, LoraConfig(...)) "
            "(method 'full-ft' needs no LoRA)."
        )
    return views


def base_weight_names(model: nn.Module) -> list[str]:
    """Names of the base-weight parameters of all LoRA-adapted layers."""
    return [v.weight_name for v in lora_layers(model)]


def transposed_weights(model: nn.Module) -> set[str]:
    """Qualified names of the weights stored in × out, the transpose of the out × in convention: those of
    transformers' ``Conv1D`` (GPT-2's attention and MLP projections, peft's ``fan_in_fan_out``), whether
    LoRA wraps the layer or not. An output unit of such a weight is a column, not a row."""
    conv1d = _conv1d_type()
    return {f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, conv1d)}
