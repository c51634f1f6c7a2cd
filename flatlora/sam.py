"""SAM and ASAM on any parameter set, and on the merged weights of LoRA layers.

Sharpness-aware minimization (Foret et al., ICLR 2021) minimizes max_{‖ε‖₂ ≤ ρ} L(θ + ε) with one
ascent step per optimizer step:

    g = ∇L(θ),    ε = ρ · g / ‖g‖₂,    then the base optimizer's step at θ with ∇L(θ + ε).

ASAM (Kwon et al., ICML 2021) measures the neighbourhood in coordinates scaled by T = |θ| + η:

    ε = ρ · T² g / ‖T g‖₂,    η = 0.01.

Which tensors ASAM scales (``adaptive_scope``): ``"all"`` (the default) applies T = |θ| + η to every
tensor of θ, biases and a head's included; ``"weights"`` applies it only to the parameters whose
name contains ``weight`` and gives the others T = 1, SAM's scaling — what the authors' code does
(SamsungLabs/ASAM, ``ascent_step``: ``if 'weight' in n``). We keep ``"all"`` as the default because
it is the paper's definition — the element-wise operator T_w = diag(|w_1|, …, |w_k|) runs over every
coordinate of w — and the one that has the invariance ASAM is built on: multiplying a ReLU unit's
incoming weights *and its bias* by a > 0 and its outgoing weights by 1/a leaves the function
unchanged, and Kwon et al.'s condition T_{Aθ}⁻¹A = T_θ⁻¹ holds for that rescaling A on every
coordinate with T = |θ| (η → 0), but not on a bias held at T = 1. The choice matters only where θ
holds biases or normalization parameters: the head of ``asam-lora``, or full models; every tensor of
the merged space (``asam-full``) is a weight matrix.

The norm is taken over the whole space at once. Two spaces for a LoRA model (Li et al., ICML 2025,
Table 6 — SAM on A, B: 2× time; SAM on W: 2× time and O(mn) memory):

* :class:`SAM` — θ is a parameter set: the trainable parameters of a LoRA model (A, B and any head:
  methods ``sam-lora``, ``asam-lora``) or every parameter (``sam``, full fine-tuning). ε is added to
  θ in place and θ is restored bit-exactly from a copy.
* :class:`MergedSAM` — θ is the merged weights W' = W + s·B·A of the adapted layers (``sam-full``,
  ``asam-full``). g_W = ∂L/∂W' is the ``.grad`` of a zero ΔW that requires grad, given to
  :func:`flatlora.perturbed`; the second pass runs at W' + ε_W through :func:`flatlora.perturbed` in
  exact mode. W is never written and A, B do not move until the base optimizer's step. The extra
  memory is O(mn) per adapted layer: g_W during the first pass, ε_W during the second. The head (any
  trainable parameter that is not a LoRA factor) is *not* in θ: its gradient is not in ‖g‖, it is
  not perturbed, and it is trained with its gradient at (W' + ε_W, head) — θ is the merged space of
  DESIGN §3.3, which holds the adapted layers only.

One optimizer step, over the micro-batches of that step::

    with sam.first_pass():                          # g at θ, accumulated over the micro-batches
        loss_fn(model, batch).backward()
    sam.first_step(zero_grad=True)                  # θ + ε
    with sam.second_pass():                         # ∇L(θ + ε), accumulated likewise
        loss_fn(model, batch).backward()
    sam.second_step()                               # back to θ; the base optimizer's step

``step(closure)`` runs all four (the closure computes the loss, calls ``backward`` and returns the
loss). For :class:`SAM` the two pass contexts do nothing; :class:`MergedSAM` needs them.

* Gradient accumulation: ε comes from whatever gradient has accumulated when ``first_step`` is
  called — run the first pass over all micro-batches of the step, then the second over all of them
  (:class:`flatlora.methods.SAMStep` and :class:`flatlora.SAMTrainer` do).
* Mixed precision: scale both passes' losses with the GradScaler. ε = ρ g/‖g‖ does not depend on the
  scale, so ``first_step`` uses the scaled gradients as they are and nothing is unscaled before
  the one ``scaler.step`` (or ``scaler.unscale_`` before clipping). Pass the scaler to ``first_step``:
  a first gradient that is not finite then skips the ascent, leaves NaN gradients so that
  ``scaler.step`` skips the step and ``scaler.update`` lowers the scale; without a scaler it raises
  :class:`FloatingPointError`. Under several processes the ranks agree first (one all-reduce of a
  flag), so all of them skip, or all of them raise. Parameters are changed with in-place ops only,
  never by assigning ``.data``.
* BatchNorm: run the second pass under :func:`running_stats_frozen` so that running statistics are
  updated once per micro-batch, by the first pass (the runner and the Trainer do).
* Several processes (DDP, ``torchrun``): the first pass runs under ``no_sync()`` (the runner and the
  Trainer do), so each rank has the gradient of its own batch, and ``gradient`` chooses what ε comes
  from. ``"local"`` (the default): each rank's ε from its own gradient — Foret et al.'s m-sharpness
  with m = the per-rank batch, as their multi-accelerator implementation does (they report that a
  smaller m tends to generalize better); no communication beyond DDP's usual one. ``"global"``:
  the ε-gradients are averaged over the ranks in ``first_step`` (one more all-reduce of the size of
  θ's gradient: for MergedSAM the m×n g_W of every adapted layer, which DDP would never sync since it
  is no parameter's gradient), so every rank takes the same ε and W processes with batch b compute
  what one process computes with batch W·b. The second pass is synced by DDP as usual: the update
  is the mean over ranks of ∇L_r(θ + ε_r). In one process both choices are the same.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from . import distributed
from .lora_view import UnsupportedAdapterError, lora_layers
from .perturb import perturbed

__all__ = ["SAM", "MergedSAM", "SAMOptions", "sam_epsilon", "running_stats_frozen", "SAMVariant", "SAM_VARIANTS",
           "build_sam", "resolve_sam", "optimizer_params", "SAM_GRADIENTS", "ADAPTIVE_SCOPES", "check_rho",
           "check_eta", "check_sam_gradient", "check_adaptive_scope"]

BaseOptimizer = Union[type, torch.optim.Optimizer]
SAM_GRADIENTS = ("local", "global")  # what ε comes from under several processes (module docstring)
ADAPTIVE_SCOPES = ("all", "weights")  # which tensors ASAM scales by |θ| + η (module docstring)


def _finite_nonnegative(name: str, value: float, meaning: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} ({meaning}) must be a finite number >= 0, got {value!r}")
    return float(value)


def check_rho(rho: float, name: str = "rho") -> float:
    """ρ, the radius of SAM's neighbourhood, checked: a finite number ≥ 0 (0: plain training); as a float."""
    return _finite_nonnegative(name, rho, "the SAM radius ρ")


