"""The study's paper-style figures, from the tidy tables of the probe suite (figures (a)–(f) of the
flatness-mismatch study). Each function returns a matplotlib figure (headless); save it with
:func:`landscape.plot.save_figure`. A method has one colour in every panel of every figure
(:func:`method_color`), and every title says how many seeds it shows.

(a) :func:`fig_lines` — 1-D loss curves of every method, one panel per space (the analogue of the
    paper's Fig. 6), mean ± std over directions and seeds;
(b) :func:`fig_planes` — 2-D loss contours of LoRA, Flat-LoRA and SAM side by side on one colour
    scale, and each one's difference from LoRA on a diverging scale centred at 0;
(c) :func:`fig_expected_loss` — ΔL(σ) per method, one panel per space, with the spread over seeds
    and the Monte-Carlo error as two kinds of error bar;
(d) :func:`fig_eigenvalues` — top Hessian eigenvalue per method × space, geometric mean ×/÷
    geometric std over seeds, on a log axis;
(e) :func:`fig_sharpness_vs_accuracy` — λ₁ against test accuracy, one panel per space, one point per
    run, Spearman ρ within each method;
(f) :func:`fig_robustness` — accuracy drop under input corruption per method, mean ± std over seeds.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatter, LogLocator, NullFormatter, StrMethodFormatter
from scipy import stats

from ..plot import new_figure, plot_lines
from .report import top_eigenvalues

__all__ = ["method_color", "plain_log_axes", "seeds_label", "fig_lines", "fig_planes", "fig_expected_loss", "fig_eigenvalues",
           "fig_sharpness_vs_accuracy", "fig_robustness"]

METHOD_ORDER = ("full-ft", "lora", "flat-lora", "sam-lora", "sam-full", "asam-lora", "asam-full", "sam")
SPACE_ORDER = ("lora-balanced", "lora", "merged", "tangent", "normal", "all")
PLANE_METHODS = ("lora", "flat-lora", "sam-full")
BASELINE = "lora"


def method_color(method: str) -> str:
    """The colour of ``method`` in every study figure: matplotlib's cycle colour ``C{i}`` for its
    index ``i`` in :data:`METHOD_ORDER`, black for a method not in it."""
    return f"C{METHOD_ORDER.index(method)}" if method in METHOD_ORDER else "k"


def _present(values: Sequence[str], order: Sequence[str]) -> list[str]:
    """The distinct ``values``, those in ``order`` first and in that order."""
    vals = list(dict.fromkeys(values))
    return [v for v in order if v in vals] + [v for v in vals if v not in order]


def seeds_label(frame: pd.DataFrame, by: str = "method") -> str:
    """How many seeds each group of ``by`` in ``frame`` has ("10 seeds", "1–10 seeds" when they
    differ); "" without a seed column."""
    if "seed" not in frame.columns or frame.empty:
        return ""
    n = frame.groupby(by)["seed"].nunique()
    count = f"{n.min()}" if n.min() == n.max() else f"{n.min()}–{n.max()}"
    return f"{count} seed{'' if count == '1' else 's'}"


def _title(*parts: str) -> str:
    """The non-empty ``parts``, joined by dashes."""
    return " — ".join(p for p in parts if p)


def _offsets(n: int, width: float) -> np.ndarray:
    """``n`` offsets, ``width`` apart, centred on 0: one per method, so their points do not overlap."""
    return (np.arange(n) - (n - 1) / 2) * width


def plain_log_axes(ax) -> None:
    """Both axes of ``ax`` logarithmic, ticked at 1, 2, 5 × 10ᵏ and labelled as plain numbers."""
    ax.set(xscale="log", yscale="log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


def fig_lines(curves: pd.DataFrame, *, spaces: Optional[Sequence[str]] = None,
              methods: Optional[Sequence[str]] = None, task: str = "") -> Figure:
    """Loss lines per space (one panel each; default: every space present), one curve per method
    (default: every method present) in its colour, mean ± std over every direction of every model
    (run or seed)."""
    spaces = _present(curves["space"], SPACE_ORDER) if spaces is None else spaces
    sel = curves if methods is None else curves[curves["method"].isin(methods)]
    order = {m: i for i, m in enumerate(_present(sel["method"], METHOD_ORDER))}
    sel = sel.sort_values("method", key=lambda s: s.map(order), kind="stable")
    colors = {m: method_color(m) for m in order}
    fig, axes = new_figure(4.2, 3.4, panels=len(spaces))
    for ax, sp in zip(axes, spaces):
        part = sel[sel["space"] == sp]
        if part.empty:
            ax.set_visible(False)
            continue
        part = part.assign(loss=part["delta_loss"])  # L(θ + αd) − L(θ): runs start from different losses
        plot_lines(part, by="method", metric="loss", ax=ax, title=_title(task, f"{sp} space", seeds_label(part)),
                   colors=colors)
        ax.set_xlabel("α (filter-normalized direction)")
        ax.set_ylabel("L(θ + αd) − L(θ)")
    return fig


def _plane_grid(frame: pd.DataFrame) -> pd.DataFrame:
    """The loss on the plane's grid, mean over directions and seeds: rows β, columns α."""
    return frame.groupby(["beta", "alpha"])["loss"].mean().unstack("alpha")


