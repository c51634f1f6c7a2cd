"""Paired error analysis of two models on the same test examples.

Counts the examples both get right, both get wrong, and those only one of them gets right, with
McNemar's exact test on the discordant pairs (H0: either model is as likely to be the one that is
right; the two-sided binomial test of b against b + c at p = ½), and shows a few of each kind.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["compare_predictions"]


def compare_predictions(
    labels: Sequence[int],
    preds_a: Sequence[int],
    preds_b: Sequence[int],
    *,
    names: tuple[str, str] = ("a", "b"),
    texts: Optional[Sequence[str]] = None,
    label_names: Optional[Sequence[str]] = None,
    examples: int = 3,
) -> tuple[dict, pd.DataFrame]:
    """Return (counts with McNemar's p-value, a table of up to ``examples`` examples per discordant kind)."""
    y, a, b = (np.asarray(v) for v in (labels, preds_a, preds_b))
    if not (len(y) == len(a) == len(b)):
        raise ValueError(f"labels and predictions differ in length: {len(y)}, {len(a)}, {len(b)}")
    ra, rb = a == y, b == y
    only_a, only_b = int((ra & ~rb).sum()), int((~ra & rb).sum())
    p = float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0
    counts = {
        "n": int(len(y)),
        "both right": int((ra & rb).sum()),
        "both wrong": int((~ra & ~rb).sum()),
        f"only {names[0]} right": only_a,
        f"only {names[1]} right": only_b,
        "mcnemar_p": p,
    }
    show = (lambda i: label_names[i]) if label_names is not None else (lambda i: int(i))
    rows = []
    for kind, mask in ((f"only {names[0]} right", ra & ~rb), (f"only {names[1]} right", ~ra & rb)):
        for i in np.flatnonzero(mask)[:examples]:
            rows.append({"kind": kind, "index": int(i), "label": show(y[i]), names[0]: show(a[i]), names[1]: show(b[i]),
                         "text": texts[i] if texts is not None else ""})
    return counts, pd.DataFrame(rows)
