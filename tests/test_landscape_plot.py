"""Figures: drawn headless from the probes' frames, written as PNG and PDF."""
import pandas as pd
import pytest
import torch

from helpers import make_linear_lora
from landscape import Loss, expected_loss, loss_line, loss_plane
from landscape import plot


@pytest.fixture(scope="module")
def probe():
    model = make_linear_lora()
    g = torch.Generator().manual_seed(0)
    return model, Loss([(torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g))])


def _is_png_and_pdf(paths):
    png, pdf = paths
    return png.read_bytes()[:4] == b"\x89PNG" and pdf.read_bytes()[:5] == b"%PDF-"


def test_lines_with_bands_for_several_spaces(probe, tmp_path):
    model, loss = probe
    frame = pd.concat([loss_line(model, loss, space=k, alphas=7, num_directions=3, progress=False)
                       for k in ("lora", "merged", "normal")])
    fig = plot.plot_lines(frame, by="space", title="digits")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["lora", "merged", "normal"]
    assert len(ax.collections) == 3  # one ± std band per space
    assert _is_png_and_pdf(plot.save_figure(fig, tmp_path / "lines"))
    with pytest.raises(ValueError, match="no column 'method'"):
        plot.plot_lines(frame, by="method")


def test_plane_contour_and_surface(probe, tmp_path):
    model, loss = probe
    frame = loss_plane(model, loss, space="merged", grid=5, progress=False)
    for kind in ("contour", "surface"):
        assert _is_png_and_pdf(plot.save_figure(plot.plot_plane(frame, kind=kind), tmp_path / f"plane_{kind}.png"))
    # the contour's grid is the probe's: α along x, β along y
    fig = plot.plot_plane(frame, kind="contour")
    x0, x1 = fig.axes[0].get_xlim()
    assert (x0, x1) == pytest.approx((-1.0, 1.0))


def test_expected_loss_figure(probe, tmp_path):
    model, loss = probe
    frame = pd.concat([expected_loss(model, loss, space=k, sigmas=[0.05, 0.1], max_samples=4, min_samples=2,
                                     progress=False) for k in ("merged", "tangent")])
    fig = plot.plot_expected_loss(frame, by="space")
    assert fig.axes[0].get_xscale() == "log"
    assert _is_png_and_pdf(plot.save_figure(fig, tmp_path / "noise"))
    assert type(fig.canvas).__name__ == "FigureCanvasAgg"  # headless, no display or pyplot backend
