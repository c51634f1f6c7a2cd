"""Training methods: one optimizer step each, over the micro-batches of that step, and a registry.

A :class:`StepRunner` does one optimizer step: forward and backward over every micro-batch (each
loss weighted by its share of the step's samples, so k accumulated micro-batches give the update of
one batch k times the size), gradient clipping, the optimizer update and the LR schedule.
Subclasses change what forward and backward see (Flat-LoRA's noise) or how many passes a step takes
(the SAM family). The plain loop (:mod:`flatlora.training`) and scripts pick a runner by method name
from :data:`METHODS`.

=============  ====================================================================================
``full-ft``    full fine-tuning, every parameter trainable, no LoRA
``lora``       plain LoRA (Hu et al., 2022)
``flat-lora``  LoRA trained on E_ε L(W + sBA + ε), ε filter-wise Gaussian (Li et al., ICML 2025)
=============  ====================================================================================
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
from torch import nn

from .batches import batch_loss, batch_size
from .flat_lora import FlatLoRA

__all__ = ["StepRunner", "FlatLoRAStep", "Method", "METHODS", "register_method", "get_method", "MethodError"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class MethodError(ValueError):
    """Unknown method or options that do not fit it."""


class StepRunner:
    """One optimizer step of plain gradient training over a step's micro-batches."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        loss_fn: LossFn = batch_loss,
        max_grad_norm: Optional[float] = None,
        scheduler: Optional[Any] = None,
    ):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.max_grad_norm, self.scheduler = max_grad_norm, scheduler

    def perturbation(self, step: int) -> ContextManager:
        """What forward and backward see at optimizer step ``step`` (nothing special by default)."""
        return contextlib.nullcontext()

    def accumulate(self, micro_batches: Sequence[Any], step: int) -> float:
        """Forward and backward over all micro-batches, gradients summed with weights n_i / Σn.
        Returns the sample-weighted mean loss."""
        total = sum(batch_size(b) for b in micro_batches)
        loss_sum = 0.0
        for b in micro_batches:
            share = batch_size(b) / total
            with self.perturbation(step):
                loss = self.loss_fn(self.model, b)
                (loss * share).backward()
            loss_sum += float(loss.detach()) * share
        return loss_sum

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def update(self) -> None:
        """Clip, apply the optimizer and the LR schedule."""
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def step(self, micro_batches: Sequence[Any], step: int) -> float:
        """One optimizer step; returns the step's mean training loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.accumulate(micro_batches, step)
        self.update()
        return loss


class FlatLoRAStep(StepRunner):
    """Flat-LoRA: every micro-batch of optimizer step t sees W + s·B·A + ε_t (one ε per step)."""

    def __init__(self, model, optimizer, *, flat_lora: FlatLoRA, **kwargs):
        super().__init__(model, optimizer, **kwargs)
        self.flat_lora = flat_lora

    def perturbation(self, step: int) -> ContextManager:
        return self.flat_lora.perturb(step)


@dataclass(frozen=True)
class Method:
    """A registered training method.

    ``build(model, optimizer, options, **runner_kwargs) -> StepRunner``; ``options`` holds the
    method's settings (``sigma``, ``schedule``, ``total_steps``, ``seed``, ``mode``, ``rho`` …).
    ``option_names`` lists the options the method reads (the others are rejected)."""

    name: str
    uses_lora: bool
    description: str
    build: Callable[..., StepRunner]
    option_names: tuple[str, ...] = ()


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method to the registry (also for users' own methods)."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def _plain(model, optimizer, options, **kw):
    return StepRunner(model, optimizer, **kw)


def _flat_lora(model, optimizer, options, **kw):
    flat = FlatLoRA(
        model,
        sigma=options.get("sigma", 0.05),
        total_steps=options["total_steps"],
        schedule=options.get("schedule", "cosine"),
        seed=options.get("seed", 0),
        mode=options.get("mode", "exact"),
    )
    return FlatLoRAStep(model, optimizer, flat_lora=flat, **kw)


register_method(Method("full-ft", False, "full fine-tuning (every parameter)", _plain))
register_method(Method("lora", True, "plain LoRA", _plain))
register_method(
    Method("flat-lora", True, "Flat-LoRA: filter-wise weight noise in the merged space", _flat_lora,
           ("sigma", "schedule", "total_steps", "seed", "mode"))
)
