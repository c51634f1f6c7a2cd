"""Training methods: one optimizer step each, over the micro-batches of that step, and a registry.

A :class:`StepRunner` does one optimizer step: forward and backward over every micro-batch (each
loss weighted by its share of the step's samples, so k accumulated micro-batches give the update of
one batch k times the size), gradient clipping, the optimizer update and the LR schedule.
Subclasses change what forward and backward see (Flat-LoRA's noise) or how many passes a step takes
(the SAM family). With a GradScaler and an autocast dtype it trains in mixed precision (the
gradients unscaled once, before clipping; a step with inf/NaN gradients skipped). Given a
``DistributedDataParallel`` wrapper of the model it trains data-parallel: gradients are averaged
over the ranks once per step, in the backward of the step's last micro-batch. The plain loop
(:mod:`flatlora.training`) and scripts pick a runner by method name from :data:`METHODS`.

=============  ====================================================================================
``full-ft``    full fine-tuning, every parameter trainable, no LoRA
``lora``       plain LoRA (Hu et al., 2022)
``flat-lora``  LoRA trained on E_ε L(W + sBA + ε), ε filter-wise Gaussian (Li et al., ICML 2025)
``sam``        SAM on every parameter, full fine-tuning (Foret et al., 2021); default ρ 0.05
``sam-lora``   SAM on the trainable parameters (A, B, head); default ρ 0.003
``asam-lora``  ASAM (Kwon et al., 2021) on A, B, head; default ρ 0.03
``sam-full``   SAM on the merged weights W' = W + sBA of the adapted layers; default ρ 0.05
``asam-full``  ASAM on the merged weights; default ρ 0.5
=============  ====================================================================================

Each method's options are typed, one dataclass per family, which holds their defaults:
:class:`PlainOptions` (none), :class:`~flatlora.flat_lora.FlatLoRAOptions` (σ, schedule, T, seed,
mode, shared noise), :class:`~flatlora.sam.SAMOptions` (ρ, gradient mode, η, ASAM's scope).
The SAM family's defaults and where ε lives: :mod:`flatlora.sam`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Mapping, Optional, Sequence

import torch
from torch import nn

from . import distributed
from .batches import batch_loss, batch_size
from .flat_lora import FlatLoRA, FlatLoRAOptions
from .sam import SAM_VARIANTS, SAMOptions, build_sam, optimizer_params, running_stats_frozen

__all__ = ["StepRunner", "FlatLoRAStep", "SAMStep", "Method", "METHODS", "register_method", "get_method",
           "MethodError", "PlainOptions"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class MethodError(ValueError):
    """Unknown method or options that do not fit it."""


class StepRunner:
    """One optimizer step of plain gradient training over a step's micro-batches.

    Mixed precision: ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the forward passes under
    ``torch.autocast``; ``scaler`` (a ``torch.amp.GradScaler``) scales the losses, unscales the
    gradients once before clipping, and skips a step whose gradients are not finite.

    Data parallelism: ``ddp`` is ``model`` wrapped in ``DistributedDataParallel`` (see
    :func:`flatlora.distributed.wrap_ddp`). Forward passes go through it, under ``no_sync()`` for
    every micro-batch but the step's last, so DDP averages the accumulated gradients over the ranks
    once per step; ``model`` stays the inner module (what Flat-LoRA and SAM perturb). The loss a
    step returns is then the mean over the ranks."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        loss_fn: LossFn = batch_loss,
        max_grad_norm: Optional[float] = None,
        scheduler: Optional[Any] = None,
        scaler: Optional[torch.amp.GradScaler] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        ddp: Optional[nn.Module] = None,
    ):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.max_grad_norm, self.scheduler = max_grad_norm, scheduler
        self.scaler, self.autocast_dtype = scaler, autocast_dtype
        self.ddp = ddp

    def perturbation(self, step: int) -> ContextManager:
        """What forward and backward see at optimizer step ``step`` (nothing special by default)."""
        return contextlib.nullcontext()

    def autocast(self) -> ContextManager:
        """``torch.autocast`` at ``autocast_dtype`` on the model's device (nothing if no dtype is set)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(next(self.model.parameters()).device.type, dtype=self.autocast_dtype)

    def accumulate(self, micro_batches: Sequence[Any], step: int, *, sync: bool = True) -> float:
        """Forward and backward over all micro-batches, gradients summed with weights n_i / Σn.
        Returns this rank's sample-weighted mean loss. Under DDP the last micro-batch's backward
        averages the gradients over the ranks, unless ``sync=False`` (then each rank keeps its own)."""
        total = sum(batch_size(b) for b in micro_batches)
        forward = self.model if self.ddp is None else self.ddp
        loss_sum = 0.0
        for i, b in enumerate(micro_batches):
            share = batch_size(b) / total
            with self._grad_sync(sync and i == len(micro_batches) - 1), self.perturbation(step):
                with self.autocast():
                    loss = self.loss_fn(forward, b)
                (loss * share if self.scaler is None else self.scaler.scale(loss * share)).backward()
            loss_sum += float(loss.detach()) * share
        return loss_sum

    def _grad_sync(self, sync: bool) -> ContextManager:
        """DDP's ``no_sync()`` unless ``sync`` (nothing in one process)."""
        return contextlib.nullcontext() if self.ddp is None or sync else self.ddp.no_sync()

    def _step_loss(self, loss: float) -> float:
        """The step's loss over every rank's samples: the mean over the ranks under DDP."""
        return loss if self.ddp is None else distributed.mean_over_ranks(loss)

    def update(self) -> None:
        """Clip, apply the optimizer and the LR schedule (with a scaler: unscale once, skip on inf/NaN)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(optimizer_params(self.optimizer), self.max_grad_norm)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()

    def step(self, micro_batches: Sequence[Any], step: int) -> float:
        """One optimizer step; returns the step's mean training loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.accumulate(micro_batches, step)
        self.update()
        return self._step_loss(loss)


