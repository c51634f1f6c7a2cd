"""Accuracy under seeded input corruptions (:mod:`landscape.study.corruption`), per kind and level.

The clean test texts are corrupted the same way for every model (a pure function of text, kind,
level and seed), re-tokenized with the task's own tokenizer and evaluated; the drop from the clean
accuracy on the same examples is the robustness measure.
"""
from __future__ import annotations

from typing import Optional, Sequence

import pandas as pd
from torch import nn

from .corruption import CORRUPTIONS, LEVELS, corrupt_all

__all__ = ["corruption_accuracy"]


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
                         "clean_accuracy": clean["accuracy"], "drop": clean["accuracy"] - ev["accuracy"], "n": ev["n"]})
    return pd.DataFrame(rows)
