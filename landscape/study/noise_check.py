"""Does Flat-LoRA's noise do anything? Its effect on the gradient against the mini-batch noise
(issue 14.3).

Flat-LoRA trains on ∇L_b(W + s·B·A + ε) with ε ~ filter noise of scale σ (Li et al., ICML 2025). If
one draw of ε changes the gradient far less than drawing another mini-batch does, the noise is
drowned by SGD's own and cannot steer training. For batches b₁ … b_K (b_{K+1} = b₁) and the LoRA
factors A, B of every layer (what the noise acts through; a loaded run's frozen factors included),
with g(b) = ∇L_b at the model as it is:

* ``noise_change``  = ‖g_ε(b) − g(b)‖ / ‖g(b)‖, g_ε the gradient under one draw of ε at σ;
* ``batch_change``  = ‖g(b_{k+1}) − g(b_k)‖ / ‖g(b_k)‖;
* ``noise_cosine`` / ``batch_cosine``: the cosines of the same pairs.

One row per (σ, batch): compare the two columns' means. The model is not changed (each noise draw
is applied by :meth:`flatlora.FlatLoRA.perturb`, which restores W bit for bit).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import pandas as pd
import torch
from torch import nn

from flatlora import FlatLoRA, batch_loss, lora_layers

__all__ = ["noise_gradient_effect"]


def _gradient(model: nn.Module, params: list[torch.Tensor], loss_fn: Callable, batch: Any) -> torch.Tensor:
    grads = torch.autograd.grad(loss_fn(model, batch), params)
    return torch.cat([g.reshape(-1) for g in grads]).double()


def noise_gradient_effect(model: nn.Module, batches: Sequence[Any], sigmas: Sequence[float], *,
                          loss_fn: Callable = batch_loss, seed: int = 0) -> pd.DataFrame:
    """Per σ and batch: the relative gradient change from one noise draw and from the next batch (see
    the module docstring). Dropout is off (eval mode), so that the only randomness is ε and the batch;
    the model's mode is restored."""
    if len(batches) < 2:
        raise ValueError(f"noise_gradient_effect needs at least 2 batches to compare batch to batch, got {len(batches)}")
    if not sigmas or any(not s > 0 for s in sigmas):
        raise ValueError(f"sigmas must be > 0, got {list(sigmas)}")
    params = [p for v in lora_layers(model) for p in (v.lora_A_param, v.lora_B_param)]
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        clean = [_gradient(model, params, loss_fn, b) for b in batches]
        rows = []
        for sigma in sigmas:
            flat = FlatLoRA(model, sigma=float(sigma), schedule="constant", total_steps=1, seed=seed)
            for k, b in enumerate(batches):
                with flat.perturb(k):
                    noisy = _gradient(model, params, loss_fn, b)
                g, nxt = clean[k], clean[(k + 1) % len(batches)]
                rows.append({"sigma": float(sigma), "batch": k,
                             "noise_change": float((noisy - g).norm() / g.norm()),
                             "batch_change": float((nxt - g).norm() / g.norm()),
                             "noise_cosine": float(torch.nn.functional.cosine_similarity(noisy, g, dim=0)),
                             "batch_cosine": float(torch.nn.functional.cosine_similarity(nxt, g, dim=0))})
        return pd.DataFrame(rows)
    finally:
        model.train(was_training)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