def _plane_axes(ax, title: str) -> None:
    """A plane panel's origin (the trained model) marked, its title and its axis labels."""
    ax.plot([0], [0], marker="*", color="w", markeredgecolor="k", markersize=10)
    ax.set(aspect="equal", title=title, xlabel="α (filter-normalized)", ylabel="β (filter-normalized)")


def _loss_panels(fig, axes, grids: dict[str, pd.DataFrame]) -> None:
    """Each method's loss as filled contours, every panel on the same levels and colour scale (one
    colour bar)."""
    levels = np.linspace(min(np.nanmin(g) for g in grids.values()), max(np.nanmax(g) for g in grids.values()), 21)
    for ax, (m, g) in zip(axes, grids.items()):
        filled = ax.contourf(g.columns, g.index, g.to_numpy(), levels=levels, cmap="viridis",
                             norm=Normalize(levels[0], levels[-1]))
        ax.contour(g.columns, g.index, g.to_numpy(), levels=levels, colors="k", linewidths=0.3)
        _plane_axes(ax, m)
    fig.colorbar(filled, ax=axes, label="loss")


def _difference_panels(fig, axes, diffs: dict[str, pd.DataFrame]) -> None:
    """Each method's loss minus LoRA's, cell by cell, on one diverging scale symmetric about 0."""
    lim = max(np.nanmax(np.abs(d.to_numpy())) for d in diffs.values()) or 1.0
    for ax, (m, d) in zip(axes, diffs.items()):
        mesh = ax.pcolormesh(d.columns, d.index, d.to_numpy(), shading="nearest", cmap="RdBu_r", vmin=-lim, vmax=lim)
        _plane_axes(ax, f"{m} − {BASELINE}")
    fig.colorbar(mesh, ax=axes, label=f"loss difference (method − {BASELINE})")


def _planeseeds_label(planes: pd.DataFrame) -> str:
    """"seed 0", "mean over 3 seeds", or "" without a seed column."""
    seeds = sorted(planes["seed"].unique()) if "seed" in planes.columns else []
    return f"seed {seeds[0]}" if len(seeds) == 1 else (f"mean over {len(seeds)} seeds" if seeds else "")


def fig_planes(planes: pd.DataFrame, *, methods: Sequence[str] = PLANE_METHODS, task: str = "",
               space: str = "merged") -> Figure:
    """The loss planes of ``methods`` (those present) side by side on one colour scale, then for each
    method but LoRA its loss minus LoRA's on the same grid, on a diverging scale centred at 0.
    ``planes`` has columns alpha, beta, loss, method (and maybe space, seed, direction); a method's
    plane is the mean over its directions and seeds. Raises ValueError when none of ``methods``
    has a plane in ``space``."""
    if "space" in planes.columns:
        planes = planes[planes["space"] == space]
    present = [m for m in methods if (planes["method"] == m).any()]
    if not present:
        raise ValueError(f"no loss plane of {', '.join(methods)} in the {space} space")
    grids = {m: _plane_grid(planes[planes["method"] == m]) for m in present}
    diffs = {m: grids[m] - grids[BASELINE] for m in present if m != BASELINE and BASELINE in grids}
    fig, axes = new_figure(3.4, 3.3, panels=len(grids) + len(diffs))
    _loss_panels(fig, axes[:len(grids)], grids)
    if diffs:
        _difference_panels(fig, axes[len(grids):], diffs)
    fig.suptitle(_title(task, f"loss planes in the {space} space", _planeseeds_label(planes)))
    return fig


