"""Attention kernels that cannot be differentiated twice, and the switch to eager attention.

Hugging Face models pick an attention kernel through ``config._attn_implementation``. SDPA on CPU
(``_scaled_dot_product_flash_attention_for_cpu``), flash and flex attention have no double
backward, so Hessian-vector products by double backward or ``torch.func`` fail on them
("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented").
:func:`eager_attention` switches such a model to ``"eager"`` (plain matmul + softmax, twice
differentiable) for the duration of a context and restores every config's setting afterwards, so
the model is left as it was; :func:`non_eager_attention` reports what a model uses.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

from torch import nn

__all__ = ["non_eager_attention", "require_eager", "eager_attention", "AttentionError", "EAGER_HINT"]

EAGER_HINT = ('load the model with AutoModel….from_pretrained(path, attn_implementation="eager") '
              '(or call model.set_attn_implementation("eager"))')


class AttentionError(RuntimeError):
    """The model's attention cannot be differentiated twice and was not (or could not be) switched to eager."""


def _configs(model: nn.Module) -> list:
    """Every Hugging Face config reachable from the model's modules, sub-configs included (each once)."""
    found, stack = {}, [getattr(m, "config", None) for m in model.modules()]
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in found or not hasattr(cfg, "_attn_implementation_internal"):
            continue
        found[id(cfg)] = cfg
        stack.extend(getattr(cfg, key, None) for key in getattr(cfg, "sub_configs", {}))
    return list(found.values())


def non_eager_attention(model: nn.Module) -> dict[str, str]:
    """``{config class: attention implementation}`` for every config of the model not set to ``"eager"``
    (empty for plain PyTorch models and eager Hugging Face models)."""
    return {type(c).__name__: str(c._attn_implementation_internal) for c in _configs(model)
            if c._attn_implementation_internal != "eager"}


def require_eager(model: nn.Module, why: str = "Hessian-vector products") -> None:
    """Raise :class:`AttentionError`, with the fix, if the model's attention is not eager."""
    used = non_eager_attention(model)
    if used:
        raise AttentionError(f"{why} need double backward, which the model's attention ({used}) lacks; "
                             f"{EAGER_HINT}, or allow the switch (switch_attention=True), or use "
                             "backend='finite-difference'")


def _top_pretrained(model: nn.Module) -> list:
    from transformers import PreTrainedModel

    tops, inside = [], set()
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and id(m) not in inside:
            tops.append(m)
            inside.update(id(s) for s in m.modules())
    return tops


@contextlib.contextmanager
def eager_attention(model: nn.Module, *, switch: bool = True, why: str = "Hessian-vector products") -> Iterator[None]:
    """Inside the context every attention of ``model`` is eager; on exit each config gets its own setting back.

    Args:
        switch: ``False`` raises :class:`AttentionError` instead of switching a non-eager model.
        why: what needs double backward (for the messages).

    Raises:
        AttentionError: ``switch=False`` and the attention is not eager, or the model cannot change its
            attention dynamically; the message says how to load it with eager attention.
    """
    if not switch:
        require_eager(model, why)
    used = non_eager_attention(model)
    if not used:
        yield
        return
    saved = [(c, c._attn_implementation_internal) for c in _configs(model)]
    try:
        for top in _top_pretrained(model):
            if not top._can_set_attn_implementation():
                raise AttentionError(f"{type(top).__name__} cannot change its attention implementation at run time; "
                                     f"{EAGER_HINT}")
            top.set_attn_implementation("eager")
        left = non_eager_attention(model)
        if left:
            raise AttentionError(f"could not switch {left} to eager attention; {EAGER_HINT}")
        warnings.warn(f"{why}: the model's attention {used} has no double backward; using eager attention for "
                      "the computation (the setting is restored afterwards)", UserWarning, stacklevel=3)
        yield
    finally:
        for cfg, impl in saved:
            cfg._attn_implementation_internal = impl
