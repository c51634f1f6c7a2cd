"""Hugging Face ``Trainer`` integration: :class:`FlatLoRATrainer` and :class:`SAMTrainer`.

Works with transformers 5: it overrides ``training_step(model, inputs, num_items_in_batch=None)``
(the current signature) and perturbs around the parent's forward and backward. The noise step is
``state.global_step`` — the number of *optimizer* steps done, so all micro-batches of one
accumulated step share one ε, and under DDP every rank counts the same global step; the schedule
length is ``state.max_steps``, also global. Each rank's noise is its own (the seed mixes in
``args.process_index``) unless ``flat_lora_shared_noise``.
"""
from __future__ import annotations

import contextlib
from typing import Optional

from transformers import Trainer

from .flat_lora import FlatLoRA, FlatLoRAOptions
from .sam import SAMOptions, build_sam, resolve_sam, running_stats_frozen

__all__ = ["FlatLoRATrainer", "SAMTrainer"]


class FlatLoRATrainer(Trainer):
    """A ``transformers.Trainer`` that trains LoRA with Flat-LoRA's weight noise.

    Args (besides the Trainer's): ``flat_lora_sigma`` (σ, default 0.05), ``flat_lora_schedule``
    (``cosine``/``linear``/``constant``), ``flat_lora_seed`` (default ``args.seed``),
    ``flat_lora_mode`` (``exact``/``inplace``), ``flat_lora_shared_noise`` (same ε on every rank);
    the defaults are :class:`flatlora.FlatLoRAOptions`'.
    """

    def __init__(self, *args, flat_lora_sigma: float = FlatLoRAOptions.sigma,
                 flat_lora_schedule: str = FlatLoRAOptions.schedule, flat_lora_seed: Optional[int] = None,
                 flat_lora_mode: str = FlatLoRAOptions.mode,
                 flat_lora_shared_noise: bool = FlatLoRAOptions.shared_noise, **kwargs):
        super().__init__(*args, **kwargs)
        self.flat_lora = FlatLoRA(
            self.model, sigma=flat_lora_sigma, total_steps=None, schedule=flat_lora_schedule,
            seed=self.args.seed if flat_lora_seed is None else flat_lora_seed, mode=flat_lora_mode,
            rank=self.args.process_index, shared_noise=flat_lora_shared_noise,
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.flat_lora.total_steps = self.state.max_steps
        with self.flat_lora.perturb(self.state.global_step):
            return super().training_step(model, inputs, num_items_in_batch)


class SAMTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with a SAM-family method (:mod:`flatlora.sam`).

    Args (besides the Trainer's): ``sam_method`` — ``sam-lora`` (default), ``asam-lora``,
    ``sam-full``, ``asam-full`` or ``sam`` (a model without LoRA); ``sam_rho`` (default: the method's,
    see :data:`flatlora.SAM_VARIANTS`); ``sam_eta`` (ASAM's η); ``sam_gradient`` (``local``/``global``:
    what ε comes from under several processes, below); ``sam_adaptive_scope`` (``all``/``weights``:
    which tensors ASAM scales, see :mod:`flatlora.sam`). The defaults are :class:`flatlora.SAMOptions`'.

    Gradient accumulation: the Trainer calls ``training_step`` once per micro-batch and steps the
    optimizer after the last one, but ε must come from the gradient of the whole step. So every
    micro-batch's first pass runs as in plain training (the gradient at θ accumulates) and the
    micro-batch is kept; in the step's last one (``accelerator.sync_gradients``) ε is taken from the
    accumulated gradient, the second pass runs over all kept micro-batches at θ + ε (BatchNorm running
    statistics frozen), θ is restored, and the Trainer's own clipping and optimizer step then apply
    ∇L(θ + ε) at θ. What is kept is the step's input batches, not activations. With fp16, the
    accelerator's GradScaler scales both passes (ε does not depend on the scale) and unscales once,
    at clipping or at the step; a first gradient that overflows skips the second pass and the step.
    The logged loss is the loss at θ.

    Several processes (DDP under ``torchrun`` / ``accelerate launch``): the first pass runs under
    ``accelerator.no_sync``, so ε comes from each rank's own gradient (``sam_gradient="local"``, the
    default) or from their mean (``"global"``, one more all-reduce), as in :mod:`flatlora.sam`; in
    the second pass DDP averages the gradients once, in the backward of the step's last micro-batch.
    """

    def __init__(self, *args, sam_method: str = "sam-lora", sam_rho: Optional[float] = SAMOptions.rho,
                 sam_eta: float = SAMOptions.eta, sam_gradient: str = SAMOptions.gradient,
                 sam_adaptive_scope: str = SAMOptions.adaptive_scope, **kwargs):
        super().__init__(*args, **kwargs)
        # errors before any training
        self.sam_options = SAMOptions(rho=sam_rho, eta=sam_eta, gradient=sam_gradient,
                                      adaptive_scope=sam_adaptive_scope)
        resolve_sam(sam_method, self.model, self.sam_options)
        self.sam_method = sam_method
        self.sam = None
        self._micro_batches: list = []

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        self.sam = build_sam(self.sam_method, self.model, optimizer, self.sam_options)
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.sam is None:
            raise RuntimeError("SAMTrainer builds its SAM in create_optimizer, which this setup (DeepSpeed?) bypassed")
        self._micro_batches.append((inputs, num_items_in_batch))
        with self.sam.first_pass(), self.accelerator.no_sync(model):
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the step's last micro-batch: the optimizer steps next
            batches, self._micro_batches = self._micro_batches, []
            if self.sam.first_step(zero_grad=True, scaler=self.accelerator.scaler):
                with running_stats_frozen(model):
                    for i, (kept, n) in enumerate(batches):
                        sync = contextlib.nullcontext() if i == len(batches) - 1 else self.accelerator.no_sync(model)
                        with self.sam.second_pass(), sync:
                            super().training_step(model, kept, n)
            self.sam.restore()
        return loss