def check_eta(eta: float, name: str = "eta") -> float:
    """η of ASAM's T = |θ| + η, checked: a finite number ≥ 0. Returns it as a float."""
    return _finite_nonnegative(name, eta, "ASAM's η in T = |θ| + η")


def check_sam_gradient(gradient: str, name: str = "gradient") -> str:
    """The SAM gradient mode, checked: one of :data:`SAM_GRADIENTS` (what ε comes from under several
    processes: each rank's own gradient, or their mean)."""
    if gradient not in SAM_GRADIENTS:
        raise ValueError(f"{name} must be one of {SAM_GRADIENTS} (what SAM's ε comes from under several processes: "
                         f"each rank's own gradient, or their mean), got {gradient!r}")
    return gradient


def check_adaptive_scope(scope: str, name: str = "adaptive_scope") -> str:
    """ASAM's scope, checked: one of :data:`ADAPTIVE_SCOPES` (see the module docstring)."""
    if scope not in ADAPTIVE_SCOPES:
        raise ValueError(f"{name} must be one of {ADAPTIVE_SCOPES} (which tensors ASAM scales by |θ| + η: every one, "
                         f"or only those named '*weight*' as in SamsungLabs/ASAM), got {scope!r}")
    return scope


@dataclass(frozen=True, kw_only=True)
class SAMOptions:
    """The settings of a SAM-family method, and the one place their defaults are written.

    Attributes:
        rho: ρ ≥ 0; ``None`` takes the method's default (:data:`SAM_VARIANTS`).
        gradient: under several processes, ε from each rank's own gradient (``"local"``) or from
            their mean (``"global"``): see the module docstring.
        eta: η ≥ 0 of ASAM's T = |θ| + η (Kwon et al.'s 0.01).
        adaptive_scope: which tensors ASAM scales, ``"all"`` or ``"weights"`` (module docstring).
    """

    rho: Optional[float] = None
    gradient: str = "local"
    eta: float = 0.01
    adaptive_scope: str = "all"

    def __post_init__(self):
        if self.rho is not None:
            check_rho(self.rho)
        check_sam_gradient(self.gradient)
        check_eta(self.eta)
        check_adaptive_scope(self.adaptive_scope)


