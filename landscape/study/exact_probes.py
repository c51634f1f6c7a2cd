"""The digits study's probe stage: what a user measures on a model too big for a dense Hessian, on the
runs whose exact spectra :mod:`landscape.study.exact` knows (issue 14, items 4, 7 and 8).

* Settings (:func:`strongest_settings`): per method, the setting whose merged-space λ₁ is lowest
  against LoRA's with the same seed (the geometric-mean ratio of :func:`landscape.study.exact.own_space_effects`),
  so that every method is shown where it changes the landscape most; plus LoRA and full fine-tuning.
* Probes (:func:`probe_strongest`): every seed of those settings through the suite
  (:func:`landscape.study.suite.probe_model`) on the training loss — the same 596 examples, one batch,
  as the exact spectra — in the balanced LoRA, merged, tangent and normal spaces: λ₁ by Lanczos,
  ΔL(σ) under Flat-LoRA's filter noise with :data:`NOISE_SAMPLES` single draws per σ (its Monte-Carlo
  interval beside it; near these minima the first-order term that antithetic pairs would cancel is
  small, and single draws are what the committed parts were made with), worst-case sharpness beside
  its first-order term ρ‖∇L‖, and loss lines along
  :data:`DIRECTIONS` filter-normalized directions → RESULTS/probes.csv (the line curves, some MBs, in
  OUT/digits-mlp/probes-curves.csv beside the runs);
* Planes: :data:`PLANE_GRID` × :data:`PLANE_GRID` merged-space loss planes of seed 0 for LoRA,
  Flat-LoRA and SAM on W, each along the same seeded filter-normalized directions → RESULTS/planes.csv;
* Figures: every figure the tables allow (:func:`landscape.study.pipeline.draw_figures`) as
  FIGURES/digits-mlp-*.{png,pdf} (accuracies from the runs' metrics.json, which spectra.csv also holds).
* Robustness (:func:`robustness_stage`, every run of every setting): test accuracy under Gaussian
  pixel noise and pixel dropout at two levels (:func:`landscape.study.robustness.feature_noise_accuracy`,
  the same noise for every run) → RESULTS/robustness.csv, and the strongest settings' drops as
  FIGURES/digits-mlp-robustness.{png,pdf}.

The probe parts are resumable and fingerprinted by each run's files and every probe setting
(:func:`landscape.study.pipeline.probe_runs`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from flatlora import load_run
from flatlora.io import atomic_write_text

from ..curves import loss_plane
from ..loss import Loss
from ..plot import save_figure
from .exact import SETTINGS, SPLIT, TASK, ExactStudyError, Setting, own_space_effects, run_path
from .figures import PLANE_METHODS, fig_robustness, seeds_label
from .pipeline import draw_figures, probe_runs
from .report import collect_metrics, holm, markdown_table, paired_differences, within_group_spearman
from .robustness import FEATURE_NOISE, feature_noise_accuracy
from .suite import ProbeSettings

__all__ = ["strongest_settings", "probe_strongest", "probe_summary", "robustness_stage", "robustness_statistics",
           "report_sections", "PROBE_SETTINGS"]

NOISE_SAMPLES = 64
DIRECTIONS = 8
PLANE_GRID = 21
PROBE_SETTINGS = ProbeSettings(eig_tol=1e-4, sigmas=(0.02, 0.05, 0.1), noise_max_samples=NOISE_SAMPLES,
                               noise_min_samples=NOISE_SAMPLES, noise_antithetic=False,
                               rhos=(0.05,), worst_case_steps=5,
                               num_directions=DIRECTIONS, alphas=21)


def strongest_settings(spectra: pd.DataFrame) -> list[Setting]:
    """LoRA, then per method the setting with the lowest geometric-mean ratio of merged-space λ₁ to
    LoRA's with the same seed, then full fine-tuning (when it has runs) — from the exact study's
    tidy table (spectra.csv)."""
    effects = own_space_effects(spectra)
    merged = effects[(effects["space"] == "merged") & effects["ratio"].notna()]
    by_name = {s.name: s for s in SETTINGS}
    chosen = [by_name["lora"]]
    for method, g in merged.groupby(merged["setting"].map(lambda n: by_name[n].method), sort=False):
        if method not in ("lora", "full-ft"):
            chosen.append(by_name[g.loc[g["ratio"].idxmin(), "setting"]])
    if (spectra["method"] == "full-ft").any():
        chosen.append(by_name["full-ft"])
    return chosen


def _planes(runs: dict[str, Path], seed: int, settings: ProbeSettings, batch_size: int) -> pd.DataFrame:
    """Each run's merged-space loss plane (:data:`PLANE_GRID` points a side, the suite's span and
    direction seed), tagged with its method and the training ``seed``."""
    frames = []
    for method, d in runs.items():
        model, task, _ = load_run(d)
        loss = Loss(task.batches(SPLIT, batch_size))
        frame = loss_plane(model, loss, space="merged", grid=PLANE_GRID, span=settings.span, seed=settings.seed,
                           progress=False)
        frames.append(frame.assign(task=TASK, method=method, seed=seed))
    return pd.concat(frames, ignore_index=True)


def probe_strongest(out: Path, results: Path, figures: Path, seeds: Sequence[int], *,
                    settings: ProbeSettings = PROBE_SETTINGS, progress: bool = True) -> list[Path]:
    """The probe stage (module docstring) on the finished runs under ``out``; returns the figures made.
    Needs RESULTS/spectra.csv (the exact study's spectra stage) to choose the settings."""
    results, figures = Path(results), Path(figures)
    if not (results / "spectra.csv").exists():
        raise ExactStudyError(f"{results / 'spectra.csv'} does not exist: run the spectra stage first")
    chosen = strongest_settings(pd.read_csv(results / "spectra.csv"))
    runs = [d for s in chosen for seed in seeds if ((d := run_path(out, s, seed)) / "metrics.json").exists()]
    if not runs:
        raise ExactStudyError(f"no finished run of {[s.name for s in chosen]} under {Path(out) / TASK}")
    batch_size = len(load_run(runs[0])[1].splits[SPLIT])  # the whole split in one batch, as the exact spectra
    probes, curves = probe_runs(runs, Path(out) / TASK / "probes.csv", settings, SPLIT, batch_size, batch_size,
                                progress=progress, parts=Path(out) / TASK / "probe-parts")
    atomic_write_text(results / "probes.csv", probes.to_csv(index=False))  # the curves (MBs) stay with the runs
    seed0 = {s.method: run_path(out, s, seeds[0]) for s in chosen if s.method in PLANE_METHODS}
    planes = _planes({m: d for m, d in seed0.items() if (d / "metrics.json").exists()}, seeds[0], settings,
                     batch_size)
    atomic_write_text(results / "planes.csv", planes.to_csv(index=False))
    tables = {"metrics": collect_metrics(runs), "probes": probes, "curves": curves, "planes": planes}
    return draw_figures(tables, figures, TASK)[0]


def robustness_stage(out: Path, results: Path, figures: Path, settings: Sequence[Setting], seeds: Sequence[int],
                     *, progress: bool = True) -> pd.DataFrame:
    """Every finished run's accuracy under feature noise (module docstring) → RESULTS/robustness.csv
    (one row per run × kind × level, with its setting and seed), and the strongest settings' drops
    as a figure; returns the table."""
    from tqdm.auto import tqdm

    todo = [(s, seed, d) for s in settings for seed in seeds if ((d := run_path(out, s, seed)) / "metrics.json").exists()]
    if not todo:
        raise ExactStudyError(f"no finished run under {Path(out) / TASK}: run the train stage first")
    frames = []
    for setting, seed, d in tqdm(todo, desc="robustness", unit="run", disable=not progress, dynamic_ncols=True):
        model, task, _ = load_run(d)
        frames.append(feature_noise_accuracy(model, task).assign(run=d.name, setting=setting.name,
                                                                 method=setting.method, seed=seed))
    robust = pd.concat(frames, ignore_index=True)
    atomic_write_text(Path(results) / "robustness.csv", robust.to_csv(index=False))
    spectra = Path(results) / "spectra.csv"
    if spectra.exists():
        strongest = [s.name for s in strongest_settings(pd.read_csv(spectra))]
        save_figure(fig_robustness(robust[robust["setting"].isin(strongest)], task=TASK), Path(figures) / f"{TASK}-robustness")
    return robust


SIGMA = 0.05  # the σ of ΔL the summary reports
RHO = 0.05


def probe_summary(probes: pd.DataFrame, spectra: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Per method × space over seeds: Lanczos λ₁ against the exact λ₁ of the same run (the largest
    relative difference), ΔL(σ = :data:`SIGMA`) (mean, seed std, mean Monte-Carlo 95 % half-width, runs
    whose interval excludes 0), worst-case sharpness at ρ = :data:`RHO` and its first-order term ρ‖∇L‖
    (means). Returns the table and sentences (markdown bullets) made from it."""
    pick = lambda measure, x: probes[(probes["measure"] == measure) & np.isclose(probes["x"], x)].set_index(  # noqa: E731
        ["method", "space", "seed"])
    probed = spectra[spectra["setting"].isin([s.name for s in strongest_settings(spectra)])]
    exact = probed.set_index(["method", "space", "seed"])["lambda_max"]
    lanczos, noise = pick("eigenvalue", 1)["value"], pick("expected_loss", SIGMA)
    worst, first = pick("worst_case", RHO)["value"], pick("worst_case_first_order", RHO)["value"]
    rel = ((lanczos - exact.reindex(lanczos.index)) / exact.reindex(lanczos.index)).abs()
    excludes = (noise["value"] - noise["err"] > 0) | (noise["value"] + noise["err"] < 0)
    frame = pd.DataFrame({"exact λ₁": exact.reindex(lanczos.index), "Lanczos λ₁": lanczos, "|rel. diff|": rel,
                          "ΔL": noise["value"], "MC half-width": noise["err"], "excludes 0": excludes,
                          "worst case": worst, "ρ‖∇L‖": first})
    g = frame.groupby(level=["method", "space"], sort=False)
    table = pd.DataFrame({"seeds": g.size(), "exact λ₁ (median)": g["exact λ₁"].median(),
                          "Lanczos λ₁ (median)": g["Lanczos λ₁"].median(), "max rel. diff": g["|rel. diff|"].max(),
                          f"ΔL(σ={SIGMA:g}) mean": g["ΔL"].mean(), "seed std": g["ΔL"].std(),
                          "MC half-width (mean)": g["MC half-width"].mean(),
                          "runs with CI ∌ 0": g["excludes 0"].sum().astype(int).astype(str) + "/" + g.size().astype(str),
                          f"worst case (ρ={RHO:g})": g["worst case"].mean(), "ρ‖∇L‖": g["ρ‖∇L‖"].mean()}).reset_index()
    share = frame["worst case"] / frame["ρ‖∇L‖"]
    lines = [f"- Lanczos λ₁ (tolerance {PROBE_SETTINGS.eig_tol:g}) against the exact λ₁ of the same run and space: "
             f"largest relative difference {rel.max():.2g} over {rel.notna().sum()} run × space pairs.",
             f"- ΔL(σ = {SIGMA:g}) with {NOISE_SAMPLES} noise draws: its 95 % interval excludes 0 in "
             f"{int(excludes.sum())} of {len(excludes)} run × space pairs; the Monte-Carlo half-width is "
             f"{(noise['err'] / noise['value'].abs()).median():.2g} of |ΔL| (median).",
             f"- Worst-case sharpness at ρ = {RHO:g} over its first-order term ρ‖∇L‖: median {share.median():.3g} "
             f"(range {share.min():.3g}–{share.max():.3g}); at these trained points the gradient is "
             + ("small and the worst case measures curvature." if share.median() > 2 else
                "not negligible, and the worst case is largely slope.")]
    return table, lines


ALPHA = 0.05


def robustness_statistics(robust: pd.DataFrame, spectra: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(a) Each setting's accuracy drop under each noise condition against LoRA's with the same seed
    (paired t, Holm over every setting × condition); (b) Spearman's ρ of λ₁ against the drop within
    each setting, space and condition (never pooled over methods; Holm over every cell)."""
    robust = robust.assign(condition=robust["kind"] + "/" + robust["level"])
    paired = pd.concat([paired_differences(g, "drop").assign(condition=c)
                        for c, g in robust.groupby("condition", sort=False)], ignore_index=True)
    paired["p_holm"] = holm(paired["p"])
    joined = spectra[["run", "setting", "space", "lambda_max"]].merge(robust[["run", "condition", "drop"]], on="run")
    return paired, within_group_spearman(joined, "lambda_max", "drop", by=("setting", "space", "condition"))


def _robustness_lines(paired: pd.DataFrame, within: pd.DataFrame, robust: pd.DataFrame) -> list[str]:
    sig = paired[paired["p_holm"] < ALPHA]
    done = within.dropna(subset=["rho"])
    wsig = done[done["p_holm"] < ALPHA]
    heavy = robust[robust["level"] == "heavy"].groupby("setting")["drop"].mean()
    return [f"- Accuracy drop under input noise (Gaussian pixel noise and pixel dropout, two levels; mean over "
            f"the heavy levels from {heavy.min():.3f} ({heavy.idxmin()}) to {heavy.max():.3f} ({heavy.idxmax()})), "
            f"against LoRA with the same seed, Holm over {len(paired)} setting × condition cells: {len(sig)} cell(s) "
            f"at Holm-adjusted p < {ALPHA:g}" + (": " + "; ".join(
                f"{r.setting} {r.condition} {r.difference:+.3f} [{r.low:+.3f}, {r.high:+.3f}] (p = {r.p_holm:.2g})"
                for r in sig.itertuples()) + "." if len(sig) else "."),
            f"- λ₁ against the accuracy drop within one setting, space and condition (Spearman, Holm over {len(done)} "
            f"cells): ρ from {done['rho'].min():.2f} to {done['rho'].max():.2f}; {len(wsig)} cell(s) at Holm-adjusted "
            f"p < {ALPHA:g}."]


def report_sections(results: Path, spectra: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(findings as markdown bullets, report sections) from the probe stage's probes.csv and the
    robustness stage's robustness.csv in ``results`` — each part only when its table is there."""
    results = Path(results)
    findings, sections = [], []
    if (results / "probes.csv").exists():
        probes = pd.read_csv(results / "probes.csv")
        summary, lines = probe_summary(probes, spectra)
        findings += lines
        sections += ["## The probe suite on each method's strongest setting", "",
                     f"Per method the setting that lowers merged λ₁ most against LoRA, {seeds_label(probes)} each, probed on the "
                     f"same training loss as the spectra (`probes.csv`; suite settings: "
                     f"{PROBE_SETTINGS.noise_max_samples} noise draws per σ, {PROBE_SETTINGS.num_directions} line "
                     f"directions, worst case by {PROBE_SETTINGS.worst_case_steps} ascent steps).", "",
                     markdown_table(summary, floatfmt=".3g"), ""]
    if (results / "robustness.csv").exists():
        robust = pd.read_csv(results / "robustness.csv")
        paired, within = robustness_statistics(robust, spectra)
        findings += _robustness_lines(paired, within, robust)
        drops = robust.assign(condition=robust["kind"] + "/" + robust["level"]).pivot_table(
            index="setting", columns="condition", values="drop", aggfunc="mean", sort=False)
        sections += ["## Robustness: accuracy drop under input noise (mean over seeds)", "",
                     f"Test accuracy on clean inputs minus that on noisy ones (`robustness.csv`; the same noise for "
                     "every run; Gaussian noise of standard deviation, or dropout with probability, "
                     + ", ".join(f"{k} {' / '.join(f'{lv} {v:g}' for lv, v in levels.items())}"
                                 for k, levels in FEATURE_NOISE.items()) + ", on pixels scaled to [0, 1]).", "",
                     markdown_table(drops.reset_index(), floatfmt=".3f"), "",
                     "Against LoRA with the same seed (mean difference of the drop, 95 % t interval, paired t p, "
                     "Holm over every setting × condition):", "",
                     markdown_table(paired[["setting", "condition", "pairs", "difference", "low", "high", "p", "p_holm"]],
                                    floatfmt=".3g"), ""]
    return findings, sections
