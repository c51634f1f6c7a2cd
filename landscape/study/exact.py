"""The flatness-mismatch claim on digits-mlp with exact spectra (issue 14, items 5 and 6).

Claim under test: a LoRA solution flat in its own space can be sharp in the full weight space. On
digits-mlp (LoRA r = 4 on fc1, fc2 and head: 808 LoRA coordinates, 3,392 merged ones) every Hessian
is small enough to write down, so each run's sharpness carries no estimator noise: the training loss
L (cross-entropy over the whole train split, one batch, eval mode) is differentiated twice in float64
(a ``model.double()`` copy, :func:`landscape.dense_hessian`), symmetrized, and eigendecomposed
(``numpy.linalg.eigvalsh``) in five spaces:

===================  ===============================================================================
``lora-balanced``    the LoRA factors in the balanced gauge (BᵀB = AAᵀ per layer,
                     :func:`landscape.balanced_copy`): free of LoRA's (A·c, B/c) gauge
``lora-as-trained``  the LoRA factors as training left them — gauge-dependent, a caveat only
``merged``           the merged weights W' = W + s·B·A (full-ft: the same layers' weights W)
``tangent``          Q_Tᵀ H_merged Q_T, Q_T an orthonormal basis of the directions LoRA can express to
                     first order (:meth:`landscape.Space.basis`)
``normal``           Q_Nᵀ H_merged Q_N, the directions LoRA cannot express
===================  ===============================================================================

Per run and space: λ₁ (largest eigenvalue), λ_min, the trace Σλ, and the number of eigenvalues
above τ, one threshold per family of coordinates fixed for every run: τ = 1 % of the median λ₁ of the
plain-LoRA runs in ``lora-balanced`` (for both LoRA spaces) and in ``merged`` (for merged, tangent
and normal, which share its coordinates).

Methods and settings (:data:`SETTINGS`): LoRA; Flat-LoRA (Li et al., ICML 2025) σ ∈ {0.05, 0.1, 0.2}
with the cosine and the constant schedule; SAM on the LoRA factors (Foret et al., 2021) ρ ∈ {0.003,
0.01, 0.03, 0.1}; SAM on the merged weights ρ ∈ {0.01, 0.05, 0.1}; full fine-tuning — each for every
seed, :data:`STEPS` steps (the task's default of 150 leaves LoRA's train loss at 0.73; at 1,200 it is
about 0.02, flat over the last third of training).

The answer (:func:`correlations`, :func:`~landscape.study.report.mismatched_runs`, :func:`own_space_effects`): Spearman's ρ
between balanced-LoRA λ₁ and merged λ₁ across runs, with a seeded BCa bootstrap 95 % interval
(Efron, 1987; ``scipy.stats.bootstrap``) — if flatness in the LoRA space implied flatness in the full
space, the runs would fall on a monotone curve (ρ = 1); the runs flat in one space and sharp in the
other; per setting, tangent and normal λ₁ paired by seed against LoRA's, to see whether the
sharpness that LoRA cannot see (normal space) is what Flat-LoRA and SAM on W reduce; and the claim's
direct test (:func:`direct_test`): SAM on A, B against SAM on W at the same ρ, paired by seed, in
every space and on the gap λ₁(balanced LoRA) ÷ λ₁(merged), in one Holm family with the settings'
comparisons against LoRA.

Stages (:data:`STAGES`, each resumable): ``train`` every setting × seed into OUT/digits-mlp/NAME-sSEED/
(finished runs are kept); ``spectra`` — one part per run (:class:`landscape.results.PartFiles` in
OUT/digits-mlp/exact-parts/, fingerprinted by the run's files and the spectrum settings), then the
tidy table RESULTS/spectra.csv; ``probe`` and ``robust`` — the probe suite on each method's
strongest setting and every run's accuracy under input noise (:mod:`landscape.study.exact_probes`);
``report`` — from those tables: RESULTS/summary.json, RESULTS/summary.md and
FIGURES/digits-exact-lora-vs-merged.{png,pdf}; the accuracy against LoRA and the λ₁–accuracy
correlations within each setting (:func:`accuracy_statistics`) come from spectra.csv, which holds
every run's accuracy.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

from flatlora import TrainConfig, get_method, load_run, run
from flatlora.io import atomic_write_json, atomic_write_text, read_json
from flatlora.training import RunExistsError

from ..gauge import balanced_copy, gauge_imbalance
from ..hessian import dense_hessian
from ..loss import Loss
from ..plot import new_figure, save_figure
from ..results import PartFiles
from ..space import space
from .figures import method_color, plain_log_axes, seeds_label
from .pipeline import differing_settings, run_fingerprint
from .report import (MIN_RUNS, claim_contrast, claim_contrast_lines, holm, markdown_table, mismatched_runs,
                     one_family, paired_differences, paired_log_ratio, spearman_interval, within_group_spearman)

__all__ = ["ExactStudyError", "Setting", "SETTINGS", "SPACES", "STAGES", "STEPS", "TASK", "select_settings",
           "train_runs", "exact_spectra", "spectra_parts", "spectra_table", "correlations",
           "own_space_effects", "direct_test", "findings", "accuracy_statistics", "accuracy_findings", "fig_lora_vs_merged", "write_report", "run_exact_study"]

TASK = "digits-mlp"
STEPS = 1200
SPACES = ("lora-balanced", "lora-as-trained", "merged", "tangent", "normal")
STAGES = ("train", "spectra", "probe", "robust", "report")
THRESHOLD_FRACTION = 0.01
#: each space's eigenvalue threshold comes from plain LoRA's median λ₁ in the space that sets its units
THRESHOLD_SPACE = {"lora-balanced": "lora-balanced", "lora-as-trained": "lora-balanced", "merged": "merged",
                   "tangent": "merged", "normal": "merged"}
SPLIT = "train"
FIGURE = "digits-exact-lora-vs-merged"


class ExactStudyError(ValueError):
    """What the study cannot do with what it was given (unknown method, no runs, no LoRA runs…)."""


@dataclass(frozen=True)
class Setting:
    """One method with its settings; ``None`` keeps :class:`flatlora.TrainConfig`'s default."""

    method: str
    sigma: Optional[float] = None
    schedule: Optional[str] = None
    rho: Optional[float] = None

    @property
    def name(self) -> str:
        """``lora``, ``flat-lora-sigma0.1-cosine``, ``sam-lora-rho0.01`` …: the run folders' prefix."""
        parts = [self.method]
        if self.sigma is not None:
            parts += [f"sigma{self.sigma:g}", self.schedule]
        if self.rho is not None:
            parts.append(f"rho{self.rho:g}")
        return "-".join(parts)

    def settings(self) -> dict:
        """The TrainConfig fields this setting sets."""
        given = {"sigma": self.sigma, "schedule": self.schedule, "rho": self.rho}
        return {k: v for k, v in given.items() if v is not None}

    def config(self, seed: int, steps: int, task: str = TASK, **fields) -> TrainConfig:
        """The run's config: this setting on ``task``, with further TrainConfig ``fields`` (lr, task_options…)."""
        return TrainConfig(task=task, method=self.method, seed=seed, steps=steps, **fields, **self.settings())


