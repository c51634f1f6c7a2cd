"""Batches in the two shapes the toolkit accepts, and the loss of a model on one of them.

* a Hugging Face dict batch (``input_ids``, ``attention_mask``, ``labels`` …): the loss is the
  model's own (``model(**batch).loss``) unless a criterion is given, then ``criterion(logits, labels)``;
* a tuple ``(inputs, targets)``: ``criterion(model(inputs), targets)`` (cross-entropy by default).

Both the training loop and the landscape probes go through :func:`batch_loss`, so "the loss" means
the same thing everywhere. Losses are means over the batch; averaging over several batches weights
each by :func:`batch_size`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["batch_loss", "batch_size", "batch_to", "batch_logits_and_labels", "output_loss"]

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def batch_size(batch: Any) -> int:
    """Number of samples in a dict or tuple batch."""
    if isinstance(batch, Mapping):
        for key in ("labels", "input_ids", "pixel_values", "inputs_embeds"):
            if key in batch:
                return int(batch[key].shape[0])
        return int(next(iter(batch.values())).shape[0])
    if isinstance(batch, (tuple, list)) and batch:
        return int(batch[0].shape[0])
    raise TypeError(f"a batch must be a dict or an (inputs, targets) tuple, got {type(batch).__name__}")


def batch_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a batch to ``device``."""
    if isinstance(batch, Mapping):
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    return type(batch)(v.to(device) if torch.is_tensor(v) else v for v in batch)


def batch_logits_and_labels(model: nn.Module, batch: Any) -> tuple[Any, Optional[torch.Tensor]]:
    """Run the model on a batch; return (output, labels). ``output`` is the model's output object
    for dict batches and the logits tensor for tuple batches."""
    if isinstance(batch, Mapping):
        return model(**batch), batch.get("labels")
    inputs, targets = batch[0], (batch[1] if len(batch) > 1 else None)
    return model(inputs), targets


def batch_loss(model: nn.Module, batch: Any, criterion: Optional[Criterion] = None) -> torch.Tensor:
    """Mean loss of ``model`` on one batch (see the module docstring for the two batch shapes)."""
    out, labels = batch_logits_and_labels(model, batch)
    return output_loss(out, labels, batch, criterion)


def output_loss(out: Any, labels: Optional[torch.Tensor], batch: Any, criterion: Optional[Criterion] = None) -> torch.Tensor:
    """The loss :func:`batch_loss` computes, from the output of :func:`batch_logits_and_labels`
    (for callers that also need the logits, e.g. for accuracy, without a second forward)."""
    if isinstance(batch, Mapping):
        if criterion is None:
            if getattr(out, "loss", None) is None:
                raise ValueError("the model returned no loss for this dict batch: include 'labels' or pass a criterion")
            return out.loss
        return criterion(out.logits, labels)
    if labels is None:
        raise ValueError("a tuple batch must be (inputs, targets)")
    return (criterion or F.cross_entropy)(out, labels)