def sam_epsilon(
    grads: Sequence[torch.Tensor], rho: float, *, points: Optional[Sequence[Optional[torch.Tensor]]] = None,
    eta: float = SAMOptions.eta,
) -> Optional[list[torch.Tensor]]:
    """The ascent step over a set of tensors, ‖·‖₂ taken over all of them together.

    SAM: ε = ρ g / ‖g‖₂. ASAM, when the current ``points`` θ are given: ε = ρ T² g / ‖T g‖₂ with
    T = |θ| + η per coordinate; a ``None`` point gives its tensor T = 1 (SAM's scaling, as
    SamsungLabs/ASAM does for biases). A zero gradient gives ε = 0. Returns ``None`` when the norm is
    not finite.
    """
    scales = [None] * len(grads) if points is None else [None if x is None else x.abs() + eta for x in points]
    scaled = [g if t is None else t * g for t, g in zip(scales, grads)]  # T g
    device = grads[0].device
    norm = float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32).to(device) for t in scaled])))
    if not math.isfinite(norm):
        return None
    c = rho / norm if norm > 0 else 0.0
    return [tg * c if t is None else t * tg * c for t, tg in zip(scales, scaled)]  # T · T g · ρ/‖T g‖


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in training mode normalize with the batch's statistics but leave their running
    statistics and ``num_batches_tracked`` untouched (``track_running_stats`` is off inside).

    SAM's second pass runs under it, so running statistics are updated once per micro-batch, as in
    plain training (davda54/sam updates them twice)."""
    layers = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters an optimizer updates, in group order (what SAM perturbs, what a runner clips)."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def _merged_space(model: nn.Module):
    try:
        return lora_layers(model)
    except UnsupportedAdapterError as e:
        raise UnsupportedAdapterError(f"SAM on the merged weights (MergedSAM, sam-full) needs LoRA layers: {e} "
                                      "For full fine-tuning use SAM / method 'sam'.") from e


class _SharpnessAware(torch.optim.Optimizer):
    """What SAM and MergedSAM share: the base optimizer, the two steps, the closure step.

    Subclasses say where ε lives: ``_gradients`` (where, g there, θ for ASAM), ``_ascend`` (move to
    θ + ε), ``restore`` (back to θ), and the two pass contexts."""

    def __init__(self, params: Iterable[torch.Tensor], base_optimizer: BaseOptimizer, rho: float, adaptive: bool,
                 eta: float, gradient: str, adaptive_scope: str, **kwargs):
        # ρ is a number here (a method's default, rho=None, is resolved by build_sam); SAMOptions checks the rest
        SAMOptions(rho=check_rho(rho), gradient=gradient, eta=eta, adaptive_scope=adaptive_scope)
        params = list(params)
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if kwargs:
                raise TypeError(f"settings {sorted(kwargs)} are for the base optimizer's constructor: give its class, "
                                "or set them on the instance")
            if {id(p) for p in params} != {id(p) for p in optimizer_params(base_optimizer)}:
                raise ValueError("the base optimizer instance must update exactly the parameters SAM perturbs")
        elif not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer class or instance, got {base_optimizer!r}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, eta=eta))
        if isinstance(base_optimizer, type):
            base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.rho, self.adaptive, self.eta, self.gradient = float(rho), bool(adaptive), float(eta), gradient
        self.adaptive_scope = adaptive_scope

    # --- where ε lives (subclasses) --------------------------------------------------------------
    def _gradients(self) -> tuple[list, list[torch.Tensor], Optional[list[Optional[torch.Tensor]]]]:
        """(where ε goes, g there, the points θ for ASAM — None for a tensor it leaves at T = 1 — or None)."""
        raise NotImplementedError

    def _ascend(self, where: list, eps: list[torch.Tensor]) -> None:
        """Move to θ + ε."""
        raise NotImplementedError

    def restore(self) -> None:
        """Back from θ + ε to θ (bit-exact); gradients are kept."""
        raise NotImplementedError

    def first_pass(self) -> ContextManager:
        """Run the first pass's forward and backward inside (needed by :class:`MergedSAM`)."""
        return contextlib.nullcontext()

    def second_pass(self) -> ContextManager:
        """Run the second pass's forward and backward inside (needed by :class:`MergedSAM`)."""
        return contextlib.nullcontext()

    # --- the two steps ---------------------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, scaler: Optional[torch.amp.GradScaler] = None) -> bool:
        """θ ← θ + ε, ε from the gradient accumulated so far (``gradient="global"``: averaged over the
        ranks first). Returns whether it moved.

        With a GradScaler (the one that scaled the losses), a gradient that is not finite moves
        nothing, leaves NaN gradients (so ``scaler.step`` skips this step and ``scaler.update``
        lowers the scale) and returns False: skip the second pass. Without a scaler it raises
        FloatingPointError. Under several processes the decision is shared (one all-reduce of a flag
        every step): if any rank's gradient is not finite, every rank skips, or every rank raises —
        never one rank alone, which would leave the others waiting in the second pass's collective."""
        where, grads, points = self._gradients()
        if self.gradient == "global":
            distributed.all_reduce_mean_(grads)
        eps = sam_epsilon(grads, self.rho, points=points, eta=self.eta)
        if not distributed.all_ranks(eps is not None):
            if scaler is None or not scaler.is_enabled():
                which = "on this rank" if eps is None else "on another rank (this rank's is finite)"
                raise FloatingPointError(f"the gradient at θ is not finite (inf/NaN) {which} and no GradScaler is "
                                         "active to skip the step: lower the learning rate, or scale the loss with a "
                                         "GradScaler")
            for p in optimizer_params(self):
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
            return False
        self._ascend(where, eps)
        if zero_grad:
            self.zero_grad()
        return True

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler: Optional[torch.amp.GradScaler] = None) -> None:
        """θ + ε ← θ, then the base optimizer's step with ∇L(θ + ε) — through ``scaler.step`` when a
        GradScaler is given (it unscales once and skips the step on inf/NaN; call ``scaler.update()``)."""
        self.restore()
        if scaler is None:
            self.base_optimizer.step()
        else:
            scaler.step(self.base_optimizer)
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None,
             scaler: Optional[torch.amp.GradScaler] = None) -> torch.Tensor:
        """One SAM step: ``closure`` (forward, ``backward``, return the loss) runs at θ, then at θ + ε.
        Returns the loss at θ. With a GradScaler the closure scales its loss; call ``scaler.update()`` after."""
        if closure is None:
            raise TypeError(f"{type(self).__name__}.step needs a closure that computes the loss, calls backward and "
                            "returns the loss (it runs twice); or call first_step and second_step yourself")
        closure = torch.enable_grad()(closure)
        self.zero_grad()
        with self.first_pass():
            loss = closure()
        if self.first_step(zero_grad=True, scaler=scaler):
            with self.second_pass():
                closure()
        self.second_step(scaler=scaler)
        return loss

    # the state worth saving is the base optimizer's (SAM keeps nothing between steps)
    def state_dict(self) -> dict:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)