SETTINGS = (
    Setting("lora"),
    *(Setting("flat-lora", sigma=s, schedule=k) for s in (0.05, 0.1, 0.2) for k in ("cosine", "constant")),
    *(Setting("sam-lora", rho=r) for r in (0.003, 0.01, 0.03, 0.1)),
    *(Setting("sam-full", rho=r) for r in (0.01, 0.05, 0.1)),
    Setting("full-ft"),
)


def select_settings(methods: Optional[Sequence[str]] = None) -> list[Setting]:
    """The :data:`SETTINGS` of ``methods`` (all when None), in their order; an :class:`ExactStudyError`
    names unknown ones."""
    known = list(dict.fromkeys(s.method for s in SETTINGS))
    unknown = sorted(set(methods or ()) - set(known))
    if unknown:
        raise ExactStudyError(f"unknown method(s) {unknown} for the exact study; choose among {known}")
    return [s for s in SETTINGS if methods is None or s.method in methods]


def run_path(out: Path, setting: Setting, seed: int, task: str = TASK) -> Path:
    return Path(out) / task / f"{setting.name}-s{seed}"


# ------------------------------------------------------------------------------------------- train
def train_runs(out: Path, settings: Sequence[Setting], seeds: Sequence[int], steps: int = STEPS,
               progress: bool = True, task: str = TASK, **fields) -> None:
    """Train every setting × seed on ``task`` (with further TrainConfig ``fields``) that has no
    finished run yet (an interrupted one resumes from its checkpoint). A finished run made with other
    settings is an error: the study would mix them."""
    for setting in settings:
        for seed in seeds:
            d = run_path(out, setting, seed, task)
            cfg = setting.config(seed, steps, task, **fields)
            if (d / "metrics.json").exists():
                differ = differing_settings(d, {"method": cfg.method, "seed": seed, "steps": steps, **fields,
                                                **setting.settings()})
                if differ:
                    raise ExactStudyError(f"{d} holds a finished run with other settings ({differ}); delete it "
                                          "or pass another --out")
                continue
            print(f"[exact] train {setting.name} seed {seed} ({steps} steps) → {d}", flush=True)
            try:
                run(cfg, d, progress=progress)
            except RunExistsError as e:  # an interrupted run with other settings
                raise ExactStudyError(f"{e}; or delete {d}, or pass another --out") from None


