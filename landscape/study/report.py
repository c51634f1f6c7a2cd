"""Tables and tests of the flatness-mismatch study, and its markdown report.

Descriptive tables (mean ± std over seeds):

* :func:`collect_metrics` — one row per finished run (task, method, seed, accuracy, weighted F1 …);
* :func:`mean_std` — mean ± std over seeds per (task, method[, …]);
* :func:`sharpness_summary` — each sharpness measure per task × space × method over seeds.

Tests (runs with the same seed share the data order and the head's initialisation, so they pair):

* :func:`paired_log_ratio` — x against a baseline paired by seed on the log scale (geometric-mean
  ratio, its t interval and the paired t-test), and :func:`holm` — Holm's step-down adjustment of
  the p-values of every comparison a report makes (Holm 1979);
* :func:`paired_differences` — each setting against a baseline on one metric, paired by seed, Holm-adjusted;
* :func:`paired_effects_table` — the same on several metrics at once, each a difference or (on the
  log scale) a ratio;
* :func:`spearman_test` — Spearman's ρ and its two-sided p, exact (every pairing) for few runs;
* :func:`within_group_spearman` — Spearman's ρ within each method or setting (not pooled), Holm-adjusted;
* :func:`spearman_interval` — Spearman's ρ across runs with a BCa bootstrap interval, and
  :func:`mismatched_runs` — the runs flat in one space and sharp in the other.

The long runs' report (:func:`landscape.study.pipeline.report`) is made of the ``*_section``
functions here, one markdown block each; :func:`against_lora` and :func:`claim_contrast` (SAM on A, B
against SAM on W, the claim's direct test) are its one family of tests per task (:func:`one_family`).
:func:`write_index` — results/study/report.md: every committed part's report, in one file.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Collection, Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["collect_metrics", "mean_std", "paired_log_ratio", "paired_differences", "paired_effects_table",
           "spearman_test", "within_group_spearman", "holm", "spearman_interval", "spearman_phrase", "runs_in_both",
           "mismatched_runs",
           "sharpness_summary", "top_eigenvalues", "format_mean_std", "format_interval", "effects_display",
           "markdown_table", "runs_section", "accuracy_section", "sharpness_section", "worst_case_section",
           "held_zero", "expected_loss_section", "robustness_section", "against_lora", "claim_contrast", "one_family",
           "paired_tests_sections", "within_method",
           "within_method_section", "claim_section", "write_index", "HEADLINE_MEASURES", "MIN_RUNS", "CLAIM_PAIRS",
           "CLAIM_CONTRAST", "CLAIM_GAP",
           "EXACT_SPEARMAN_MAX_N"]

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


def format_interval(low: float, high: float, fmt: str = ".3g") -> str:
    """"[low, high]", or "[—]" where the interval is NaN (one pair or one seed: no interval)."""
    return "[—]" if np.isnan(low) or np.isnan(high) else f"[{low:{fmt}}, {high:{fmt}}]"


def _paired_t(d: np.ndarray, confidence: float) -> dict:
    """One-sample t on paired differences d: the mean, its Student-t interval and the two-sided p
    (H₀: mean d = 0); interval and p NaN with fewer than two pairs, and where every pair has the same
    difference (to float rounding: accuracies are counts over n, and two equal drops of 4 in 150 gave
    differences 1e-17 apart, which scipy's t-test turned into p = 6e-17): the t-test has no spread to
    weigh the mean against, and a p of 0 from two pairs would be an artifact, not evidence. A mean
    that is 0 to the same rounding (drops of 0, 0, 3 against 0, 1, 2 in 150 gave -2.9e-19) is 0."""
    rounding = 64 * np.finfo(float).eps * (np.abs(d).max() if len(d) else 0.0)
    mean = float(d.mean()) if len(d) else np.nan
    out = {"pairs": len(d), "mean": 0.0 if abs(mean) <= rounding else mean, "low": np.nan, "high": np.nan, "p": np.nan}
    if len(d) >= 2 and np.ptp(d) > rounding:
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


def paired_effects_table(frame: pd.DataFrame, effects: Mapping[str, str], *, log: Collection[str] = (),
                         by: str = "setting", base: str = "lora", confidence: float = 0.95) -> pd.DataFrame:
    """Each group of ``by`` against ``base`` on every column of ``effects`` (column → the effect's
    name), paired by seed over the runs that have the column (:func:`paired_differences`). A column
    is compared as the mean difference d̄ of d = x_seed − base_seed, or, for a column in ``log``, as
    the ratio exp(d̄) of d = log(x_seed / base_seed) — the geometric mean of the ratios — with the
    interval exp(d̄ ± t_{n−1}·sd(d)/√n) (as :func:`paired_log_ratio`); there a value ≤ 0 has no
    logarithm and its run is left out.

    One row per effect × group, effect-major: ``by``, effect, pairs, difference (the difference or
    the ratio), low, high, p (the paired t-test on d) and p_holm, Holm-adjusted within each effect
    over the groups; ``holm(out["p"])`` adjusts over the whole table instead."""
    frames = []
    for column, name in effects.items():
        values = np.log(frame[column].where(frame[column] > 0)) if column in log else frame[column]
        d = paired_differences(frame.assign(**{column: values}).dropna(subset=[column]), column, by=by, base=base,
                               confidence=confidence)
        if column in log:
            d = d.assign(**{c: np.exp(d[c]) for c in ("difference", "low", "high")})
        frames.append(d.assign(effect=name))
    out = pd.concat(frames, ignore_index=True)
    return out[[by, "effect", "pairs", "difference", "low", "high", "p", "p_holm"]]


def effects_display(effects: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Rows of :func:`paired_effects_table` as a report shows them: ``columns``, pairs, the estimate
    with its 95 % interval, "d [low, high]" ("d [—]" with one pair), p and p_holm."""
    estimate = [f"{d:.3g} {format_interval(lo, hi)}" for d, lo, hi in
                zip(effects["difference"], effects["low"], effects["high"])]
    return effects[[*columns, "pairs"]].assign(estimate=estimate, p=effects["p"], p_holm=effects["p_holm"])


def within_group_spearman(frame: pd.DataFrame, x: str, y: str, *, by: Sequence[str] = ("setting",),
                          min_n: int = 3, drop_small: bool = False) -> pd.DataFrame:
    """Spearman's ρ of ``x`` against ``y`` within each group of ``by`` (never pooled over groups,
    where a difference between groups would pass for a correlation), its two-sided p
    (:func:`spearman_test`: exact for a group of a few seeds) and that p Holm-adjusted over every
    group; groups with fewer than ``min_n`` rows get NaN, or with ``drop_small`` are left out
    (neither counts in Holm's m)."""
    rows = []
    for key, g in frame.groupby(list(by), sort=False):
        if drop_small and len(g) < min_n:
            continue
        key = key if isinstance(key, tuple) else (key,)
        rho, p = spearman_test(g[x], g[y]) if len(g) >= min_n else (np.nan, np.nan)
        rows.append({**dict(zip(by, key)), "n": len(g), "rho": rho, "p": p})
    out = pd.DataFrame(rows, columns=[*by, "n", "rho", "p"])
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


def _spearman(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's ρ along ``axis``: Pearson's r of the ranks (ties averaged), vectorized for the bootstrap."""
    rx, ry = stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis)
    rx, ry = rx - rx.mean(axis=axis, keepdims=True), ry - ry.mean(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore"):  # a resample of one repeated pair has no ranking: NaN
        return (rx * ry).sum(axis=axis) / np.sqrt((rx**2).sum(axis=axis) * (ry**2).sum(axis=axis))


#: up to this many pairs :func:`spearman_test`'s p is exact (all n! = 40,320 pairings at most)
EXACT_SPEARMAN_MAX_N = 8


def spearman_test(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman's ρ of paired samples and its two-sided p-value.

    For n ≤ :data:`EXACT_SPEARMAN_MAX_N` pairs the p is exact: under independence every one of the n!
    pairings of ``x`` with ``y`` is equally likely, and p = 2·min(P(ρ* ≥ ρ), P(ρ* ≤ ρ)) over them
    (``scipy.stats.permutation_test``, ``permutation_type="pairings"``, ties ranked by their mean).
    Above it, ``scipy.stats.spearmanr``'s t approximation, t = ρ·√((n − 2)/(1 − ρ²)) on n − 2
    degrees of freedom — which for a few seeds is far off: five seeds ranked alike (ρ = 1) get
    p ≈ 1e-24 from it, against the exact 2/5! = 0.0167, the smallest p five pairs can give.
    A constant sample has no ranking: ρ and p are NaN."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n > EXACT_SPEARMAN_MAX_N:
        test = stats.spearmanr(x, y)
        return float(test.statistic), float(test.pvalue)
    rho = float(_spearman(x, y))
    if np.isnan(rho):
        return np.nan, np.nan
    # one sample permuted against y held fixed: the n! pairings (with both permuted, scipy would enumerate n!²)
    test = stats.permutation_test((x,), lambda xs, axis: _spearman(xs, y, axis), permutation_type="pairings",
                                  vectorized=True, n_resamples=np.inf, alternative="two-sided")
    return rho, float(test.pvalue)


def spearman_interval(x: Sequence[float], y: Sequence[float], *, seed: int = 0, n_resamples: int = 9999,
                      level: float = 0.95) -> dict:
    """Spearman's ρ of paired samples, its two-sided p-value (:func:`spearman_test`) and a BCa
    bootstrap interval (pairs resampled together, ``numpy.random.default_rng(seed)``)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    rho, p = spearman_test(x, y)
    ci = stats.bootstrap((x, y), _spearman, paired=True, vectorized=True, n_resamples=n_resamples,
                         confidence_level=level, method="BCa", rng=np.random.default_rng(seed)).confidence_interval
    return {"n": len(x), "rho": rho, "p": p, "low": float(ci.low), "high": float(ci.high)}


def spearman_phrase(r: dict) -> str:
    """:func:`spearman_interval`'s result in words: "Spearman ρ = … [low, high] (BCa bootstrap 95 %),
    p = …", a note in the interval's place where the bootstrap gave none."""
    interval = (f"[{r['low']:.3g}, {r['high']:.3g}] (BCa bootstrap 95 %)" if np.isfinite([r["low"], r["high"]]).all()
                else f"(no BCa bootstrap interval: too few distinct resamples of {r['n']} runs)")
    return f"Spearman ρ = {r['rho']:.3g} {interval}, p = {r['p']:.2g}"


#: fewer runs than this in a scope: no correlation (the bootstrap's resamples would often be all ties)
MIN_RUNS = 5


def runs_in_both(frame: pd.DataFrame, x: str, y: str, value: str = "lambda_max") -> pd.DataFrame:
    """run × (x, y): ``value`` of every run of the long ``frame`` (run, space, value) that has both
    spaces — the LoRA runs, where a space is one of LoRA's (full fine-tuning has the merged space only)."""
    sel = frame[frame["space"].isin((x, y))]
    return sel.pivot(index="run", columns="space", values=value).reindex(columns=[x, y]).dropna()


def mismatched_runs(frame: pd.DataFrame, x: str = "lora-balanced", y: str = "merged") -> dict[str, list[str]]:
    """Runs flat in one space and sharp in the other, among the runs with both (:func:`runs_in_both`):
    λ₁ below the median in one space and in the top quartile (≥ the 75th percentile) in the other."""
    wide = runs_in_both(frame, x, y)
    flat = {s: wide[s] < wide[s].median() for s in (x, y)}
    sharp = {s: wide[s] >= wide[s].quantile(0.75) for s in (x, y)}
    return {f"flat in {x}, sharp in {y}": sorted(wide.index[flat[x] & sharp[y]]),
            f"flat in {y}, sharp in {x}": sorted(wide.index[flat[y] & sharp[x]])}


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


def top_eigenvalues(probes: pd.DataFrame) -> pd.DataFrame:
    """The rows of the top Hessian eigenvalue λ₁ (measure "eigenvalue", x = 1)."""
    return probes[(probes["measure"] == "eigenvalue") & (probes["x"] == 1)]


def markdown_table(frame: pd.DataFrame, floatfmt: str = ".4f") -> str:
    cols = list(frame.columns)
    fmt = lambda v: (f"{v:{floatfmt}}" if isinstance(v, float) and not np.isnan(v) else ("—" if isinstance(v, float) else str(v)))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


# --------------------------------------------------------------------- the long runs' report sections
def runs_section(metrics: pd.DataFrame) -> str:
    """One row per run, by method then seed: steps, test and validation accuracy, training wall time."""
    order = pd.Categorical(metrics["method"], categories=list(dict.fromkeys(metrics["method"])))
    runs = metrics.assign(order=order).sort_values(["order", "seed"])
    table = pd.DataFrame({"method": runs["method"], "seed": runs["seed"], "steps": runs["steps"],
                          "test accuracy": runs["accuracy"], "validation accuracy": runs["val_accuracy"],
                          "wall time (min)": runs["wall_time_s"] / 60})
    return markdown_table(table, floatfmt=".4g")


def accuracy_section(metrics: pd.DataFrame) -> str:
    """Test accuracy and weighted F1 per method, mean ± std over seeds, and the majority-class baseline."""
    acc, f1 = mean_std(metrics, ["method"], "accuracy"), mean_std(metrics, ["method"], "f1_weighted")
    table = pd.DataFrame({"method": acc["method"], "seeds": acc["n"],
                          "test accuracy": [format_mean_std(m, s) for m, s in zip(acc["mean"], acc["std"])],
                          "weighted F1": [format_mean_std(m, s) for m, s in zip(f1["mean"], f1["std"])]})
    return "\n".join([markdown_table(table), "", f"Majority-class baseline: {metrics['majority_baseline'].iloc[0]:.4f}."])


def sharpness_section(probes: pd.DataFrame) -> str:
    """The headline measures (:data:`HEADLINE_MEASURES`) per measure × space (rows) and method (columns)."""
    s = sharpness_summary(probes)
    if s.empty:
        return "(no probes)"
    s = s.assign(value=[format_mean_std(m, sd, 4) for m, sd in zip(s["mean"], s["std"])])
    wide = s.pivot_table(index=["measure", "x", "space"], columns="method", values="value", aggfunc="first", sort=False)
    return markdown_table(wide.reset_index())


WORST_CASE_COLUMNS = {"worst_case": "worst case", "worst_case_first_order": "first order ρ‖∇L‖",
                      "curvature": "curvature part (worst case − ρ‖∇L‖)"}


def worst_case_section(probes: pd.DataFrame) -> str:
    """Worst-case sharpness max_{‖δ‖≤ρ} L(θ + δ) − L(θ) beside its first-order term ρ‖∇L‖ and their
    difference, the part that curvature adds, each mean ± std over seeds per ρ × space × method."""
    keys, by = ["x", "space", "method", "seed"], ["x", "space", "method"]
    sel = probes[probes["measure"].isin(("worst_case", "worst_case_first_order"))]
    w = sel.pivot_table(index=keys, columns="measure", values="value", sort=False).reset_index()
    if not {"worst_case", "worst_case_first_order"} <= set(w.columns):
        return "(no worst-case probes)"
    w = w.assign(curvature=w["worst_case"] - w["worst_case_first_order"])
    table = mean_std(w, by, "worst_case")[by + ["n"]].rename(columns={"x": "ρ", "n": "seeds"})
    for column, name in WORST_CASE_COLUMNS.items():
        s = mean_std(w, by, column)
        table[name] = [format_mean_std(m, sd) for m, sd in zip(s["mean"], s["std"])]
    return "\n".join(["Mean ± std over seeds. Where the curvature part is small against ρ‖∇L‖, the worst case "
                      "measures the gradient, not the curvature.", "", markdown_table(table, floatfmt=".3g")])


def held_zero(measures: pd.DataFrame) -> list[tuple[str, float]]:
    """The (space, σ) of the rows of ``measures`` whose ΔL interval holds 0 (|ΔL| ≤ its half-width):
    for one run's rows, the cells :mod:`~landscape.study.noise_top_up` extends."""
    e = measures[measures["measure"] == "expected_loss"]
    hold = e[e["value"].abs() <= e["err"]]
    return [(str(sp), float(x)) for sp, x in zip(hold["space"], hold["x"])]


def expected_loss_section(probes: pd.DataFrame) -> str:
    """ΔL(σ) = E_ε L(θ + ε) − L(θ) per σ × space (rows) and method (columns): the mean over seeds with
    its Monte-Carlo interval, mean ± √(Σᵢ hᵢ²)/n from the n runs' 95 % half-widths hᵢ (the runs' noise
    draws are independent, so the variances of their means add; keeping each run's own t quantile
    makes it slightly conservative). A cell whose interval holds 0 is marked †. The note counts the
    run cells whose own interval holds 0 and, with a ``samples`` column (the study's ``--noise-pairs``),
    how many were extended."""
    e = probes[probes["measure"] == "expected_loss"]
    if e.empty:
        return "(no expected-loss probes)"
    pairs = e["samples"].dropna() if "samples" in e else pd.Series(dtype=float)
    own = len(held_zero(e))
    extended = f" Within its own run, {own} of {len(e)} run × space × σ cells hold 0" + (
        " (the study's --noise-pairs extends those)." if pairs.empty or pairs.min() == pairs.max() else
        f" after the top-up: each run's ΔL comes from {pairs.min():.0f} antithetic pairs, or from {pairs.max():.0f} "
        f"where the first {pairs.min():.0f} left 0 inside that run's own interval ({(pairs > pairs.min()).sum()} "
        "cells).")
    g = e.groupby(["x", "space", "method"], sort=False)
    s = pd.DataFrame({"mean": g["value"].mean(),
                      "half": g["err"].agg(lambda h: float(np.sqrt(np.sum(h.to_numpy() ** 2))) / len(h))}).reset_index()
    low, high = s["mean"] - s["half"], s["mean"] + s["half"]
    cells = [f"{m:.3g} {format_interval(lo, hi)}" + (" †" if lo <= 0 <= hi else "")
             for m, lo, hi in zip(s["mean"], low, high)]
    wide = s.assign(cell=cells).pivot_table(index=["x", "space"], columns="method", values="cell", aggfunc="first",
                                            sort=False)
    return "\n".join(["Mean over seeds [Monte-Carlo 95 % interval of that mean]; † marks a cell whose interval "
                      "includes 0: at this many noise draws its ΔL is not told apart from 0." + extended, "",
                      markdown_table(wide.reset_index().rename(columns={"x": "σ"}), floatfmt=".3g")])


def robustness_section(robust: pd.DataFrame) -> str:
    """The accuracy drop under each corruption kind and level per method, mean ± std over seeds."""
    s = robust.groupby(["kind", "level", "method"], sort=False)["drop"].agg(["mean", "std"]).reset_index()
    s = s.assign(drop=[format_mean_std(m, sd, 4) for m, sd in zip(s["mean"], s["std"])])
    wide = s.pivot_table(index=["kind", "level"], columns="method", values="drop", aggfunc="first", sort=False)
    return "\n".join(["Accuracy drop (clean − corrupted), mean ± std over seeds:", "", markdown_table(wide.reset_index())])


#: probe measures of the against-LoRA table: (measure, label, compared on the log scale)
AGAINST_LORA_PROBES = (("eigenvalue", "λ₁", True), ("worst_case", "worst case at ρ = {x:g}", True),
                       ("expected_loss", "ΔL at σ = {x:g}", False))


def against_lora(metrics: pd.DataFrame, probes: Optional[pd.DataFrame] = None,
                 robust: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Every method against LoRA with the same seed (:func:`paired_effects_table`): test accuracy and
    weighted F1 as differences; in each space λ₁ and the worst case at each ρ as ratios (on the log
    scale: a halving and a doubling of a curvature are equal effects), ΔL at each σ as a difference
    (near 0, of either sign); with ``robust``, the accuracy drop under each corruption kind and level
    as a difference. Rows without a pair are left out (full fine-tuning in LoRA's spaces); p_holm is
    Holm-adjusted over every row of the table — every method × effect with two pairs or more, one
    family (per task: call it once per task)."""
    keys = ["method", "seed"]
    wide = metrics[keys].assign(**{"test accuracy": metrics["accuracy"], "weighted F1": metrics["f1_weighted"]})
    parts, log = [], set()
    for measure, label, on_log in (AGAINST_LORA_PROBES if probes is not None else ()):
        sel = top_eigenvalues(probes) if measure == "eigenvalue" else probes[probes["measure"] == measure]
        sel = sel.assign(quantity=[f"{label.format(x=x)} ({sp})" for x, sp in zip(sel["x"], sel["space"])])
        if on_log:
            log |= set(sel["quantity"])
        parts.append(sel)
    if robust is not None:
        parts.append(robust.assign(quantity=[f"accuracy drop, {k} {lv}" for k, lv in zip(robust["kind"], robust["level"])],
                                   value=robust["drop"]))
    if parts:
        values = pd.concat(parts).pivot_table(index=keys, columns="quantity", values="value", sort=False)
        wide = wide.merge(values.reset_index(), on=keys, how="left")
    effects = {c: f"{c} {'÷' if c in log else '−'} LoRA's" for c in wide.columns if c not in keys}
    out = paired_effects_table(wide, effects, log=log, by="method", base="lora")
    out = out[out["pairs"] > 0].reset_index(drop=True)
    return out.assign(p_holm=holm(out["p"]))


#: the claim's direct contrast: SAM on the LoRA factors A, B against SAM on the merged weights W
CLAIM_CONTRAST = ("sam-lora", "sam-full")
#: the contrast's gap: λ₁ in the LoRA space (balanced gauge) over λ₁ in the merged space
CLAIM_GAP = ("lora-balanced", "merged")


def claim_contrast(probes: Optional[pd.DataFrame], methods: Sequence[str] = CLAIM_CONTRAST) -> pd.DataFrame:
    """The claim's direct test, paired by seed: λ₁ of ``methods[0]`` (SAM on A, B, which flattens the
    LoRA space) over λ₁ of ``methods[1]`` (SAM on W, which flattens the full one) in each space, and
    the ratio of their gaps g = λ₁(balanced LoRA) ÷ λ₁(merged) (:data:`CLAIM_GAP`), all on the log
    scale (:func:`paired_effects_table`: exp(mean d) with d = log(x_seed ÷ y_seed)).

    If flatness in the LoRA space carried over to the full space, the merged ratio would sit where
    the balanced one does and the gap ratio g_A ÷ g_W would be 1; the claim (Li et al., 2025) predicts
    a merged ratio above the balanced one and a gap ratio below 1. Rows with a pair only; p_holm over
    this table (the report adjusts it with the task's other tests as one family: :func:`one_family`);
    no rows without ``probes``."""
    columns = ["method", "effect", "pairs", "difference", "low", "high", "p", "p_holm"]
    eig = top_eigenvalues(probes) if probes is not None else pd.DataFrame(columns=["method"])
    eig = eig[eig["method"].isin(methods)]
    if eig.empty:
        return pd.DataFrame(columns=columns)
    wide = eig.pivot_table(index=["method", "seed"], columns="space", values="value", sort=False)
    effects = {sp: f"λ₁ ({sp}) ÷ {methods[1]}'s" for sp in wide.columns}
    x, y = CLAIM_GAP
    if {x, y} <= set(wide.columns):
        gap = f"λ₁ ({x}) ÷ λ₁ ({y})"
        wide[gap] = wide[x] / wide[y]
        effects[gap] = f"[{gap}] ÷ {methods[1]}'s"
    out = paired_effects_table(wide.reset_index(), effects, log=set(effects), by="method", base=methods[1])
    out = out[out["pairs"] > 0].reset_index(drop=True)[columns]
    return out.assign(p_holm=holm(out["p"]))


def one_family(*tables: pd.DataFrame) -> list[pd.DataFrame]:
    """The tables with p_holm Holm-adjusted jointly over every row of all of them (:func:`holm`): the
    tests a report makes for one task are one family, whichever table shows them."""
    adjusted = holm(pd.concat([t["p"] for t in tables], ignore_index=True)) if tables else []
    out, start = [], 0
    for t in tables:
        out.append(t.assign(p_holm=adjusted[start:start + len(t)]))
        start += len(t)
    return out


def paired_tests_sections(metrics: pd.DataFrame, probes: Optional[pd.DataFrame] = None,
                          robust: Optional[pd.DataFrame] = None) -> list[str]:
    """Markdown of the task's paired tests, one Holm family (:func:`one_family`): every method against
    LoRA (:func:`against_lora`) and, where both have a run with the same seed, SAM on A, B against
    SAM on W (:func:`claim_contrast`), each table with what it holds in words."""
    effects = against_lora(metrics, probes, robust)
    effects, contrast = one_family(effects, claim_contrast(probes))
    tested = int(effects["p"].notna().sum()) + int(contrast["p"].notna().sum())

    def family(scope: str) -> str:
        return (f"p_holm is Holm-adjusted over every comparison of {scope}, one family for the task: {tested} of its "
                f"{len(effects) + len(contrast)} comparisons have a p.")

    lines = ["### Against LoRA, paired by seed", ""]
    if effects.empty:
        lines += ["(no method has a run with one of LoRA's seeds)", ""]
    else:
        lines += ["Each method against LoRA with the same seed (a pair shares the data order and the initialisation): "
                  "accuracies, ΔL and accuracy drops as the mean difference (method − LoRA), λ₁ and the worst case as "
                  "the ratio exp(mean log(method ÷ LoRA)), the geometric mean over seeds; each with its Student-t 95 % "
                  "interval in brackets and the paired t-test's p (two pairs or more; — otherwise). "
                  + family("this table and the next" if len(contrast) else "this table"), "",
                  markdown_table(effects_display(effects, ["effect", "method"]), floatfmt=".3g"), ""]
    if len(contrast):
        lines += claim_contrast_lines(contrast, note="" if len(effects) else " " + family("this table"))
    return lines


def claim_contrast_lines(contrast: pd.DataFrame, methods: Sequence[str] = CLAIM_CONTRAST, *, note: str = "",
                         heading: str = "###") -> list[str]:
    """Markdown of :func:`claim_contrast`'s table under a ``heading`` of that level, with what it holds
    and what the claim predicts in words, ``note`` (its Holm family) appended to the words."""
    a, w = methods
    return [f"{heading} The claim's direct test: {a} against {w}, paired by seed", "",
            f"λ₁ of {a} (SAM on the LoRA factors A, B) over λ₁ of {w} (SAM on the merged weights W) with the same "
            f"seed, in each space, and the ratio of their gaps λ₁ ({CLAIM_GAP[0]}) ÷ λ₁ ({CLAIM_GAP[1]}): the "
            "geometric mean over seeds with its Student-t 95 % interval and the paired t-test's p. Were flatness "
            "in the LoRA space to carry over to the full space, the merged ratio would sit where the balanced "
            "one does and the gap ratio would be 1; the claim predicts a merged ratio above the balanced one "
            "and a gap ratio below 1." + note, "",
            markdown_table(effects_display(contrast, ["effect", "method"]), floatfmt=".3g"), ""]


def within_method(metrics: pd.DataFrame, probes: pd.DataFrame) -> pd.DataFrame:
    """Spearman's ρ of λ₁ in each space against test accuracy across the seeds of one method, for
    each method × space with at least :data:`MIN_RUNS` seeds — never pooled over methods, whose
    differences would pass for a correlation (:func:`within_group_spearman`; p Holm-adjusted over
    every method × space shown)."""
    joined = top_eigenvalues(probes).merge(metrics[["method", "seed", "accuracy"]], on=["method", "seed"])
    return within_group_spearman(joined, "value", "accuracy", by=("method", "space"), min_n=MIN_RUNS, drop_small=True)


def within_method_section(metrics: pd.DataFrame, probes: pd.DataFrame) -> str:
    """:func:`within_method` as a table, or a line saying that no method has enough seeds yet."""
    within = within_method(metrics, probes)
    if within.empty:
        return f"(no method has {MIN_RUNS} probed seeds yet)"
    return "\n".join([f"Spearman ρ of λ₁ against test accuracy across the seeds of each method with {MIN_RUNS} or "
                      f"more (within a method, never pooled; p exact over every pairing up to {EXACT_SPEARMAN_MAX_N} "
                      "seeds; p_holm over every method × space shown):", "",
                      markdown_table(within, floatfmt=".3g")])


#: the spaces the claim compares, across runs: LoRA's against the full one, and tangent against normal
CLAIM_PAIRS = (("lora-balanced", "merged"), ("tangent", "normal"))


def claim_section(probes: pd.DataFrame) -> str:
    """Per pair of :data:`CLAIM_PAIRS`: Spearman's ρ of λ₁ in one space against λ₁ in the other across
    every run that has both (every LoRA-family method and seed: the claim is about runs), with its BCa
    bootstrap interval (:func:`spearman_interval`), and the runs flat in one space and sharp in the
    other (:func:`mismatched_runs`), once :data:`MIN_RUNS` runs have both."""
    eig = top_eigenvalues(probes)
    eig = eig.assign(run=[f"{m}-s{s}" for m, s in zip(eig["method"], eig["seed"])], lambda_max=eig["value"])
    lines = []
    for x, y in CLAIM_PAIRS:
        both = runs_in_both(eig, x, y)
        if len(both) < MIN_RUNS:
            lines.append(f"- λ₁ ({x}) against λ₁ ({y}): {len(both)} runs have both so far; the correlation and the "
                         f"runs flat in one space and sharp in the other wait for {MIN_RUNS}.")
            continue
        lines.append(f"- λ₁ ({x}) against λ₁ ({y}) across the {len(both)} runs that have both: "
                     f"{spearman_phrase(spearman_interval(both[x], both[y]))}.")
        lines += [f"  - runs {label}: {', '.join(names) if names else 'none'}."
                  for label, names in mismatched_runs(eig, x, y).items()]
    return "\n".join(lines)


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