class FlatLoRAStep(StepRunner):
    """Flat-LoRA: every micro-batch of optimizer step t sees W + s·B·A + ε_t (one ε per step)."""

    def __init__(self, model, optimizer, *, flat_lora: FlatLoRA, **kwargs):
        super().__init__(model, optimizer, **kwargs)
        self.flat_lora = flat_lora

    def perturbation(self, step: int) -> ContextManager:
        return self.flat_lora.perturb(step)


class SAMStep(StepRunner):
    """The SAM family: two passes over all micro-batches of the step (Foret et al., 2021).

    The first pass accumulates g = ∇L(θ) over the step's micro-batches (each weighted by its share
    of the samples), so ε comes from the gradient of the whole step; ``sam.first_step`` moves to
    θ + ε; the second pass accumulates ∇L(θ + ε) over the same micro-batches, with BatchNorm running
    statistics frozen (updated once, by the first pass); ``sam.restore`` returns to θ; then the
    usual clip, optimizer step and LR schedule. With a GradScaler, a first gradient that is not
    finite skips the second pass and the step. Returns the loss at θ.

    Under DDP the first pass is never synced: ε comes from each rank's own gradient, or from their
    mean when the SAM object's ``gradient`` is ``"global"`` (see :mod:`flatlora.sam`); the second
    pass is synced as in plain training.

    Args: ``sam`` — a :class:`flatlora.SAM` or :class:`flatlora.MergedSAM` around ``optimizer``."""

    def __init__(self, model, optimizer, *, sam, **kwargs):
        super().__init__(model, optimizer, **kwargs)
        if sam.base_optimizer is not optimizer:
            raise MethodError("the SAM object must wrap the runner's optimizer (its base_optimizer)")
        self.sam = sam
        self._pass = sam.first_pass

    def perturbation(self, step: int) -> ContextManager:
        return self._pass()

    @contextlib.contextmanager
    def _second_pass(self):
        with self.sam.second_pass(), running_stats_frozen(self.model):
            yield

    def step(self, micro_batches: Sequence[Any], step: int) -> float:
        self.sam.zero_grad(set_to_none=True)
        self._pass = self.sam.first_pass
        loss = self.accumulate(micro_batches, step, sync=False)
        if self.sam.first_step(zero_grad=True, scaler=self.scaler):
            self._pass = self._second_pass
            self.accumulate(micro_batches, step)
        self.sam.restore()
        self.update()
        return self._step_loss(loss)


