"""Tables and tests of the flatness-mismatch study, and its markdown report.

* :func:`collect_metrics` — one row per finished run (task, method, seed, accuracy, weighted F1 …);
* :func:`mean_std` — mean ± std over seeds per (task, method[, …]);
* :func:`compare` — method a against method b on one metric: Welch's t-test (unequal variances,
  Welch 1947) over seeds, and the paired t-test over the seeds both have (runs with the same seed
  share the data order and the head's initialisation, so they pair);
* :func:`sharpness_summary` — each sharpness measure per task × space × method over seeds;
* :func:`paired_log_ratio` — x against a baseline paired by seed on the log scale (geometric-mean
  ratio, its t interval and the paired t-test), and :func:`holm` — Holm's step-down adjustment of
  the p-values of every comparison a report makes (Holm 1979).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["collect_metrics", "mean_std", "compare", "paired_log_ratio", "holm", "sharpness_summary", "format_mean_std", "markdown_table",
           "accuracy_section", "sharpness_section", "robustness_section", "HEADLINE_MEASURES"]

#: (measure, x) pairs the report tabulates: top eigenvalue, ΔL at σ = 0.05, worst case at ρ = 0.05, line at α = 1
HEADLINE_MEASURES = (("eigenvalue", 1.0), ("expected_loss", 0.05), ("worst_case", 0.05), ("line", 1.0), ("trace", np.nan))


def collect_metrics(run_dirs: Iterable[Path]) -> pd.DataFrame:
    rows = []
    for d in run_dirs:
        f = Path(d) / "metrics.json"
        if not f.exists():
            continue
        m = json.loads(f.read_text())
        rows.append({"task": m["task"], "method": m["method"], "seed": m["seed"], "steps": m["steps"],
                     "accuracy": m["accuracy"], "f1_weighted": m["f1_weighted"], "val_accuracy": m["validation"]["accuracy"],
                     "majority_baseline": m["majority_baseline"], "wall_time_s": m["wall_time_s"], "run": str(d)})
    return pd.DataFrame(rows)


def mean_std(frame: pd.DataFrame, by: Sequence[str], value: str) -> pd.DataFrame:
    g = frame.groupby(list(by), sort=False)[value]
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n": g.count()}).reset_index()


def format_mean_std(mean: float, std: float, digits: int = 4) -> str:
    if np.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def compare(frame: pd.DataFrame, value: str, a: str, b: str, *, by: str = "method") -> dict:
    """Method ``a`` vs ``b`` on ``value``: difference of means, Welch's t-test and, over shared seeds,
    the paired t-test. NaN p-values where there are too few runs."""
    xa = frame.loc[frame[by] == a].set_index("seed")[value]
    xb = frame.loc[frame[by] == b].set_index("seed")[value]
    out = {"a": a, "b": b, "value": value, "n_a": len(xa), "n_b": len(xb),
           "mean_a": float(xa.mean()) if len(xa) else np.nan, "mean_b": float(xb.mean()) if len(xb) else np.nan}
    out["diff"] = out["mean_a"] - out["mean_b"]
    out["welch_p"] = float(stats.ttest_ind(xa, xb, equal_var=False).pvalue) if min(len(xa), len(xb)) >= 2 else np.nan
    shared = xa.index.intersection(xb.index)
    out["n_paired"] = len(shared)
    out["paired_p"] = float(stats.ttest_rel(xa[shared], xb[shared]).pvalue) if len(shared) >= 2 else np.nan
    return out


def paired_log_ratio(x: Sequence[float], base: Sequence[float], confidence: float = 0.95) -> dict:
    """``x`` against ``base``, paired (the same seed), on the log scale: d_i = log(x_i / base_i).

    Returns ``ratio`` = exp(mean d) (the geometric-mean ratio), its Student-t interval
    exp(mean d ± t_{n−1} · sd(d)/√n) as ``low`` / ``high``, the two-sided paired t-test's ``p``
    (H₀: mean d = 0), ``below`` (pairs with x < base) and ``pairs``. The ratio needs one pair, the
    interval and p two (NaN otherwise). The log scale makes a halving and a doubling equal effects,
    as for curvatures they are."""
    d = np.log(np.asarray(x, dtype=float) / np.asarray(base, dtype=float))
    out = {"pairs": len(d), "below": int((d < 0).sum()), "ratio": float(np.exp(d.mean())) if len(d) else np.nan,
           "low": np.nan, "high": np.nan, "p": np.nan}
    if len(d) >= 2:
        test = stats.ttest_1samp(d, 0.0)
        ci = test.confidence_interval(confidence)
        out.update(low=float(np.exp(ci.low)), high=float(np.exp(ci.high)), p=float(test.pvalue))
    return out


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm's (1979) step-down adjusted p-values: with the m finite p sorted p₍₁₎ ≤ … ≤ p₍ₘ₎,
    p̃₍ᵢ₎ = min(1, max_{j≤i} (m − j + 1) · p₍ⱼ₎). Rejecting where p̃ ≤ α keeps the family-wise error
    rate at α. NaN stays NaN and does not count in m."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(~np.isnan(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


def sharpness_summary(probes: pd.DataFrame, measures: Optional[Sequence[tuple]] = None) -> pd.DataFrame:
    """Rows (task, measure, x, space, method, mean, std, n) for the headline measures."""
    rows = []
    for measure, x in measures or HEADLINE_MEASURES:
        sel = probes[probes["measure"] == measure]
        if not np.isnan(x):
            sel = sel[np.isclose(sel["x"], x)]
        if sel.empty:
            continue
        s = mean_std(sel, ["task", "space", "method"], "value")
        s.insert(1, "measure", measure)
        s.insert(2, "x", x)
        rows.append(s)
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def markdown_table(frame: pd.DataFrame, floatfmt: str = ".4f") -> str:
    cols = list(frame.columns)
    fmt = lambda v: (f"{v:{floatfmt}}" if isinstance(v, float) and not np.isnan(v) else ("—" if isinstance(v, float) else str(v)))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def accuracy_section(metrics: pd.DataFrame) -> str:
    acc, f1 = mean_std(metrics, ["method"], "accuracy"), mean_std(metrics, ["method"], "f1_weighted")
    table = pd.DataFrame({"method": acc["method"], "seeds": acc["n"],
                          "test accuracy": [format_mean_std(m, s) for m, s in zip(acc["mean"], acc["std"])],
                          "weighted F1": [format_mean_std(m, s) for m, s in zip(f1["mean"], f1["std"])]})
    out = [markdown_table(table), "", f"Majority-class baseline: {metrics['majority_baseline'].iloc[0]:.4f}."]
    tests = [compare(metrics, v, "flat-lora", b) for v in ("accuracy", "f1_weighted") for b in ("lora",)]
    tests += [compare(metrics, "accuracy", a, "lora") for a in ("sam-lora", "sam-full", "full-ft")
              if (metrics["method"] == a).any()]
    t = pd.DataFrame(tests)[["a", "b", "value", "n_a", "n_b", "diff", "welch_p", "n_paired", "paired_p"]]
    out += ["", "Method a against b (difference of means; Welch's t-test; paired t-test over shared seeds):", "",
            markdown_table(t)]
    return "\n".join(out)


def sharpness_section(probes: pd.DataFrame) -> str:
    s = sharpness_summary(probes)
    if s.empty:
        return "(no probes)"
    s = s.assign(value=[format_mean_std(m, sd, 4) for m, sd in zip(s["mean"], s["std"])])
    wide = s.pivot_table(index=["measure", "x", "space"], columns="method", values="value", aggfunc="first", sort=False)
    wide = wide.reset_index()
    tests = []
    for (measure, x, space), g in probes.groupby(["measure", "x", "space"], dropna=False):
        if (measure, x) in [(m, xx) for m, xx in HEADLINE_MEASURES if not np.isnan(xx)] or (
                measure == "trace"):
            c = compare(g, "value", "flat-lora", "lora")
            tests.append({"measure": measure, "x": x, "space": space, "flat − lora": c["diff"],
                          "welch_p": c["welch_p"], "paired_p": c["paired_p"]})
    out = [markdown_table(wide), ""]
    if tests:
        out += ["Flat-LoRA against LoRA per measure and space:", "", markdown_table(pd.DataFrame(tests))]
    return "\n".join(out)


def robustness_section(robust: pd.DataFrame) -> str:
    s = robust.groupby(["kind", "level", "method"], sort=False)["drop"].agg(["mean", "std"]).reset_index()
    s = s.assign(drop=[format_mean_std(m, sd, 4) for m, sd in zip(s["mean"], s["std"])])
    wide = s.pivot_table(index=["kind", "level"], columns="method", values="drop", aggfunc="first", sort=False)
    tests = []
    for (kind, level), g in robust.groupby(["kind", "level"], sort=False):
        c = compare(g, "drop", "flat-lora", "lora")
        tests.append({"kind": kind, "level": level, "flat − lora (drop)": c["diff"], "welch_p": c["welch_p"],
                      "paired_p": c["paired_p"]})
    return "\n".join(["Accuracy drop (clean − corrupted), mean ± std over seeds:", "", markdown_table(wide.reset_index()), "",
                      markdown_table(pd.DataFrame(tests))])
