"""Tables and tests of the flatness-mismatch study, and its markdown report.

* :func:`collect_metrics` — one row per finished run (task, method, seed, accuracy, weighted F1 …);
* :func:`mean_std` — mean ± std over seeds per (task, method[, …]);
* :func:`compare` — method a against method b on one metric: Welch's t-test (unequal variances,
  Welch 1947) over seeds, and the paired t-test over the seeds both have (runs with the same seed
  share the data order and the head's initialisation, so they pair);
* :func:`sharpness_summary` — each sharpness measure per task × space × method over seeds;
* :func:`paired_log_ratio` — x against a baseline paired by seed on the log scale (geometric-mean
  ratio, its t interval and the paired t-test), and :func:`holm` — Holm's step-down adjustment of
  the p-values of every comparison a report makes (Holm 1979);
* :func:`paired_differences` — each setting against a baseline on one metric, paired by seed, Holm-adjusted;
* :func:`within_group_spearman` — Spearman's ρ within each method or setting (not pooled), Holm-adjusted;
* :func:`write_index` — results/study/report.md: every committed part's report, in one file.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["collect_metrics", "mean_std", "compare", "paired_log_ratio", "paired_differences", "within_group_spearman", "holm", "sharpness_summary", "format_mean_std", "markdown_table",
           "accuracy_section", "sharpness_section", "robustness_section", "write_index", "HEADLINE_MEASURES"]

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


def _paired_t(d: np.ndarray, confidence: float) -> dict:
    """One-sample t on paired differences d: the mean, its Student-t interval and the two-sided p
    (H₀: mean d = 0); interval and p NaN with fewer than two pairs."""
    out = {"pairs": len(d), "mean": float(d.mean()) if len(d) else np.nan, "low": np.nan, "high": np.nan, "p": np.nan}
    if len(d) >= 2:
        test = stats.ttest_1samp(d, 0.0)
        ci = test.confidence_interval(confidence)
        out.update(low=float(ci.low), high=float(ci.high), p=float(test.pvalue))
    return out


def paired_log_ratio(x: Sequence[float], base: Sequence[float], confidence: float = 0.95) -> dict:
    """``x`` against ``base``, paired (the same seed), on the log scale: d_i = log(x_i / base_i).

    Returns ``ratio`` = exp(mean d) (the geometric-mean ratio), its Student-t interval
    exp(mean d ± t_{n−1} · sd(d)/√n) as ``low`` / ``high``, the two-sided paired t-test's ``p``
    (H₀: mean d = 0), ``below`` (pairs with x < base) and ``pairs``. The ratio needs one pair, the
    interval and p two (NaN otherwise). The log scale makes a halving and a doubling equal effects,
    as for curvatures they are."""
    d = np.log(np.asarray(x, dtype=float) / np.asarray(base, dtype=float))
    t = _paired_t(d, confidence)
    return {"pairs": t["pairs"], "below": int((d < 0).sum()), "ratio": float(np.exp(t["mean"])),
            "low": float(np.exp(t["low"])), "high": float(np.exp(t["high"])), "p": t["p"]}


def paired_differences(frame: pd.DataFrame, value: str, *, by: str = "setting", base: str = "lora",
                       confidence: float = 0.95) -> pd.DataFrame:
    """Each group of ``by`` against the ``base`` group on ``value``, paired by ``seed`` (runs with the
    same seed share data order and initialisation): per group the mean of the base, the mean
    difference d̄ = mean(x_seed − base_seed), its Student-t interval, the paired t-test's p and that
    p Holm-adjusted over every group compared (:func:`holm`)."""
    ref = frame[frame[by] == base].set_index("seed")[value]
    rows = []
    for name, g in frame[frame[by] != base].groupby(by, sort=False):
        x = g.set_index("seed")[value]
        shared = x.index.intersection(ref.index)
        rows.append({by: name, "base_mean": float(ref[shared].mean()) if len(shared) else np.nan,
                     **_paired_t((x[shared] - ref[shared]).to_numpy(float), confidence)})
    out = pd.DataFrame(rows, columns=[by, "base_mean", "pairs", "mean", "low", "high", "p"])
    return out.rename(columns={"mean": "difference"}).assign(p_holm=holm(out["p"]))


def within_group_spearman(frame: pd.DataFrame, x: str, y: str, *, by: Sequence[str] = ("setting",),
                          min_n: int = 3) -> pd.DataFrame:
    """Spearman's ρ of ``x`` against ``y`` within each group of ``by`` (never pooled over groups,
    where a difference between groups would pass for a correlation), its two-sided p
    (``scipy.stats.spearmanr``) and that p Holm-adjusted over every group; groups with fewer than
    ``min_n`` rows get NaN."""
    rows = []
    for key, g in frame.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        test = stats.spearmanr(g[x], g[y]) if len(g) >= min_n else None
        rows.append({**dict(zip(by, key)), "n": len(g), "rho": float(test.statistic) if test else np.nan,
                     "p": float(test.pvalue) if test else np.nan})
    out = pd.DataFrame(rows)
    return out.assign(p_holm=holm(out["p"]))


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


#: the parts of the study, in the order the index shows them (others follow, by name)
INDEX_ORDER = ("digits-exact", "rt-minilm-sweep", "r8-minilm-sweep", "minilm")
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)#:]+)(\))")


def write_index(root: Path) -> Path:
    """ROOT/report.md: the report of every part of the study committed under ``root`` (each
    sub-folder's summary.md or report.md, each naming the command that made it), its headings one
    level down and its relative links rebased to ``root``. Each part's report stage calls this after
    writing its own report, so the index never holds a part's older numbers."""
    from flatlora.io import atomic_write_text

    root = Path(root)
    parts = sorted((d for d in root.iterdir() if d.is_dir()),
                   key=lambda d: (INDEX_ORDER.index(d.name) if d.name in INDEX_ORDER else len(INDEX_ORDER), d.name))
    lines = ["# The flatness-mismatch study: results", "",
             "Each part below is the report its own command wrote (the command is named in it); "
             "this file is rebuilt from them whenever a part's report is.", ""]
    for d in parts:
        found = [f for f in (d / "summary.md", d / "report.md") if f.exists()]
        if not found:
            continue
        rebase = lambda m, d=d: m.group(1) + Path(os.path.relpath(os.path.normpath(d / m.group(2)), root)).as_posix() \
            + m.group(3)  # noqa: E731
        text = _LINK.sub(rebase, found[0].read_text(encoding="utf-8"))
        lines += [f"<!-- {found[0].relative_to(root).as_posix()} -->"]
        lines += [("#" + line) if line.startswith("#") else line for line in text.splitlines()] + [""]
    path = root / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