class SAM(_SharpnessAware):
    """SAM / ASAM on a parameter set θ (davda54/sam's interface, with AMP and accumulation handled).

    ε = ρ g/‖g‖₂ (SAM, Foret et al., 2021) or ε = ρ T²g/‖Tg‖₂ with T = |θ| + η (ASAM, Kwon et al.,
    2021), the norm over all of θ; θ + ε is taken in place and θ restored from a copy.

    Args:
        params: θ — e.g. the trainable parameters of a LoRA model (A, B, a head) or of a full model:
            tensors, or (name, tensor) pairs as ``model.named_parameters()`` gives them.
        base_optimizer: an optimizer class, built on ``params`` with ``**kwargs`` (``SAM(params,
            torch.optim.AdamW, lr=5e-4)``), or an optimizer instance that updates exactly ``params``.
        rho: ρ ≥ 0 (Foret et al.'s default 0.05; Li et al. 2025 found 0.003 best for the LoRA factors).
        adaptive: ASAM instead of SAM. eta: η of ASAM's T = |θ| + η.
        gradient: under several processes, ε from each rank's own gradient (``"local"``) or from their
            mean (``"global"``): see the module docstring.
        adaptive_scope: ASAM's T = |θ| + η on every tensor (``"all"``) or on the parameters whose name
            contains ``weight`` only, T = 1 on the others (``"weights"``, SamsungLabs/ASAM's rule: it
            needs named ``params``). See the module docstring for why ``"all"`` is the default.
    """

    def __init__(self, params: Iterable[torch.Tensor | tuple[str, torch.Tensor]], base_optimizer: BaseOptimizer,
                 rho: float = 0.05, adaptive: bool = False, eta: float = SAMOptions.eta,
                 gradient: str = SAMOptions.gradient, adaptive_scope: str = SAMOptions.adaptive_scope, **kwargs):
        items = list(params)
        named = bool(items) and all(isinstance(x, tuple) for x in items)
        tensors = [p for _, p in items] if named else items
        if adaptive and adaptive_scope == "weights" and not named:
            raise ValueError("adaptive_scope='weights' tells weights from other tensors by name ('weight' in it, as "
                             "SamsungLabs/ASAM does): pass params as model.named_parameters() or (name, tensor) pairs")
        super().__init__(tensors, base_optimizer, rho, adaptive, eta, gradient, adaptive_scope, **kwargs)
        # the tensors ASAM leaves at T = 1
        self._unscaled = ({id(p) for n, p in items if "weight" not in n}
                          if adaptive and adaptive_scope == "weights" else set())

    def _gradients(self):
        params = [p for p in optimizer_params(self) if p.grad is not None]
        if not params:
            raise RuntimeError("no parameter has a gradient: call loss.backward() before first_step "
                               "(the closure given to step must call backward)")
        points = [None if id(p) in self._unscaled else p for p in params] if self.adaptive else None
        return params, [p.grad for p in params], points

    def _ascend(self, params, eps):
        for p, e in zip(params, eps):
            self.state[p]["theta"] = p.detach().clone()
            p.add_(e)

    @torch.no_grad()
    def restore(self) -> None:
        for p in optimizer_params(self):
            theta = self.state[p].pop("theta", None)
            if theta is not None:
                p.copy_(theta)


