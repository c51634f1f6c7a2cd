"""One loss over fixed batches (DESIGN §3.4): every sharpness measure evaluates a :class:`Loss`.

    L(θ) = Σ_b n_b · ℓ_b(θ) / Σ_b n_b

where ℓ_b is the mean loss of batch b (:func:`flatlora.batch_loss`: the criterion on
``(inputs, targets)`` tuples — cross-entropy by default — or a Hugging Face model's own loss on dict
batches) and n_b its number of samples. The same batches serve every point, space and checkpoint,
so comparisons are paired. Evaluation is in eval mode unless ``train_mode=True`` (then dropout and
BatchNorm batch statistics are live, and the loss is random); the model's modes are restored.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from flatlora.batches import batch_logits_and_labels, batch_size, batch_to, output_loss

from .guard import preserved

__all__ = ["Loss", "require_loss"]

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _n_correct(out: Any, labels: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Number of correct arg-max predictions when there is one integer label per sample, else None."""
    logits = getattr(out, "logits", out)
    if (
        labels is None
        or not torch.is_tensor(logits)
        or labels.is_floating_point()
        or labels.dim() != 1
        or logits.dim() != 2
        or logits.shape[0] != labels.shape[0]
    ):
        return None
    return (logits.argmax(-1) == labels).sum()


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class Loss:
    """The sample-weighted mean loss of a model on a fixed list of batches.

    Args:
        batches: ``(inputs, targets)`` tuples or Hugging Face dict batches (any iterable; it is
            consumed into a list once).
        criterion: ``criterion(logits, targets) -> mean loss``; default cross-entropy for tuples and
            the model's own ``loss`` for dict batches (see :func:`flatlora.batch_loss`).
        train_mode: evaluate in train mode (dropout, BatchNorm batch statistics) instead of eval mode.

    Attributes:
        batches: the batches (list); weights: their sample counts n_b; total: Σ n_b.

    Raises:
        ValueError: no batches, or a batch with no samples.
    """

    def __init__(self, batches: Iterable[Any], criterion: Optional[Criterion] = None, train_mode: bool = False):
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("Loss needs at least one batch; got an empty list (e.g. task.batches('test', 64, limit=256))")
        self.weights = [batch_size(b) for b in self.batches]
        if min(self.weights) < 1:
            raise ValueError(f"batch {self.weights.index(min(self.weights))} has no samples")
        self.total = sum(self.weights)
        self.criterion = criterion
        self.train_mode = bool(train_mode)
        self._moved: dict[torch.device, list] = {}

    def __repr__(self) -> str:
        return f"Loss({len(self.batches)} batches, {self.total} samples, train_mode={self.train_mode})"

    def on(self, device: torch.device) -> list:
        """The batches on ``device`` (moved once, then cached)."""
        device = torch.device(device)
        if device not in self._moved:
            self._moved[device] = [batch_to(b, device) for b in self.batches]
        return self._moved[device]

    @contextlib.contextmanager
    def mode(self, model: nn.Module) -> Iterator[nn.Module]:
        """``model.train(train_mode)`` for the duration; afterwards every module is back in its own mode.

        Both ways go through the modules' ``train()`` (an override, e.g. one that keeps BatchNorm
        frozen, is honoured): on exit the modules are visited parents first, and each one not in its
        former mode gets ``m.train(mode)`` — which also resets its children, visited next — so mixed
        per-module modes come back exactly, with the fewest calls."""
        modes = [(m, m.training) for m in model.modules()]
        model.train(self.train_mode)
        try:
            yield model
        finally:
            for m, training in modes:
                if m.training != training:
                    m.train(training)

    def batch_value(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean loss on one batch (differentiable; the caller sets the mode)."""
        return self.batch_outputs(model, batch)[0]

    def batch_outputs(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(mean loss, number of correct predictions or None) on one batch, from one forward pass.

        Plain tensor operations only, so it composes with ``torch.func.vmap``."""
        out, labels = batch_logits_and_labels(model, batch)
        return output_loss(out, labels, batch, self.criterion), _n_correct(out, labels)

    def value(self, model: nn.Module) -> torch.Tensor:
        """L(θ) as a differentiable tensor (in the mode the caller set; see :meth:`mode`)."""
        batches = self.on(_device(model))
        return sum(self.batch_value(model, b) * (w / self.total) for b, w in zip(batches, self.weights))

    def evaluate(self, model: nn.Module) -> dict:
        """``{"loss": L(θ), "accuracy": fraction correct or None}`` without gradients, in :meth:`mode`.

        The model is left exactly as it was (:func:`~landscape.guard.preserved`): in ``train_mode``
        BatchNorm statistics and the global RNG state (dropout) are restored afterwards."""
        loss, correct, has_accuracy = 0.0, 0, True
        with torch.no_grad(), preserved(model), self.mode(model):
            for b, w in zip(self.on(_device(model)), self.weights):
                value, n_correct = self.batch_outputs(model, b)
                loss += float(value) * w
                if n_correct is None:
                    has_accuracy = False
                else:
                    correct += int(n_correct)
        return {"loss": loss / self.total, "accuracy": correct / self.total if has_accuracy else None}

    def __call__(self, model: nn.Module) -> float:
        """L(θ) as a float (no gradients, in :meth:`mode`)."""
        return self.evaluate(model)["loss"]


def require_loss(obj: Any, where: str) -> None:
    """Raise a TypeError, saying what to pass, unless ``obj`` is a :class:`Loss` (``where``: the caller's name)."""
    if not isinstance(obj, Loss):
        raise TypeError(f"{where}: loss must be a landscape.Loss over fixed batches, e.g. "
                        f"Loss(task.batches('test', 64, limit=256)) or Loss([(inputs, targets), ...]); "
                        f"got {type(obj).__name__}")