# ----------------------------------------------------------------------------------------- spectra
def _double(batch: tuple) -> tuple:
    return tuple(t.double() if torch.is_tensor(t) and t.is_floating_point() else t for t in batch)


def _eigenvalues(h: np.ndarray) -> tuple[np.ndarray, float]:
    """Eigenvalues (ascending) of (H + Hᵀ)/2 and the asymmetry max|H − Hᵀ| / max|H| (rounding only)."""
    return np.linalg.eigvalsh((h + h.T) / 2), float(np.abs(h - h.T).max() / np.abs(h).max())


def exact_spectra(model: nn.Module, loss: Loss, *, weights: Optional[Sequence[str]] = None,
                  progress: bool = False) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """The exact Hessian spectra of ``loss`` (float64 batches) at a float64 copy of ``model`` in each of
    :data:`SPACES` (the model is not written). ``weights``: for a model without LoRA (full-ft), the
    parameter names that make its ``merged`` space, the only one it has.

    Returns ({space: eigenvalues ascending}, a frame with one row per space: ``dim``,
    ``symmetry_error`` and ``seconds``)."""
    m64 = copy.deepcopy(model).double()
    spectra, rows = {}, []

    def add(name: str, compute) -> np.ndarray:
        start = time.perf_counter()
        h = compute()
        spectra[name], asymmetry = _eigenvalues(h)
        rows.append({"space": name, "dim": h.shape[0], "symmetry_error": asymmetry,
                     "seconds": time.perf_counter() - start})
        return h

    dense = lambda m, sp: dense_hessian(m, loss, sp, progress=progress).numpy()  # noqa: E731
    if weights is not None:
        add("merged", lambda: dense(m64, list(weights)))
        return spectra, pd.DataFrame(rows)
    add("lora-balanced", lambda: dense(balanced_copy(m64), "lora"))
    add("lora-as-trained", lambda: dense(m64, "lora"))
    merged = add("merged", lambda: dense(m64, "merged"))

    def restricted(kind: str) -> np.ndarray:  # Qᵀ H_merged Q: the subspace's Hessian in an orthonormal basis
        q = space(m64, kind).basis().numpy()
        return q.T @ merged @ q

    for kind in ("tangent", "normal"):
        add(kind, lambda kind=kind: restricted(kind))
    return spectra, pd.DataFrame(rows)


def _part(path: Path) -> dict[str, pd.DataFrame]:
    """One run's part: its spectra ("spectrum": space, eigenvalue) and "info" (per space: dim,
    symmetry error, seconds; the as-trained gauge imbalance)."""
    model, task, cfg = load_run(path)
    loss = Loss([_double(task.collate(task.splits[SPLIT]))])
    lora = get_method(cfg["method"]).uses_lora
    spectra, info = exact_spectra(model, loss, weights=None if lora else [f"{t}.weight" for t in task.lora_targets])
    spectrum = pd.concat([pd.DataFrame({"space": k, "eigenvalue": v}) for k, v in spectra.items()], ignore_index=True)
    return {"spectrum": spectrum, "info": info.assign(imbalance=gauge_imbalance(model) if lora else np.nan)}


def spectra_parts(out: Path, settings: Sequence[Setting], seeds: Sequence[int], progress: bool = True
                  ) -> list[tuple[Setting, int, Path, dict[str, pd.DataFrame]]]:
    """Each finished run's part (computed, or reused when its fingerprint — the run's files, the split,
    the spaces, float64 — matches): [(setting, seed, run folder, tables)]."""
    parts = PartFiles(Path(out) / TASK / "exact-parts", names=("spectrum", "info"))
    todo = [(s, seed, d) for s in settings for seed in seeds if ((d := run_path(out, s, seed)) / "metrics.json").exists()]
    found = []
    for setting, seed, d in tqdm(todo, desc="exact spectra", unit="run", disable=not progress, dynamic_ncols=True):
        fingerprint = {"files": run_fingerprint(d), "split": SPLIT, "spaces": SPACES, "dtype": "float64"}
        found.append((setting, seed, d, parts.get(d.name, fingerprint, lambda d=d: _part(d))))
    return found