class MergedSAM(_SharpnessAware):
    """SAM / ASAM on the merged weights W' = W + s·B·A of a LoRA model's adapted layers.

    g_W = ∂L/∂W' per layer; ε_W = ρ g_W/‖g_W‖₂ (SAM) or ρ T² g_W/‖T g_W‖₂ with T = |W'| + η (ASAM),
    the norm over all adapted layers together; the second pass runs at W' + ε_W, and the base optimizer
    updates A, B (and the head) with the gradient found there. Both passes go through
    :func:`flatlora.perturbed` in exact mode: the base weights are never written. The head is not part
    of θ (see the module docstring).

    Args:
        model: a peft model with plain LoRA layers (:func:`flatlora.lora_layers`).
        base_optimizer: an optimizer class, built on the model's trainable parameters with ``**kwargs``,
            or an optimizer instance (it defines what is trained).
        rho: ρ ≥ 0 (Li et al. 2025: 0.05 best for SAM on W on T5/GLUE). adaptive, eta, gradient: as
            :class:`SAM`. adaptive_scope: accepted for symmetry with :class:`SAM`; every tensor of the
            merged space is a weight matrix W', so both scopes give the same ε.

    Attributes:
        epsilon: ε_W per layer name (m×n, out × in) between ``first_step`` and ``restore``, else None.
    """

    def __init__(self, model: nn.Module, base_optimizer: BaseOptimizer, rho: float = 0.05, adaptive: bool = False,
                 eta: float = SAMOptions.eta, gradient: str = SAMOptions.gradient,
                 adaptive_scope: str = SAMOptions.adaptive_scope, **kwargs):
        self.layers = _merged_space(model)
        params = (optimizer_params(base_optimizer) if isinstance(base_optimizer, torch.optim.Optimizer)
                  else [p for p in model.parameters() if p.requires_grad])
        super().__init__(params, base_optimizer, rho, adaptive, eta, gradient, adaptive_scope, **kwargs)
        self._probes: Optional[dict[str, torch.Tensor]] = None
        self.epsilon: Optional[dict[str, torch.Tensor]] = None

    def first_pass(self) -> ContextManager:
        """Inside, every adapted layer computes with W + ΔW for a zero ΔW that requires grad (the same
        ΔW for every micro-batch until ``first_step``), so backward leaves ΔW.grad = ∂L/∂W'."""
        if self._probes is None:
            # a stride-0 zero: no m×n buffer for ΔW itself, only for its gradient
            self._probes = {v.name: torch.zeros((), dtype=torch.promote_types(v.weight.dtype, torch.float32),
                                                device=v.weight.device).expand(*v.shape).requires_grad_()
                            for v in self.layers}
        return perturbed(self.layers, self._probes)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also drops the first pass's ΔW (and with it any g_W accumulated so far)."""
        super().zero_grad(set_to_none)
        self._probes = None

    def second_pass(self) -> ContextManager:
        """Inside, every adapted layer computes with W + ε_W (exact mode: W is not written)."""
        if self.epsilon is None:
            raise RuntimeError("second_pass needs ε: call first_step after the first pass")
        return perturbed(self.layers, self.epsilon)

    def _gradients(self):
        probes, self._probes = self._probes or {}, None
        reached = [(v, probes[v.name].grad) for v in self.layers if v.name in probes and probes[v.name].grad is not None]
        if not reached:
            raise RuntimeError("no gradient reached the merged weights: run the first forward and backward inside "
                               "`with sam.first_pass():` (step(closure) does), and call backward")
        views = [v for v, _ in reached]
        points = [v.merged_weight().detach() for v in views] if self.adaptive else None
        return views, [g for _, g in reached], points

    def _ascend(self, views, eps):
        self.epsilon = {v.name: e for v, e in zip(views, eps)}

    def restore(self) -> None:
        self.epsilon = None


