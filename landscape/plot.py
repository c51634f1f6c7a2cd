"""Paper-style figures of the probes' DataFrames, drawn headless (matplotlib's Agg canvas, no pyplot,
no display needed) and saved as PNG and PDF.

* :func:`plot_lines` — loss lines, mean ± std band over directions, one curve per group (space,
  method, checkpoint: any label column you add to the frame);
* :func:`plot_plane` — a loss plane as filled contours or a 3-D surface;
* :func:`plot_expected_loss` — ΔL(σ) with its confidence interval, one curve per group;
* :func:`save_figure` — ``path.png`` and ``path.pdf``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


__all__ = ["plot_lines", "plot_plane", "plot_expected_loss", "save_figure", "new_figure", "plot_hessian_density"]


def new_figure(width: float = 5.0, height: float = 3.6, projection: Optional[str] = None, *, panels: Optional[int] = None,
               sharey: bool = False):
    """A figure on an Agg canvas — no pyplot state, works without a display — and its axes: one axes
    (``panels=None``), or a row of ``panels`` axes, each ``width`` wide (a list)."""
    fig = Figure(figsize=(width * (panels or 1), height), layout="constrained")
    FigureCanvasAgg(fig)
    if panels is None:
        return fig, fig.add_subplot(projection=projection)
    return fig, list(fig.subplots(1, panels, sharey=sharey, squeeze=False, subplot_kw={"projection": projection})[0])


def _groups(frame: pd.DataFrame, by: str):
    if by not in frame.columns:
        raise ValueError(f"the frame has no column {by!r} to group by (columns: {list(frame.columns)})")
    return frame.groupby(by, sort=False)


def plot_lines(frame: pd.DataFrame, *, by: str = "space", metric: str = "loss", ax=None, title: Optional[str] = None,
               colors: Optional[dict] = None):
    """Curves of ``metric`` against α from :func:`~landscape.loss_line` frames (concatenate several,
    with a label column, to compare methods or spaces on one axis): the mean over directions, and a
    ± std band when there are several. ``colors`` maps a label to its colour (default: the colour
    cycle). Returns the figure."""
    if metric not in ("loss", "accuracy"):
        raise ValueError(f"metric must be 'loss' or 'accuracy', got {metric!r}")
    fig, ax = new_figure() if ax is None else (ax.figure, ax)
    for label, group in _groups(frame, by):
        s = group.groupby("alpha")[metric].agg(["mean", "std"])
        line, = ax.plot(s.index, s["mean"], label=str(label), color=(colors or {}).get(label))
        if s["std"].notna().any():
            ax.fill_between(s.index, s["mean"] - s["std"], s["mean"] + s["std"], color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("α")
    ax.set_ylabel(metric)
    ax.legend(title=by)
    if title:
        ax.set_title(title)
    return fig


def plot_plane(frame: pd.DataFrame, *, kind: str = "contour", metric: str = "loss", levels: int = 20,
               title: Optional[str] = None, trajectory: Optional[pd.DataFrame] = None):
    """A :func:`~landscape.loss_plane` frame (mean over directions) as ``"contour"`` (filled, with
    the origin marked, and a :class:`~landscape.directions.TrajectoryPCA` path if ``trajectory``) or
    ``"surface"`` (3-D). Returns the figure."""
    if kind not in ("contour", "surface"):
        raise ValueError(f"kind must be 'contour' or 'surface', got {kind!r}")
    mean = frame.groupby(["beta", "alpha"])[metric].mean().unstack("alpha")  # rows β, columns α
    a, b, z = mean.columns.to_numpy(), mean.index.to_numpy(), mean.to_numpy()
    if kind == "contour":
        fig, ax = new_figure(4.6, 4.0)
        filled = ax.contourf(a, b, z, levels=levels, cmap="viridis")
        ax.contour(a, b, z, levels=levels, colors="k", linewidths=0.3)
        fig.colorbar(filled, ax=ax, label=metric)
        ax.plot([0], [0], marker="*", color="w", markeredgecolor="k", markersize=10)
        if trajectory is not None:
            ax.plot(trajectory["alpha"], trajectory["beta"], "o-", color="r", markersize=3, lw=1)
        ax.set_aspect("equal", adjustable="box")
    else:
        fig, ax = new_figure(5.0, 4.2, projection="3d")
        aa, bb = np.meshgrid(a, b)
        ax.plot_surface(aa, bb, z, cmap="viridis", linewidth=0, antialiased=True)
        ax.set_zlabel(metric)
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    if title:
        ax.set_title(title)
    return fig


def plot_expected_loss(frame: pd.DataFrame, *, by: str = "space", ax=None, logy: bool = False, title: Optional[str] = None):
    """ΔL(σ) from :func:`~landscape.expected_loss` frames with the t-interval as error bars, one
    curve per ``by`` group, σ on a log axis. Returns the figure."""
    fig, ax = new_figure() if ax is None else (ax.figure, ax)
    for label, group in _groups(frame, by):
        g = group.sort_values("sigma")
        ax.errorbar(g["sigma"], g["delta_loss"], yerr=g["half_width"], marker="o", ms=3, capsize=2, label=str(label))
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("σ")
    ax.set_ylabel("ΔL = E L(θ+ε) − L(θ)")
    ax.legend(title=by)
    if title:
        ax.set_title(title)
    return fig


def save_figure(fig, path: Union[str, os.PathLike]) -> list[Path]:
    """Write ``path`` with suffix ``.png`` (200 dpi) and ``.pdf``; return both paths. The PDF carries
    no creation date, so the same figure is the same file (a rerun does not churn committed figures)."""
    stem = Path(path).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(out[0], dpi=200)
    fig.savefig(out[1], metadata={"CreationDate": None})
    return out


def plot_hessian_density(density, *, sigma: Optional[float] = None, ax=None, logy: bool = True,
                         label: Optional[str] = None, title: Optional[str] = None):
    """The eigenvalue density of :func:`~landscape.hessian.density` (SLQ rules smoothed with a Gaussian
    of width ``sigma``, default 1% of their range), on a log density axis by default — the bulk near 0
    dwarfs the outliers (Ghorbani et al., 2019). Pass ``ax`` to overlay spaces or checkpoints.
    Returns the figure."""
    fig, ax = new_figure() if ax is None else (ax.figure, ax)
    grid, phi = density.smoothed(sigma=sigma)
    ax.plot(grid, phi, label=label or density.space)
    if logy:
        ax.set_yscale("log")
        ax.set_ylim(bottom=max(phi.max() * 1e-8, np.finfo(float).tiny))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.legend()
    if title:
        ax.set_title(title)
    return fig
