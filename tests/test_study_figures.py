"""The study's paper-style figures (landscape.study.figures) on small synthetic tidy tables."""
import re

import numpy as np
import pandas as pd
from matplotlib.collections import QuadMesh
from matplotlib.container import BarContainer
from matplotlib.contour import ContourSet
from matplotlib.patches import Rectangle
from scipy import stats

from landscape.study.figures import (fig_eigenvalues, fig_expected_loss, fig_lines, fig_planes,
                                     fig_sharpness_vs_accuracy, method_color)

METHODS = ("lora", "flat-lora", "sam-full")
SEEDS = (0, 1, 2, 3)
SPACES = ("lora", "merged")
SIGMAS = (0.01, 0.02, 0.05, 0.1)


def _probes() -> pd.DataFrame:
    """Eigenvalues (x = 1) and expected losses per space, method and seed, with Monte-Carlo errors."""
    rng = np.random.default_rng(0)
    rows = [{"space": sp, "measure": "eigenvalue", "x": 1.0, "value": rng.uniform(1, 50), "err": np.nan,
             "task": "t", "method": m, "seed": s} for sp in SPACES for m in METHODS for s in SEEDS]
    rows += [{"space": sp, "measure": "expected_loss", "x": sigma, "value": sigma * rng.uniform(0.5, 2),
              "err": 0.1 * sigma, "task": "t", "method": m, "seed": s}
             for sp in SPACES for m in METHODS for s in SEEDS for sigma in SIGMAS]
    return pd.DataFrame(rows)


def _curves() -> pd.DataFrame:
    alphas = np.linspace(-1, 1, 5)
    return pd.DataFrame([{"alpha": a, "loss": k * a * a, "delta_loss": k * a * a, "direction": 0, "space": sp,
                          "method": m, "seed": s} for k, m in enumerate(METHODS, 1) for sp in SPACES
                         for s in SEEDS for a in alphas])


def _planes() -> pd.DataFrame:
    grid = np.linspace(-1, 1, 5)
    return pd.DataFrame([{"alpha": a, "beta": b, "loss": k * (a * a + b * b) + 0.1 * a, "method": m,
                          "space": "merged", "seed": 0, "direction": 0}
                         for k, m in enumerate(("lora", "flat-lora"), 1) for a in grid for b in grid])


def _line_colors(fig) -> dict[str, str]:
    return {line.get_label(): line.get_color() for ax in fig.axes for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def _errorbar_colors(fig) -> dict[str, str]:
    return {c.get_label(): c.lines[0].get_color() for ax in fig.axes for c in ax.containers
            if c.get_label() and not c.get_label().startswith("_")}


def test_a_method_has_one_colour_in_every_figure():
    probes = _probes()
    figures = [_line_colors(fig_lines(_curves())), _errorbar_colors(fig_eigenvalues(probes)),
               _errorbar_colors(fig_expected_loss(probes))]
    assert all(colors == {m: method_color(m) for m in METHODS} for colors in figures), figures


def test_eigenvalues_are_points_on_a_log_axis_not_bars():
    ax = fig_eigenvalues(_probes()).axes[0]
    assert ax.get_yscale() == "log"
    assert not any(isinstance(p, Rectangle) for p in ax.patches)
    assert not any(isinstance(c, BarContainer) for c in ax.containers)


def test_the_method_planes_share_one_colour_scale():
    fig = fig_planes(_planes())
    filled = [c for ax in fig.axes for c in ax.collections if isinstance(c, ContourSet) and c.filled]
    assert len(filled) == 2 and len({(c.norm.vmin, c.norm.vmax) for c in filled}) == 1


def test_the_difference_panel_is_the_difference_of_the_grids_on_a_scale_centred_at_zero():
    planes = _planes()
    fig = fig_planes(planes)
    panel, = [ax for ax in fig.axes if ax.get_title() == "flat-lora − lora"]
    mesh, = [c for c in panel.collections if isinstance(c, QuadMesh)]
    assert mesh.norm.vmin == -mesh.norm.vmax < 0
    grid = {m: g.pivot(index="beta", columns="alpha", values="loss").to_numpy() for m, g in planes.groupby("method")}
    assert np.allclose(np.asarray(mesh.get_array()).reshape(5, 5), grid["flat-lora"] - grid["lora"])


def test_expected_loss_ticks_are_exactly_the_sigmas():
    fig = fig_expected_loss(_probes())
    fig.canvas.draw()
    for ax in fig.axes:
        shown = [t.get_text() for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
        assert shown == [f"{s:g}" for s in SIGMAS]


def test_sharpness_vs_accuracy_has_a_panel_per_space_with_rho_within_each_method():
    probes = _probes()
    rng = np.random.default_rng(1)
    metrics = pd.DataFrame([{"task": "t", "method": m, "seed": s, "accuracy": rng.uniform(0.6, 0.9)}
                            for m in METHODS for s in SEEDS])
    fig = fig_sharpness_vs_accuracy(probes, metrics)
    assert [ax.get_title() for ax in fig.axes] == [f"λ₁ in the {sp} space" for sp in SPACES]
    joined = probes[probes["measure"] == "eigenvalue"].merge(metrics, on=["task", "method", "seed"])
    for ax, sp in zip(fig.axes, SPACES):
        for text in ax.get_legend().get_texts():
            method, rho, n = re.fullmatch(r"(.+): ρ = (\S+) \(n = (\d+)\)", text.get_text()).groups()
            g = joined[(joined["space"] == sp) & (joined["method"] == method)]
            assert (rho, int(n)) == (f"{stats.spearmanr(g['value'], g['accuracy']).statistic:.2f}", len(g))
