"""The study's paper-style figures, from the tidy tables of the probe suite (figures (a)–(f) of the
flatness-mismatch study). Each function returns a matplotlib figure (headless); save it with
:func:`landscape.plot.save_figure`.

(a) :func:`fig_lines` — 1-D loss curves, LoRA vs Flat-LoRA, in the merged and the LoRA space
    (the analogue of the paper's Fig. 6), mean ± std over directions and seeds;
(b) :func:`fig_planes` — 2-D loss contours per method;
(c) :func:`fig_expected_loss` — ΔL(σ) per method, one panel per space, mean ± std over seeds;
(d) :func:`fig_eigenvalues` — top Hessian eigenvalue per method × space, error bars over seeds;
(e) :func:`fig_sharpness_vs_accuracy` — sharpness against test accuracy, one point per run;
(f) :func:`fig_robustness` — accuracy drop under input corruption per method.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..plot import new_figure, plot_lines, plot_plane

__all__ = ["fig_lines", "fig_planes", "fig_expected_loss", "fig_eigenvalues", "fig_sharpness_vs_accuracy",
           "fig_robustness"]


def _present(values: Sequence[str], order: Sequence[str]) -> list[str]:
    vals = list(dict.fromkeys(values))
    return [v for v in order if v in vals] + [v for v in vals if v not in order]


METHOD_ORDER = ("full-ft", "lora", "flat-lora", "sam-lora", "sam-full", "asam-lora", "asam-full", "sam")
SPACE_ORDER = ("lora-balanced", "lora", "merged", "tangent", "normal", "all")


def fig_lines(curves: pd.DataFrame, *, spaces: Optional[Sequence[str]] = None,
              methods: Optional[Sequence[str]] = None, task: str = "") -> Figure:
    """Loss lines per space (one panel each; default: every space present), one curve per method
    (default: every method present), mean ± std over every direction of every model (run or seed)."""
    spaces = _present(curves["space"], SPACE_ORDER) if spaces is None else spaces
    sel = curves if methods is None else curves[curves["method"].isin(methods)]
    fig, axes = new_figure(4.2, 3.4, panels=len(spaces))
    for ax, sp in zip(axes, spaces):
        part = sel[sel["space"] == sp].copy()
        if part.empty:
            ax.set_visible(False)
            continue
        part["loss"] = part["delta_loss"]  # L(θ + αd) − L(θ): runs start from different losses
        plot_lines(part, by="method", metric="loss", ax=ax, title=f"{task} — {sp} space")
        ax.set_ylabel("L(θ + αd) − L(θ)")
    return fig


def fig_planes(planes: pd.DataFrame, *, methods: Sequence[str] = ("lora", "flat-lora"), task: str = "",
               space: str = "merged") -> list[Figure]:
    return [plot_plane(planes[planes["method"] == m], kind="contour", title=f"{task} — {m}, {space} space")
            for m in methods if (planes["method"] == m).any()]


def _errorbar_groups(ax, frame: pd.DataFrame, x: str, label_col: str, order: Sequence[str]):
    for label in _present(frame[label_col], order):
        g = frame[frame[label_col] == label].groupby(x)["value"].agg(["mean", "std"]).sort_index()
        ax.errorbar(g.index, g["mean"], yerr=g["std"].fillna(0), marker="o", ms=3, capsize=2, label=label)


def fig_expected_loss(probes: pd.DataFrame, *, task: str = "") -> Figure:
    sel = probes[probes["measure"] == "expected_loss"]
    spaces = _present(sel["space"], SPACE_ORDER)
    fig, axes = new_figure(3.6, 3.2, panels=len(spaces))
    for ax, sp in zip(axes, spaces):
        _errorbar_groups(ax, sel[sel["space"] == sp], "x", "method", METHOD_ORDER)
        ax.set_xscale("log")
        ax.set_xlabel("σ (filter noise)")
        ax.set_title(f"{sp} space")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("ΔL = E L(θ+ε) − L(θ)")
    fig.suptitle(f"{task}: expected loss increase under Flat-LoRA noise (mean ± std over seeds)")
    return fig


def _grouped_bars(ax, frame: pd.DataFrame, category: str, categories: Sequence[str], value: str,
                  methods: Sequence[str]) -> None:
    """One bar per (category, method): the mean of ``value`` over seeds, with ± std error bars."""
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        g = frame[frame["method"] == m].groupby(category)[value].agg(["mean", "std"]).reindex(categories)
        ax.bar(np.arange(len(categories)) + (j - (len(methods) - 1) / 2) * width, g["mean"], width,
               yerr=g["std"].fillna(0), capsize=2, label=m)


def fig_eigenvalues(probes: pd.DataFrame, *, task: str = "") -> Figure:
    sel = probes[(probes["measure"] == "eigenvalue") & (probes["x"] == 1)]
    spaces = _present(sel["space"], SPACE_ORDER)
    methods = _present(sel["method"], METHOD_ORDER)
    fig, axes = new_figure(1.6 + 1.3 * len(spaces), 3.4, panels=1)
    ax = axes[0]
    _grouped_bars(ax, sel, "space", spaces, "value", methods)
    ax.set_xticks(np.arange(len(spaces)), spaces)
    ax.set_yscale("log")
    ax.set_ylabel("top Hessian eigenvalue λ₁")
    ax.set_title(f"{task}: λ₁ per space\n(mean ± std over seeds)")
    ax.legend(fontsize=7)
    return fig


def fig_sharpness_vs_accuracy(probes: pd.DataFrame, metrics: pd.DataFrame, *, task: str = "",
                              measures: Sequence[tuple] = (("eigenvalue", 1.0, "λ₁"), ("expected_loss", 0.05, "ΔL(σ=0.05)")),
                              space: str = "merged") -> Figure:
    fig, axes = new_figure(3.8, 3.2, panels=len(measures))
    for ax, (measure, x, label) in zip(axes, measures):
        sel = probes[(probes["measure"] == measure) & np.isclose(probes["x"], x) & (probes["space"] == space)]
        joined = sel.merge(metrics, on=["task", "method", "seed"])
        for m in _present(joined["method"], METHOD_ORDER):
            g = joined[joined["method"] == m]
            ax.scatter(g["value"], g["accuracy"], label=m, s=18)
        if len(joined) >= 3:
            from scipy import stats

            rho = stats.spearmanr(joined["value"], joined["accuracy"])
            ax.set_title(f"{space}: Spearman ρ = {rho.statistic:.2f} (p = {rho.pvalue:.2g})", fontsize=9)
        ax.set_xlabel(f"{label}, {space} space")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=7)
    fig.suptitle(f"{task}: sharpness vs test accuracy (one point per run)")
    return fig


def fig_robustness(robust: pd.DataFrame, *, task: str = "") -> Figure:
    robust = robust.assign(condition=robust["kind"] + "/" + robust["level"])
    conditions = list(dict.fromkeys(robust["condition"]))
    methods = _present(robust["method"], METHOD_ORDER)
    fig, axes = new_figure(2 + 0.9 * len(conditions), 3.4, panels=1)
    ax = axes[0]
    _grouped_bars(ax, robust, "condition", conditions, "drop", methods)
    ax.set_xticks(np.arange(len(conditions)), conditions, rotation=30, ha="right")
    ax.set_ylabel("accuracy drop (clean − corrupted)")
    ax.set_title(f"{task}: robustness to messy input\n(mean ± std over seeds)")
    ax.legend(fontsize=7)
    return fig