def _sigma_ticks(axis, sigmas: Sequence[float]) -> None:
    """Major ticks at exactly ``sigmas``, labelled plainly; no minor tick labels."""
    axis.set_major_locator(FixedLocator(sigmas))
    axis.set_major_formatter(StrMethodFormatter("{x:g}"))
    axis.set_minor_formatter(NullFormatter())


def fig_expected_loss(probes: pd.DataFrame, *, task: str = "") -> Figure:
    """ΔL(σ) per method, one panel per space: the mean over seeds with two error bars — thin and
    capped, the std over seeds; thick and capless, one run's Monte-Carlo 95 % half-width (mean over
    seeds of ``err``; the interval of the mean over seeds, in the report's table, is √n times
    narrower for n runs of equal error). Methods sit at small multiplicative offsets around each σ,
    ticked exactly."""
    sel = probes[probes["measure"] == "expected_loss"]
    spaces, methods = _present(sel["space"], SPACE_ORDER), _present(sel["method"], METHOD_ORDER)
    shift = dict(zip(methods, 10 ** _offsets(len(methods), 0.025)))
    fig, axes = new_figure(3.6, 3.2, panels=len(spaces))
    for ax, sp in zip(axes, spaces):
        part = sel[sel["space"] == sp]
        for m in _present(part["method"], METHOD_ORDER):
            g = part[part["method"] == m].groupby("x").agg(mean=("value", "mean"), std=("value", "std"),
                                                           mc=("err", "mean")).fillna({"std": 0.0, "mc": 0.0})
            x, c = g.index * shift[m], method_color(m)
            ax.errorbar(x, g["mean"], yerr=g["std"], fmt="o-", ms=3, lw=0.8, elinewidth=0.8, capsize=3, color=c,
                        label=m)
            ax.errorbar(x, g["mean"], yerr=g["mc"], fmt="none", elinewidth=3, capsize=0, alpha=0.4, color=c)
        ax.set_xscale("log")
        _sigma_ticks(ax.xaxis, sorted(part["x"].unique()))
        ax.set(xlabel="σ (filter noise)", title=f"{sp} space")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("ΔL = E L(θ+ε) − L(θ)")
    fig.suptitle(f"{_title(task, 'expected loss increase under Flat-LoRA noise', seeds_label(sel))}\n"
                 "mean over seeds; thin capped bars: ± std over seeds; thick bars: Monte-Carlo 95 % half-width",
                 fontsize=9)
    return fig


def _mean_std(values: np.ndarray) -> tuple[float, float, float]:
    """Mean, mean − std, mean + std (std 0 for one value)."""
    m, s = values.mean(), (values.std(ddof=1) if len(values) > 1 else 0.0)
    return m, m - s, m + s


def _geometric(values: np.ndarray) -> tuple[float, float, float]:
    """Geometric mean, ÷ and × the geometric std (1 for one value): the log-space mean ± std."""
    m, lo, hi = _mean_std(np.log(values))
    return np.exp(m), np.exp(lo), np.exp(hi)