@dataclass(frozen=True)
class PlainOptions:
    """Plain training (``lora``, ``full-ft``) has no options."""


@dataclass(frozen=True)
class Method:
    """A registered training method.

    ``runner(model, optimizer, options, **runner_kwargs) -> StepRunner`` makes its runner from typed
    ``options``, an instance of ``options_type`` (a frozen dataclass whose field defaults are the
    method's defaults). Call it through :meth:`build`, which also takes a mapping."""

    name: str
    uses_lora: bool
    description: str
    runner: Callable[..., StepRunner]
    options_type: type = PlainOptions

    @property
    def option_names(self) -> tuple[str, ...]:
        """The options the method reads: the fields of ``options_type``."""
        return tuple(f.name for f in dataclasses.fields(self.options_type))

    def options(self, given: Any = None) -> Any:
        """``given`` as this method's typed options: None gives the defaults, a mapping is converted
        (a key that is not an option is an error), an ``options_type`` instance is returned as is."""
        if given is None:
            given = {}
        if isinstance(given, self.options_type):
            return given
        if not isinstance(given, Mapping):
            raise MethodError(f"method {self.name!r} takes {self.options_type.__name__} or a mapping of its fields "
                              f"{list(self.option_names)}, got {type(given).__name__}")
        unknown = sorted(set(given) - set(self.option_names))
        if unknown:
            known = (f"its options are {list(self.option_names)}" if self.option_names else "it takes none")
            raise MethodError(f"method {self.name!r} has no option(s) {unknown}: {known} "
                              f"({self.options_type.__name__}); remove or rename them")
        return self.options_type(**given)

    def build(self, model: nn.Module, optimizer: torch.optim.Optimizer,
              options: Any = None, **runner_kwargs) -> StepRunner:
        """The method's runner on ``model`` and ``optimizer``; ``options`` as :meth:`options` takes
        them; ``runner_kwargs`` go to the runner (``loss_fn``, ``scaler``, ``ddp`` …)."""
        return self.runner(model, optimizer, self.options(options), **runner_kwargs)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method to the registry (also for users' own methods)."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def _plain(model, optimizer, options: PlainOptions, **kw) -> StepRunner:
    return StepRunner(model, optimizer, **kw)


def _flat_lora(model, optimizer, options: FlatLoRAOptions, **kw) -> FlatLoRAStep:
    if options.total_steps is None and options.schedule != "constant":
        raise MethodError(f"flat-lora's {options.schedule!r} σ schedule runs over total_steps, the number of "
                          "optimizer steps: give total_steps, or schedule='constant'")
    return FlatLoRAStep(model, optimizer, flat_lora=FlatLoRA(model, **dataclasses.asdict(options)), **kw)


def _sam(name: str, model, optimizer, options: SAMOptions, **kw) -> SAMStep:
    return SAMStep(model, optimizer, sam=build_sam(name, model, optimizer, options), **kw)


register_method(Method("full-ft", False, "full fine-tuning (every parameter)", _plain))
register_method(Method("lora", True, "plain LoRA", _plain))
register_method(Method("flat-lora", True, "Flat-LoRA: filter-wise weight noise in the merged space", _flat_lora,
                       FlatLoRAOptions))
for _name, _variant in SAM_VARIANTS.items():
    register_method(Method(_name, _variant.uses_lora, _variant.description, functools.partial(_sam, _name),
                           SAMOptions))
