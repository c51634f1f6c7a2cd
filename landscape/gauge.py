"""LoRA's gauge and the balanced copy that fixes it (DESIGN §3.3).

A LoRA layer computes with W' = W + s·B·A (B m×r, A r×n, s the scaling). Every factorization
(B·R, R⁻¹·A), R ∈ GL(r) — (B/c, A·c) among them — is the same function with the same merged
weights, but not the same point of the LoRA space: its Hessian there changes with R (on a trained
MiniLM adapter λ₁ was 22.7, 7.4 and 9.1 for c = 0.5, 1, 2 while the merged λ₁ stayed 44.8). Gradient
descent does not pick a gauge either: gradient flow conserves BᵀB − AAᵀ (Du, Hu & Lee, 2018,
"Algorithmic regularization in learning deep homogeneous models: layers are automatically
balanced"), so a peft adapter (B₀ = 0) keeps BᵀB − AAᵀ ≈ −A₀A₀ᵀ, the imprint of A's random init.

**The balanced gauge.** With the thin SVD of the layer's update, s·B·A = U S Vᵀ (U m×r, V n×r
orthonormal columns, S = diag(S₁ ≥ … ≥ S_r ≥ 0)),

    B̂ = U (S/s)^½,    Â = (S/s)^½ Vᵀ,

so s·B̂·Â = U S Vᵀ = s·B·A (the function and the merged weight unchanged) and B̂ᵀB̂ = ÂÂᵀ = S/s
(balanced). The scaling cancels: S/s = Σ, the singular values of B·A itself, so the balanced
factors of B·A are those of s·B·A. For a product of rank r they are unique up to (B̂Q, QᵀÂ), Q
orthogonal r×r (write B = U Σ^½ R, A = R⁻¹ Σ^½ Vᵀ: balance means (RRᵀ) Σ (RRᵀ) = Σ, so RRᵀ = I), and
that is a rotation of the LoRA coordinates, (δA, δB) ↦ (QᵀδA, δB·Q), an isometry: the Hessian's
spectrum in the LoRA space at the balanced point is the same for every gauge (B·R, R⁻¹·A) of the
same adapter — comparable across runs. The balanced factors are also
those of least norm: min over B·A = M of ½(‖A‖²_F + ‖B‖²_F) = ‖M‖_* (Srebro, Rennie & Jaakkola, 2005).

The SVD is taken without forming the m×n product: B = Q_B R_B, Aᵀ = Q_A R_A (QR), the r×r core
R_B R_Aᵀ = U_c Σ V_cᵀ, and U = Q_B U_c, V = Q_A V_c — O((m + n) r²), in float64.

* :func:`balance_factors` — (Â, B̂) of one layer's factors;
* :func:`balanced_copy` — a copy of a model with every LoRA layer balanced (the model is not written:
  probing never changes the model, DESIGN §3.3); probe the copy's ``lora`` space;
* :func:`gauge_imbalance` — how far a model's layers are from balanced.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from flatlora import lora_layers

__all__ = ["balance_factors", "balanced_copy", "gauge_imbalance"]


def balance_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The balanced factors (Â, B̂) of one layer (see the module docstring): Â = Σ^½ Vᵀ (r×n) and
    B̂ = U Σ^½ (m×r) from the SVD B·A = U Σ Vᵀ, so that B̂·Â = B·A and B̂ᵀB̂ = ÂÂᵀ = Σ. ``a`` is r×n,
    ``b`` m×r (a conv layer's factors as matrices, :class:`flatlora.LoRALayerView`'s ``lora_A`` and
    ``lora_B``); computed in float64, returned in the inputs' dtype and device."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(f"balance_factors takes A (r×n) and B (m×r) with the same r; got A {tuple(a.shape)}, "
                         f"B {tuple(b.shape)} (pass a LoRALayerView's lora_A and lora_B)")
    q_b, r_b = torch.linalg.qr(b.detach().to(torch.float64))
    q_a, r_a = torch.linalg.qr(a.detach().to(torch.float64).t())
    u, sigma, vt = torch.linalg.svd(r_b @ r_a.t(), full_matrices=False)
    root = sigma.sqrt()
    a_hat = root[:, None] * (vt @ q_a.t())
    b_hat = (q_b @ u) * root[None, :]
    missing = a.shape[0] - root.numel()  # r > min(m, n): the factors' rank is at most min(m, n); pad with zeros
    a_hat = torch.cat([a_hat, a_hat.new_zeros(missing, a_hat.shape[1])])
    b_hat = torch.cat([b_hat, b_hat.new_zeros(b_hat.shape[0], missing)], dim=1)
    return a_hat.to(dtype=a.dtype, device=a.device), b_hat.to(dtype=b.dtype, device=b.device)


def balanced_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every LoRA layer's factors replaced by their balanced ones
    (:func:`balance_factors`): the same function, the same merged weights, BᵀB = AAᵀ per layer. The
    model itself is not touched; the copy keeps its ``requires_grad`` flags and train / eval modes.
    LoRA-space measures of the copy (``landscape.hessian_eigenvalues(balanced_copy(model), loss,
    "lora")``) are free of the gauge. It costs a second copy of the model's memory.

    Raises:
        flatlora.UnsupportedAdapterError: the model has no plain LoRA layer.
    """
    lora_layers(model)  # a model without LoRA layers fails here, before the copy
    out = copy.deepcopy(model)
    with torch.no_grad():
        for view in lora_layers(out):
            a_hat, b_hat = balance_factors(view.lora_A, view.lora_B)
            view.lora_A_param.copy_(a_hat.reshape(view.lora_A_param.shape))
            view.lora_B_param.copy_(b_hat.reshape(view.lora_B_param.shape))
    return out


def gauge_imbalance(model: nn.Module) -> float:
    """max over LoRA layers of ‖BᵀB − AAᵀ‖_F / (‖BᵀB‖_F + ‖AAᵀ‖_F): 0 in the balanced gauge, 1 when
    one factor is zero (peft's initialisation); float64."""
    worst = 0.0
    with torch.no_grad():
        for view in lora_layers(model):
            a, b = view.lora_A.to(torch.float64), view.lora_B.to(torch.float64)
            btb, aat = b.t() @ b, a @ a.t()
            scale = float(torch.linalg.norm(btb) + torch.linalg.norm(aat))
            worst = max(worst, float(torch.linalg.norm(btb - aat)) / scale if scale > 0 else 0.0)
    return worst