def _category_points(ax, frame: pd.DataFrame, category: str, categories: Sequence[str], value: str,
                     summary: Callable[[np.ndarray], tuple[float, float, float]]) -> None:
    """One point per (category, method), methods at small x offsets in their colours, with error
    bars from ``summary(values over seeds) -> (centre, low, high)``; categories on the x axis."""
    methods = _present(frame["method"], METHOD_ORDER)
    for m, dx in zip(methods, _offsets(len(methods), 0.12)):
        g = frame[frame["method"] == m].groupby(category)[value]
        s = pd.DataFrame({c: summary(v.to_numpy()) for c, v in g}, index=["centre", "low", "high"]).T.reindex(categories)
        ax.errorbar(np.arange(len(categories)) + dx, s["centre"], yerr=[s["centre"] - s["low"], s["high"] - s["centre"]],
                    fmt="o", ms=4, capsize=3, color=method_color(m), label=m)
    ax.set_xticks(np.arange(len(categories)), categories)
    ax.set_xlim(-0.5, len(categories) - 0.5)
    ax.legend(fontsize=7)


def fig_eigenvalues(probes: pd.DataFrame, *, task: str = "") -> Figure:
    """Top Hessian eigenvalue λ₁ per space (x) and method: the geometric mean over seeds, with bars
    from ÷ to × the geometric std, on a log axis (a λ₁ ≤ 0, which it cannot show, is left out)."""
    sel = top_eigenvalues(probes)
    sel = sel[sel["value"] > 0]
    spaces = _present(sel["space"], SPACE_ORDER)
    fig, ax = new_figure(1.6 + 1.3 * len(spaces), 3.4)
    _category_points(ax, sel, "space", spaces, "value", _geometric)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter())  # plain numbers, the minor ticks labelled too when few decades
    ax.yaxis.set_minor_formatter(LogFormatter())
    ax.set_ylabel("top Hessian eigenvalue λ₁")
    ax.set_title(f"{_title(task, 'λ₁ per space', seeds_label(sel))}\n(geometric mean ×/÷ geometric std over seeds)",
                 fontsize=9)
    return fig


def _spearman(x: pd.Series, y: pd.Series) -> str:
    """"ρ = 0.12 (n = 10)", or "n < 3" with fewer than 3 points."""
    if len(x) < 3:
        return "n < 3"
    return f"ρ = {stats.spearmanr(x, y).statistic:.2f} (n = {len(x)})"


def fig_sharpness_vs_accuracy(probes: pd.DataFrame, metrics: pd.DataFrame, *, task: str = "") -> Figure:
    """λ₁ against test accuracy, one panel per space, one point per run coloured by method, with
    Spearman's ρ within each method (in the legend) — never pooled over methods, which differ in
    both. ``metrics`` has task, method, seed, accuracy."""
    sel = top_eigenvalues(probes)
    joined = sel.merge(metrics[["task", "method", "seed", "accuracy"]], on=["task", "method", "seed"])
    spaces = _present(sel["space"], SPACE_ORDER)
    fig, axes = new_figure(3.8, 3.4, panels=len(spaces), sharey=True)
    for ax, sp in zip(axes, spaces):
        part = joined[joined["space"] == sp]
        for m in _present(part["method"], METHOD_ORDER):
            g = part[part["method"] == m]
            ax.scatter(g["value"], g["accuracy"], s=18, color=method_color(m),
                       label=f"{m}: {_spearman(g['value'], g['accuracy'])}")
        ax.set(title=f"λ₁ in the {sp} space", xlabel="top Hessian eigenvalue λ₁")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("test accuracy")
    fig.suptitle(_title(task, "sharpness vs test accuracy, one point per run", seeds_label(joined)))
    return fig


def fig_robustness(robust: pd.DataFrame, *, task: str = "") -> Figure:
    """Accuracy drop (clean − corrupted) per corruption and method: mean ± std over seeds."""
    robust = robust.assign(condition=robust["kind"] + "/" + robust["level"])
    conditions = list(dict.fromkeys(robust["condition"]))
    fig, ax = new_figure(2 + 0.9 * len(conditions), 3.4)
    _category_points(ax, robust, "condition", conditions, "drop", _mean_std)
    for label in ax.get_xticklabels():
        label.set(rotation=30, ha="right")
    ax.set_ylabel("accuracy drop (clean − corrupted)")
    ax.set_title(f"{_title(task, 'robustness to messy input', seeds_label(robust))}\n(mean ± std over seeds)", fontsize=9)
    return fig