def _thresholds(frame: pd.DataFrame) -> dict[str, float]:
    lora = frame[frame["method"] == "lora"]
    if lora.empty:
        raise ExactStudyError("the eigenvalue thresholds are 1 % of plain LoRA's median λ₁: include 'lora' in the "
                              "methods")
    medians = lora.groupby("space")["lambda_max"].median()
    return {sp: THRESHOLD_FRACTION * float(medians[src]) for sp, src in THRESHOLD_SPACE.items()}


def spectra_table(found: Sequence[tuple[Setting, int, Path, dict[str, pd.DataFrame]]]) -> pd.DataFrame:
    """The tidy table, one row per run × space: the setting, λ₁, λ_min, trace, the threshold τ and the
    number of eigenvalues above it, the checks (symmetry error, seconds, gauge imbalance) and the
    run's metrics (test and validation accuracy, final train loss — the mean over the last tenth of
    the steps —, training seconds)."""
    rows = []
    for setting, seed, d, tables in found:
        metrics = read_json(d / "metrics.json")
        tail = metrics["train_loss"][-max(1, len(metrics["train_loss"]) // 10):]
        info = tables["info"].set_index("space")
        for sp, ev in tables["spectrum"].groupby("space", sort=False)["eigenvalue"]:
            ev = np.sort(ev.to_numpy())
            rows.append({"task": TASK, "run": d.name, "method": setting.method, "setting": setting.name,
                         "sigma": setting.sigma, "schedule": setting.schedule, "rho": setting.rho, "seed": seed,
                         "space": sp, "dim": len(ev), "lambda_max": ev[-1], "lambda_min": ev[0], "trace": ev.sum(),
                         "eigenvalues": ev, **info.loc[sp, ["symmetry_error", "seconds", "imbalance"]].to_dict(),
                         "accuracy": metrics["accuracy"], "validation_accuracy": metrics["validation"]["accuracy"],
                         "train_loss": float(np.mean(tail)), "train_seconds": metrics["wall_time_s"]})
    frame = pd.DataFrame(rows)
    frame["threshold"] = frame["space"].map(_thresholds(frame))
    frame["n_above"] = [int((ev > t).sum()) for ev, t in zip(frame["eigenvalues"], frame["threshold"])]
    return frame.drop(columns="eigenvalues").rename(columns={"seconds": "hessian_seconds"})


# -------------------------------------------------------------------------------------- statistics
PAIRS = (("lora-balanced", "merged"), ("lora-as-trained", "merged"), ("lora-balanced", "normal"), ("tangent", "normal"))


def _wide(frame: pd.DataFrame, value: str = "lambda_max") -> pd.DataFrame:
    """run × space of ``value``, with the run's method and setting, LoRA runs only (they have every space)."""
    lora = frame[frame["space"] == "lora-balanced"]["run"]
    sel = frame[frame["run"].isin(lora)]
    wide = sel.pivot(index="run", columns="space", values=value)
    return wide.join(sel.groupby("run")[["method", "setting", "seed"]].first())


def correlations(frame: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """Spearman's ρ of λ₁ between the spaces of :data:`PAIRS` across the LoRA runs — pooled over every
    method and setting, and within each method with at least :data:`MIN_RUNS` runs — with bootstrap
    intervals (:func:`~landscape.study.report.spearman_interval`)."""
    wide = _wide(frame)
    scopes = [("all", wide)] + [(m, g) for m, g in wide.groupby("method", sort=False)]
    rows = [{"x": a, "y": b, "scope": name, **spearman_interval(g[a], g[b], seed=seed)}
            for a, b in PAIRS for name, g in scopes if len(g) >= MIN_RUNS]
    return pd.DataFrame(rows)


def own_space_effects(frame: pd.DataFrame) -> pd.DataFrame:
    """Per setting and space: the median λ₁ over seeds, and λ₁ against plain LoRA's with the same seed
    (seeds pair data order and initialisation) on the log scale (:func:`~landscape.study.report.paired_log_ratio`):
    the geometric-mean ratio with its 95 % t interval, the seeds below LoRA's, the paired t-test's p,
    and ``p_holm``, Holm-adjusted over every comparison of the table (every setting × space).

    A t-test on log ratios rather than Wilcoxon's signed-rank test: with 10 pairs Wilcoxon's smallest
    two-sided p is 2/1024, which Holm's correction over some 60 comparisons cannot let through."""
    lora = frame[frame["method"] == "lora"].pivot(index="seed", columns="space", values="lambda_max")
    rows = []
    for (setting, sp), g in frame.groupby(["setting", "space"], sort=False):
        g = g.set_index("seed")["lambda_max"]
        base = lora[sp].reindex(g.index).dropna() if sp in lora else g.iloc[:0]
        paired = paired_log_ratio(g.loc[base.index], base) if setting != "lora" else {}
        rows.append({"setting": setting, "space": sp, "n": len(g), "median_lambda_max": float(g.median()),
                     **{k: paired.get(k, np.nan) for k in ("ratio", "low", "high", "p")},
                     "below_lora": paired.get("below", 0), "pairs": paired.get("pairs", 0)})
    effects = pd.DataFrame(rows)
    return effects.assign(p_holm=holm(effects["p"]))


#: the claim's direct test on digits: SAM on A, B against SAM on W at the same ρ — the strongest of
#: both grids and the ρ of the MiniLM study's direct test
DIRECT_TEST = ("sam-lora-rho0.1", "sam-full-rho0.1")


def direct_test(frame: pd.DataFrame, settings: Sequence[str] = DIRECT_TEST) -> pd.DataFrame:
    """:func:`~landscape.study.report.claim_contrast` on the exact λ₁ of ``settings`` (SAM on A, B,
    then SAM on W) in spectra.csv's long form: per space λ₁(A, B) ÷ λ₁(W) with the same seed and the
    ratio of their gaps λ₁(lora-balanced) ÷ λ₁(merged), geometric means with t intervals and paired
    p; no rows unless both settings have a run with the same seed."""
    sel = frame[frame["setting"].isin(settings)]
    return claim_contrast(sel.assign(method=sel["setting"], measure="eigenvalue", x=1, value=sel["lambda_max"]),
                          methods=settings)


# ------------------------------------------------------------------------------------------ report
PANELS = (("lora-balanced", "merged", "(a) LoRA space vs full space", "λ₁, LoRA space (balanced gauge)",
           "λ₁, merged space"),
          ("tangent", "normal", "(b) tangent vs normal", "λ₁, tangent space (LoRA can move)",
           "λ₁, normal space (LoRA cannot)"))


def fig_lora_vs_merged(frame: pd.DataFrame) -> Figure:
    """(a) balanced-LoRA λ₁ against merged λ₁ and (b) tangent against normal λ₁, one point per run,
    coloured by method, on log axes labelled at 1, 2, 5 × 10ᵏ; full fine-tuning's merged λ₁ range as
    a grey band in (a)."""
    wide = _wide(frame)
    fig, axes = new_figure(4.6, 4.0, panels=2)
    full = frame[(frame["method"] == "full-ft") & (frame["space"] == "merged")]["lambda_max"]
    if len(full):
        axes[0].axhspan(full.min(), full.max(), color="0.85", zorder=0, label=f"full-ft merged λ₁ ({len(full)} runs)")
    for ax, (x, y, title, xlabel, ylabel) in zip(axes, PANELS):
        for method, g in wide.groupby("method", sort=False):
            ax.scatter(g[x], g[y], s=14, color=method_color(method), alpha=0.75, label=f"{method} ({len(g)} runs)")
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        plain_log_axes(ax)
        ax.legend(fontsize=7)
    fig.suptitle(f"{TASK}: exact top Hessian eigenvalue of the training loss\n"
                 f"one point per run — {len(wide)} LoRA runs, {seeds_label(frame, by='setting')} per setting")
    return fig


def _tangent_vs_normal(effects: pd.DataFrame) -> dict:
    """Per setting: median tangent and normal λ₁, each as a geometric-mean ratio to LoRA's with the
    same seed, and that ratio's Holm-adjusted p."""
    sel = effects[effects["space"].isin(("tangent", "normal"))]
    return {setting: {f"{r.space}{suffix}": getattr(r, col) for r in g.itertuples()
                      for suffix, col in (("", "median_lambda_max"), ("_ratio_to_lora", "ratio"), ("_p_holm", "p_holm"))}
            for setting, g in sel.groupby("setting", sort=False)}


def _threshold_rule() -> str:
    sources: dict[str, list[str]] = {}
    for sp, src in THRESHOLD_SPACE.items():
        sources.setdefault(src, []).append(sp)
    return f"{THRESHOLD_FRACTION:g} × plain LoRA's median λ₁ " + " and ".join(
        f"in {src} (for {', '.join(sps)})" for src, sps in sources.items())


def _ratio_cells(effects: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """setting × space of "ratio [low, high] (below / pairs, Holm p)" strings from :func:`own_space_effects`."""
    cells = ["—" if np.isnan(r.ratio) else f"{r.ratio:.3g} [{r.low:.3g}, {r.high:.3g}] ({r.below_lora}/{r.pairs}, "
             f"p = {r.p_holm:.2g})" for r in effects.itertuples()]
    wide = effects.assign(cell=cells).pivot(index="setting", columns="space", values="cell")
    return wide.reindex(index=order, columns=[s for s in SPACES if s in wide.columns])


def _fmt(x: float) -> str:
    return f"{x:.3g}"


ALPHA = 0.05  # family-wise error rate of the Holm-adjusted comparisons


def findings(corr: pd.DataFrame, mismatch: dict[str, list[str]], effects: pd.DataFrame, table: pd.DataFrame,
             contrast: Optional[pd.DataFrame] = None) -> list[str]:
    """The report's numbers in sentences (markdown bullets), made from the tables so that prose which
    quotes them cannot drift: the headline correlation and its range within methods, the runs flat in
    one space and sharp in the other, every setting × space whose λ₁ differs from LoRA's at Holm-adjusted
    p < :data:`ALPHA`, the claim's direct test (``contrast``, :func:`direct_test`), full fine-tuning's
    merged λ₁ and the accuracy range."""
    contrast = contrast if contrast is not None else pd.DataFrame()
    main = corr[(corr["x"] == "lora-balanced") & (corr["y"] == "merged")]
    pooled, within = main[main["scope"] == "all"].iloc[0], main[main["scope"] != "all"].dropna(subset=["low"])
    n_lora = int(pooled["n"])
    lines = [f"- Balanced-LoRA λ₁ against merged λ₁ across the {n_lora} LoRA runs: Spearman ρ = {_fmt(pooled['rho'])} "
             f"[{_fmt(pooled['low'])}, {_fmt(pooled['high'])}], p = {pooled['p']:.2g}."]
    if len(within):
        lo, hi = within.loc[within["rho"].idxmin()], within.loc[within["rho"].idxmax()]
        lines.append(f"- Within one method (with an interval): ρ from {_fmt(lo['rho'])} ({lo['scope']}, n = {int(lo['n'])}) "
                     f"to {_fmt(hi['rho'])} ({hi['scope']}, n = {int(hi['n'])}).")
    for label, runs in mismatch.items():
        lines.append(f"- Runs {label}: {len(runs)} of {n_lora}" + (f" ({', '.join(runs)})." if runs else "."))
    lora = effects[effects["setting"] == "lora"].set_index("space")["median_lambda_max"]
    for sp in SPACES:
        sig = effects[(effects["space"] == sp) & (effects["p_holm"] < ALPHA)]
        cells = [f"{r.setting} {_fmt(r.ratio)}× [{_fmt(r.low)}, {_fmt(r.high)}] (p = {r.p_holm:.2g})" for r in sig.itertuples()]
        base = f" (LoRA's median {_fmt(lora[sp])})" if sp in lora else ""
        lines.append(f"- λ₁ in the {sp} space{base} differs from LoRA's at Holm-adjusted p < {ALPHA:g} for "
                     + (f"{len(cells)} setting(s): " + "; ".join(cells) + "." if cells else "no setting."))
    if len(contrast):
        suffix = f" ÷ {DIRECT_TEST[1]}'s"
        cells = [f"{r.effect.removesuffix(suffix)} {_fmt(r.difference)}× [{_fmt(r.low)}, {_fmt(r.high)}] "
                 f"(Holm p = {r.p_holm:.2g})" for r in contrast.itertuples()]
        lines.append(f"- The claim's direct test, {contrast['method'].iloc[0]} ÷ {DIRECT_TEST[1]} with the same seed "
                     f"({int(contrast['pairs'].iloc[0])} pairs): " + "; ".join(cells) + ".")
    full = table[(table["method"] == "full-ft") & (table["space"] == "merged")]["lambda_max"]
    if len(full):
        lines.append(f"- Full fine-tuning's merged λ₁: median {_fmt(full.median())} over {len(full)} seeds.")
    acc = table.groupby("setting")["accuracy"].mean()
    lines.append(f"- Test accuracy, mean per setting: {acc.min():.3f} ({acc.idxmin()}) to {acc.max():.3f} ({acc.idxmax()}).")
    return lines


def accuracy_statistics(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(a) Test accuracy of each setting against LoRA with the same seed (paired t, Holm over the
    settings: :func:`~landscape.study.report.paired_differences`); (b) Spearman's ρ of λ₁ against test
    accuracy within each setting and space — never pooled over methods (Holm over every cell:
    :func:`~landscape.study.report.within_group_spearman`)."""
    return (paired_differences(table.drop_duplicates("run"), "accuracy"),
            within_group_spearman(table, "lambda_max", "accuracy", by=("setting", "space")))


def accuracy_findings(accuracy: pd.DataFrame, within: pd.DataFrame) -> list[str]:
    """Sentences (markdown bullets) from :func:`accuracy_statistics`' two tables."""
    sig = accuracy[accuracy["p_holm"] < ALPHA]
    big = accuracy.loc[accuracy["difference"].abs().idxmax()]
    lines = [f"- Test accuracy against LoRA with the same seed ({int(big['pairs'])} pairs, Holm over {len(accuracy)} "
             f"settings): {len(sig)} setting(s) differ at Holm-adjusted p < {ALPHA:g}"
             + (": " + "; ".join(f"{r.setting} {r.difference:+.4f} [{r.low:+.4f}, {r.high:+.4f}] (p = {r.p_holm:.2g})"
                                 for r in sig.itertuples()) + "." if len(sig) else
                f"; the largest mean difference is {big['setting']} {big['difference']:+.4f} "
                f"[{big['low']:+.4f}, {big['high']:+.4f}] (p = {big['p_holm']:.2g}).")]
    done = within.dropna(subset=["rho"])
    sig = done[done["p_holm"] < ALPHA]
    lines.append(f"- λ₁ against test accuracy within one setting and space (Spearman, Holm over {len(done)} cells): "
                 f"ρ from {done['rho'].min():.2f} to {done['rho'].max():.2f}; {len(sig)} cell(s) at Holm-adjusted "
                 f"p < {ALPHA:g}" + (": " + "; ".join(f"{r.setting} in {r.space} ρ = {r.rho:.2f} (p = {r.p_holm:.2g})"
                                                     for r in sig.itertuples()) + "." if len(sig) else "."))
    return lines


def _stage_sections(results: Path, table: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(findings, report sections) of the probe and robustness stages, from their tables in ``results``
    (:func:`landscape.study.exact_probes.report_sections`)."""
    from .exact_probes import report_sections  # it builds on this module

    return report_sections(results, table)


def write_report(table: pd.DataFrame, results: Path, figures: Path, command: str, *, seed: int = 0) -> dict:
    """summary.json, summary.md and the figure from the tidy table; returns the summary."""
    results, figures = Path(results), Path(figures)
    if (table["space"] == "lora-balanced").sum() < MIN_RUNS:
        raise ExactStudyError(f"the report correlates spaces across LoRA runs: it needs at least {MIN_RUNS} "
                              "(train more seeds)")
    corr, mismatch = correlations(table, seed=seed), mismatched_runs(table)
    effects, contrast = one_family(own_space_effects(table), direct_test(table))
    family = f"one family of {int(effects['p'].notna().sum() + contrast['p'].notna().sum())} comparisons"
    main = corr[(corr["x"] == "lora-balanced") & (corr["y"] == "merged") & (corr["scope"] == "all")].iloc[0]
    thresholds = table.groupby("space")["threshold"].first()
    summary = {"task": TASK, "command": command, "runs": int(table["run"].nunique()),
               "seeds_per_setting": table.groupby("setting")["seed"].nunique().to_dict(),
               "thresholds": {sp: float(t) for sp, t in thresholds.items()},
               "threshold_rule": _threshold_rule(),
               "spearman_lora_balanced_vs_merged": main.drop(["x", "y", "scope"]).to_dict(),
               "spearman": corr.to_dict(orient="records"), "mismatched_runs": mismatch,
               "tangent_vs_normal": _tangent_vs_normal(effects), "direct_test": contrast.to_dict(orient="records"),
               "max_symmetry_error": float(table["symmetry_error"].max()),
               "hessian_seconds_per_run": float(table.groupby("run")["hessian_seconds"].sum().median()),
               "train_seconds_per_run": float(table.groupby("run")["train_seconds"].first().median())}
    accuracy, within = accuracy_statistics(table)
    summary.update(accuracy_against_lora=accuracy.to_dict(orient="records"),
                   sharpness_accuracy_within_setting=within.to_dict(orient="records"))
    made = save_figure(fig_lora_vs_merged(table), figures / FIGURE)
    probe_findings, probe_section = _stage_sections(results, table)
    made += sorted(figures.glob(f"{TASK}-*.png")) if probe_section else []
    per_setting = table.pivot_table(index="setting", columns="space", values="lambda_max", aggfunc="median",
                                    sort=False).reindex(columns=[s for s in SPACES if s in set(table["space"])])
    per_setting = per_setting.join(table.groupby("setting", sort=False)[["accuracy", "train_loss"]].mean())
    per_setting.insert(0, "seeds", table.groupby("setting", sort=False)["seed"].nunique())
    counts = table.pivot_table(index="setting", columns="space", values="n_above", aggfunc="median", sort=False)
    lines = [
        f"# {TASK}: exact Hessian spectra in five spaces", "", f"Made by `{command}` from `spectra.csv`.", "",
        f"{summary['runs']} runs. Hessian of the training loss (all {TASK} train examples, float64, dense, "
        f"eigvalsh); largest asymmetry before symmetrizing {summary['max_symmetry_error']:.1e}.", "",
        "## The claim: Spearman's ρ of λ₁ between spaces (BCa bootstrap 95 % interval, seeded)", "",
        markdown_table(corr, floatfmt=".3g"), "",
        f"Balanced LoRA space vs merged space, all LoRA runs: ρ = {_fmt(main['rho'])} "
        f"[{_fmt(main['low'])}, {_fmt(main['high'])}], n = {int(main['n'])}.", "",
        "## Findings (sentences made from the tables below)", "", *findings(corr, mismatch, effects, table, contrast),
        *accuracy_findings(accuracy, within), *probe_findings, "",
        "## Runs flat in one space and sharp in the other", "",
        "(λ₁ below the median in one space, in the top quartile in the other, among the LoRA runs)", "",
        *[f"- {k}: {', '.join(v) if v else 'none'}" for k, v in mismatch.items()], "",
        "## λ₁ per setting (median over seeds), test accuracy and final train loss (mean)", "",
        markdown_table(per_setting.reset_index(), floatfmt=".3g"), "",
        "## Each setting against plain LoRA with the same seed", "",
        "Geometric mean over seeds of λ₁ / LoRA's λ₁ with the same seed, its 95 % t interval (seeds below "
        "LoRA / pairs, paired t-test of log λ₁, p Holm-adjusted over every cell of this table"
        + (" and the direct test's below, " + family if len(contrast) else "") + ").",
        "", markdown_table(_ratio_cells(effects, order=list(per_setting.index)).reset_index()), "",
        *(claim_contrast_lines(contrast, DIRECT_TEST, heading="##", note=f" p_holm: Holm over the table above and this "
                               f"one, {family}.") if len(contrast) else []),
        "## Eigenvalues above τ (median over seeds)", "",
        "τ per space: " + ", ".join(f"{sp} {_fmt(t)}" for sp, t in thresholds.items())
        + f" ({summary['threshold_rule']}).", "",
        markdown_table(counts.reset_index(), floatfmt=".0f"), "",
        f"Median seconds per run: training {summary['train_seconds_per_run']:.1f}, "
        f"spectra {summary['hessian_seconds_per_run']:.1f}.", "",
        "## Test accuracy against LoRA with the same seed", "",
        "Mean difference over seeds, its 95 % t interval, the paired t-test's p and p Holm-adjusted over every "
        "setting.", "", markdown_table(accuracy, floatfmt=".3g"), "",
        "## λ₁ against test accuracy within each setting (Spearman over seeds, Holm over every cell)", "",
        markdown_table(within.pivot(index="setting", columns="space", values="rho").reindex(
            index=list(per_setting.index), columns=[s for s in SPACES if s in set(within["space"])]).reset_index(),
            floatfmt=".2f"), "",
        *probe_section,
        *[f"![{p.stem}]({Path(os.path.relpath(p.resolve(), results.resolve())).as_posix()})" for p in made
          if p.suffix == ".png"],
    ]
    atomic_write_text(results / "summary.md", "\n".join(lines) + "\n")
    atomic_write_json(results / "summary.json", summary)
    return summary


def run_exact_study(out: Path, results: Path, figures: Path, *, settings: Sequence[Setting], seeds: Sequence[int],
                    steps: int = STEPS, stages: Sequence[str] = STAGES, progress: bool = True,
                    command: str = "") -> None:
    """The stages in order (see the module docstring); each skips what is already done."""
    results = Path(results)
    if "train" in stages:
        train_runs(out, settings, seeds, steps, progress=progress)
    if "spectra" in stages:
        found = spectra_parts(out, settings, seeds, progress=progress)
        if not found:
            raise ExactStudyError(f"no finished run under {Path(out) / TASK}: run the train stage first")
        atomic_write_text(results / "spectra.csv", spectra_table(found).to_csv(index=False))
    if "probe" in stages:
        from .exact_probes import probe_strongest  # it builds on this module

        probe_strongest(out, results, figures, seeds, progress=progress)
    if "robust" in stages:
        from .exact_probes import robustness_stage  # it builds on this module

        robustness_stage(out, results, figures, settings, seeds, progress=progress)
    if "report" in stages:
        if not (results / "spectra.csv").exists():
            raise ExactStudyError(f"{results / 'spectra.csv'} does not exist: run the spectra stage first")
        write_report(pd.read_csv(results / "spectra.csv"), results, figures, command)
