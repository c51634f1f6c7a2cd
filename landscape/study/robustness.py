"""Accuracy under seeded input corruptions, per kind and level: the drop from the clean accuracy on
the same examples is the robustness measure.

* :func:`corruption_accuracy` — text tasks: the clean test texts are corrupted the same way for every
  model (:mod:`landscape.study.corruption`, a pure function of text, kind, level and seed),
  re-tokenized with the task's own tokenizer and evaluated;
* :func:`feature_noise_accuracy` — tasks whose examples are feature vectors ``x`` (digits-mlp's
  pixels, scaled to [0, 1]): Gaussian noise added to every feature, or features dropped to 0, drawn
  once per kind and level from the seed, so that every model sees the same corrupted inputs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .corruption import CORRUPTIONS, LEVELS, corrupt_all

__all__ = ["corruption_accuracy", "feature_noise_accuracy", "accuracy_drop", "FEATURE_NOISE"]


def accuracy_drop(clean_accuracy, accuracy, n):
    """clean − corrupted accuracy on the same n examples, as the exact multiple of 1/n it is: the two
    accuracies are counts over n, and their float difference carries rounding (two equal drops could
    differ by 1e-16 and show a "-1.11e-16" difference in a report). Scalars or pandas columns."""
    return np.round((clean_accuracy - accuracy) * n) / n


def corruption_accuracy(model: nn.Module, task, *, kinds: Sequence[str] = tuple(CORRUPTIONS),
                        levels: Sequence[str] = tuple(LEVELS), limit: Optional[int] = 500, seed: int = 0,
                        split: str = "test", batch_size: int = 128) -> pd.DataFrame:
    """Rows (kind, level, accuracy, f1_weighted, clean_accuracy, drop) for a text-classification task."""
    if task.encode is None or not task.texts:
        raise ValueError(f"task {task.name!r} has no raw texts to corrupt (text classification tasks only)")
    texts = task.texts[split][:limit] if limit else task.texts[split]
    labels = [e["label"] for e in task.splits[split][: len(texts)]]
    clean = task.evaluate(model, split, batch_size, limit=len(texts))
    rows = []
    for kind in kinds:
        for level in levels:
            ev = task.evaluate(model, batch_size=batch_size, examples=task.encode(corrupt_all(texts, kind, level, seed=seed), labels))
            rows.append({"kind": kind, "level": level, "accuracy": ev["accuracy"], "f1_weighted": ev["f1_weighted"],
                         "clean_accuracy": clean["accuracy"],
                         "drop": accuracy_drop(clean["accuracy"], ev["accuracy"], ev["n"]), "n": ev["n"]})
    return pd.DataFrame(rows)


#: kind → level → scale: the noise's standard deviation (``gaussian``) or the probability that a
#: feature is set to 0 (``dropout``), in the units of features scaled to [0, 1]
FEATURE_NOISE = {"gaussian": {"light": 0.1, "heavy": 0.3}, "dropout": {"light": 0.1, "heavy": 0.3}}


def _noisy(x: torch.Tensor, kind: str, scale: float, gen: torch.Generator) -> torch.Tensor:
    if kind == "gaussian":
        return x + scale * torch.randn(x.shape, generator=gen)
    return x * (torch.rand(x.shape, generator=gen) >= scale)


def feature_noise_accuracy(model: nn.Module, task, *, limit: Optional[int] = None, seed: int = 0,
                           split: str = "test", batch_size: int = 128) -> pd.DataFrame:
    """Rows (kind, level, accuracy, f1_weighted, clean_accuracy, drop, n) for a task whose examples
    hold a feature vector ``x``, under each :data:`FEATURE_NOISE` kind and level (a generator seeded
    with ``seed`` and the kind and level's position: the same noise for every model)."""
    examples = task.splits[split][:limit] if limit else task.splits[split]
    if not examples or not isinstance(examples[0], dict) or "x" not in examples[0]:
        raise ValueError(f"task {task.name!r} has no feature vectors 'x' to add noise to (digits-mlp-like tasks only)")
    clean = task.evaluate(model, split, batch_size, limit=len(examples))
    rows = []
    for i, (kind, levels) in enumerate(FEATURE_NOISE.items()):
        for j, (level, scale) in enumerate(levels.items()):
            gen = torch.Generator().manual_seed(seed * 1000 + 10 * i + j)
            noisy = [{**e, "x": _noisy(e["x"], kind, scale, gen)} for e in examples]
            ev = task.evaluate(model, batch_size=batch_size, examples=noisy)
            rows.append({"kind": kind, "level": level, "accuracy": ev["accuracy"], "f1_weighted": ev["f1_weighted"],
                         "clean_accuracy": clean["accuracy"],
                         "drop": accuracy_drop(clean["accuracy"], ev["accuracy"], ev["n"]), "n": ev["n"]})
    return pd.DataFrame(rows)