# ----------------------------------------------------------------------------- the five methods
@dataclass(frozen=True, kw_only=True)
class SAMVariant:
    """A SAM-family training method: where ε lives, SAM or ASAM, and its default ρ."""

    merged: bool  # θ = the merged weights W' (MergedSAM), else the trainable parameters (SAM)
    adaptive: bool
    rho: float
    uses_lora: bool
    description: str


# Default ρ: Li et al. 2025 (T5 on GLUE) found 0.05 best for SAM on W and 0.003 for SAM on A, B;
# Foret et al.'s 0.05 for full fine-tuning (on rt-minilm it slowed the first 100 steps far more than
# 0.01 did: see tests/test_sam_train.py). No such search exists for ASAM on LoRA: we keep Kwon et al.'s
# ratio ρ_ASAM = 10 ρ_SAM (their CIFAR setting, 0.5 vs 0.05; 0.5 is the official code's default).
SAM_VARIANTS: dict[str, SAMVariant] = {
    "sam": SAMVariant(merged=False, adaptive=False, rho=0.05, uses_lora=False,
                      description="SAM on every parameter (full fine-tuning; Foret et al., 2021)"),
    "sam-lora": SAMVariant(merged=False, adaptive=False, rho=0.003, uses_lora=True,
                           description="SAM on the trainable parameters: A, B and the head"),
    "asam-lora": SAMVariant(merged=False, adaptive=True, rho=0.03, uses_lora=True,
                            description="ASAM (Kwon et al., 2021) on A, B and the head"),
    "sam-full": SAMVariant(merged=True, adaptive=False, rho=0.05, uses_lora=True,
                           description="SAM on the merged weights W' = W + sBA (Li et al., 2025)"),
    "asam-full": SAMVariant(merged=True, adaptive=True, rho=0.5, uses_lora=True,
                            description="ASAM on the merged weights W' = W + sBA"),
}


def resolve_sam(method: str, model: nn.Module, options: SAMOptions = SAMOptions()) -> tuple[SAMVariant, float]:
    """Check a SAM-family method against its model before any work (``options`` check themselves);
    return its variant and ρ (the method's default where ``options.rho`` is None).

    Raises ValueError (unknown method) or UnsupportedAdapterError (a merged-space method on a model
    without LoRA layers)."""
    if method not in SAM_VARIANTS:
        raise ValueError(f"unknown SAM method {method!r}; choose one of {sorted(SAM_VARIANTS)}")
    v = SAM_VARIANTS[method]
    if v.merged:
        _merged_space(model)
    return v, v.rho if options.rho is None else options.rho


def build_sam(method: str, model: nn.Module, optimizer: torch.optim.Optimizer,
              options: SAMOptions = SAMOptions()) -> _SharpnessAware:
    """The SAM object of a SAM-family method around an existing optimizer (ρ = the method's default
    where ``options.rho`` is None). The parameters go to :class:`SAM` with their names in ``model``."""
    v, rho = resolve_sam(method, model, options)
    settings = dict(rho=rho, adaptive=v.adaptive, eta=options.eta, gradient=options.gradient,
                    adaptive_scope=options.adaptive_scope)
    if v.merged:
        return MergedSAM(model, optimizer, **settings)
    names = {id(p): n for n, p in model.named_parameters()}
    return SAM([(names[id(p)], p) for p in optimizer_params(optimizer)], optimizer, **settings)
