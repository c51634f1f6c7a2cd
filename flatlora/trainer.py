"""Hugging Face ``Trainer`` integration: :class:`FlatLoRATrainer`.

Works with transformers 5: it overrides ``training_step(model, inputs, num_items_in_batch=None)``
(the current signature) and perturbs around the parent's forward and backward. The noise step is
``state.global_step`` — the number of *optimizer* steps done, so all micro-batches of one
accumulated step share one ε, and under DDP every rank counts the same global step; the schedule
length is ``state.max_steps``, also global.
"""
from __future__ import annotations

from typing import Optional

from transformers import Trainer

from .flat_lora import FlatLoRA

__all__ = ["FlatLoRATrainer"]


class FlatLoRATrainer(Trainer):
    """A ``transformers.Trainer`` that trains LoRA with Flat-LoRA's weight noise.

    Args (besides the Trainer's): ``flat_lora_sigma`` (σ, default 0.05), ``flat_lora_schedule``
    (``cosine``/``linear``/``constant``), ``flat_lora_seed`` (default ``args.seed``),
    ``flat_lora_mode`` (``exact``/``inplace``), ``flat_lora_shared_noise`` (same ε on every rank).
    """

    def __init__(self, *args, flat_lora_sigma: float = 0.05, flat_lora_schedule: str = "cosine",
                 flat_lora_seed: Optional[int] = None, flat_lora_mode: str = "exact",
                 flat_lora_shared_noise: bool = False, **kwargs):
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
