"""Each method shown to work in its own space before the comparison (issue 14.2), on MiniLM with the
reference recipe's LoRA on every linear layer (14.3): the sweep that chooses the long runs' settings.

Every setting of :data:`landscape.study.exact.SETTINGS` but full fine-tuning — LoRA; Flat-LoRA σ
0.05 / 0.1 / 0.2 with the cosine and the constant schedule; SAM on A, B ρ 0.003 / 0.01 / 0.03 / 0.1;
SAM on W ρ 0.01 / 0.05 / 0.1 — × seeds is trained on a text task (``lora_targets="all-linear"``,
:data:`flatlora.tasks.text.ALL_LINEAR`) at a short length and one learning rate in the reference
range (Li et al. use 1e-4 – 5e-4). For each run:

* validation accuracy (the selection criterion; test accuracy is recorded, not used);
* λ₁ of the loss on the first ``examples`` validation examples, by Lanczos, in the method's **own
  space** — the LoRA space in the balanced gauge for LoRA, Flat-LoRA and SAM on A, B; the merged
  space for SAM on W — and in the merged space for every run.

Each run is a committed **unit** (:func:`measured_row`): RESULTS/units/SETTING-sSEED/ holds the run's
portable files (settings, metrics, predictions, peft adapter: about 1.4 MB) and ``sweep-row.json``,
its row keyed by the content hashes of those files and the probe settings. The report is built from
the units alone, so that a new machine continues the sweep where the last one stopped; a unit is
measured again when its files or the probe settings change.

:func:`summarize` gives, per setting, the medians over seeds and the ratio of own-space λ₁ to plain
LoRA's in the same space with the same seed; :func:`choose` picks, per method, the setting with the
best validation accuracy and the setting that flattens its own space most — the comparison uses both,
so that "flat in the LoRA space" has instances that are flat there. With several seeds,
:func:`paired_effects` tests each setting against LoRA, paired by seed (issue 14.7), and
:func:`within_setting_correlations` correlates λ₁ with test accuracy within each setting.
"""
from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from flatlora import load_run
from flatlora.io import atomic_write_json, atomic_write_text, read_json

from ..hessian import hessian_eigenvalues
from ..loss import Loss
from ..plot import new_figure, save_figure
from .exact import SETTINGS, ExactStudyError, Setting, run_path, train_runs
from .figures import method_color, plain_log_axes
from .noise_check import noise_gradient_effect
from .pipeline import publish_run, run_fingerprint
from .report import (EXACT_SPEARMAN_MAX_N, MIN_RUNS, effects_display, markdown_table, paired_effects_table,
                     paired_log_ratio, spearman_interval, spearman_phrase, within_group_spearman)
from .suite import BALANCED, probe_spaces

__all__ = ["SWEEP_SETTINGS", "own_space", "train_sweep", "noise_check", "measured_row", "sweep_table", "summarize", "choose", "paired_effects", "within_setting_correlations",
           "fig_sweep", "write_sweep_report", "TASK", "STEPS", "LR", "EXAMPLES"]

TASK = "rt-minilm"
STEPS = 300  # a short length, to choose settings; the long runs train ≥ 2 epochs
LR = 5e-4  # the top of the reference range (1e-4 – 5e-4): the most change in a short run
EXAMPLES = 128  # validation examples of each λ₁ (issue 14.4: 32 varied more between slices than between seeds)
EIG_TOL = 1e-2
SWEEP_SETTINGS = tuple(s for s in SETTINGS if s.method != "full-ft")


def own_space(method: str) -> str:
    """The space a method flattens by design: merged for SAM on W, the balanced LoRA space otherwise."""
    return "merged" if method == "sam-full" else BALANCED


ALL_LINEAR_OPTIONS = {"lora_targets": "all-linear"}


def train_sweep(out: Path, settings: Sequence[Setting] = SWEEP_SETTINGS, seeds: Sequence[int] = (0,), *,
                task: str = TASK, steps: int = STEPS, lr: float = LR, task_options: Optional[dict] = None,
                progress: bool = True) -> None:
    """Train every setting × seed at ``lr`` with the task's ``task_options`` (default: LoRA on every
    linear layer), resumable (:func:`landscape.study.exact.train_runs`)."""
    options = ALL_LINEAR_OPTIONS if task_options is None else task_options
    train_runs(out, settings, seeds, steps, progress=progress, task=task, lr=lr, task_options=options)


NOISE_BATCHES = 8


def noise_check(out: Path, results: Path, command: str, *, seed: int = 0, task: str = TASK) -> pd.DataFrame:
    """:func:`~landscape.study.noise_check.noise_gradient_effect` at every swept σ on the finished plain-LoRA
    run of ``seed``, on its first :data:`NOISE_BATCHES` training mini-batches → RESULTS/noise_check.csv,
    and noise_check.json naming the command, the run and the content hashes of its files."""
    from flatlora.training import micro_batches

    run = run_path(out, Setting("lora"), seed, task)
    if not (run / "metrics.json").exists():
        raise FileNotFoundError(f"the noise check runs on the finished plain-LoRA run {run}: train it first")
    model, task_, cfg = load_run(run)
    batch_at = micro_batches(task_, cfg["batch_size"], seed=seed)
    sigmas = sorted({s.sigma for s in SWEEP_SETTINGS if s.sigma is not None})
    rows = noise_gradient_effect(model, [batch_at(k) for k in range(NOISE_BATCHES)], sigmas, loss_fn=task_.loss)
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results / "noise_check.csv", rows.to_csv(index=False))
    atomic_write_json(results / "noise_check.json", {"command": command, "run": run.name,
                                                     "run_files": run_fingerprint(run), "batches": NOISE_BATCHES,
                                                     "batch_size": cfg["batch_size"], "sigmas": sigmas})
    return rows


def _lambda_max(run: Path, examples: int, batch_size: int, tol: float) -> dict[str, float]:
    """λ₁ of the run's loss on its first ``examples`` validation examples, in the balanced LoRA and the
    merged space (Lanczos, :func:`~landscape.hessian.hessian_eigenvalues`)."""
    model, task, _ = load_run(run)
    loss = Loss(task.batches("validation", batch_size, limit=examples))
    return {name: float(hessian_eigenvalues(probed, loss, sp, k=1, tol=tol, seed=0, progress=False).eigenvalues[0])
            for name, (probed, sp) in probe_spaces(model, (BALANCED, "merged"), task.lora_targets).items()}


UNIT_ROW = "sweep-row.json"


def measured_row(out: Path, units: Path, setting: Setting, seed: int, probe: dict, task: str = TASK
                 ) -> Optional[dict]:
    """The sweep's row of one run, from its committed unit UNITS/SETTING-sSEED/ when that holds a row
    measured on the same run files (:func:`~landscape.study.pipeline.run_fingerprint`) with the same
    ``probe`` settings; otherwise measured again on the unit's copy of the run (a finished run in OUT
    that has no unit is first copied there, :func:`~landscape.study.pipeline.publish_run`) and
    ``sweep-row.json`` = {row, probe, files} written.

    None when there is neither a run nor a unit. A unit with a row but no run files (its run was not
    kept) is reused only with the same ``probe`` settings, and refused otherwise: nothing is left to
    measure again."""
    local = run_path(out, setting, seed, task)
    unit = Path(units) / local.name
    saved = read_json(unit / UNIT_ROW) if (unit / UNIT_ROW).exists() else None
    source = next((d for d in (unit, local) if (d / "metrics.json").exists()), None)
    if source is None:
        if saved is not None and saved["probe"] != probe:
            raise ExactStudyError(f"{unit / UNIT_ROW} holds λ₁ measured with {saved['probe']}, not {probe}, and its "
                                  f"run is not kept: pass those settings, or train {local} again")
        return None if saved is None else saved["row"]
    if source == local:
        publish_run(local, unit)
        source = unit
    files = run_fingerprint(source)
    if saved is not None and saved["probe"] == probe and saved["files"] == files:
        return saved["row"]
    lam = _lambda_max(source, probe["examples"], probe["batch_size"], probe["tol"])
    metrics = read_json(source / "metrics.json")
    row = {"setting": setting.name, "method": setting.method, "seed": seed,
           "val_accuracy": metrics["validation"]["accuracy"], "test_accuracy": metrics["accuracy"],
           "wall_time_s": metrics["wall_time_s"], "own_space": own_space(setting.method),
           "lambda_own": lam[own_space(setting.method)], **{f"lambda_{sp}": v for sp, v in lam.items()}}
    atomic_write_json(unit / UNIT_ROW, {"row": row, "probe": probe, "files": files})
    return row


def sweep_table(out: Path, settings: Sequence[Setting] = SWEEP_SETTINGS, seeds: Sequence[int] = (0,), *,
                units: Path, task: str = TASK, examples: int = EXAMPLES, batch_size: int = 32,
                tol: float = EIG_TOL) -> pd.DataFrame:
    """One row per run that OUT or the committed UNITS holds (:func:`measured_row`): setting, method,
    seed, validation and test accuracy, wall time, and λ₁ in the balanced LoRA and merged spaces."""
    probe = {"split": "validation", "examples": examples, "batch_size": batch_size, "tol": tol}
    rows = [row for setting in settings for seed in seeds
            if (row := measured_row(out, units, setting, seed, probe, task)) is not None]
    return pd.DataFrame(rows)


SUMMARY_SPACES = (BALANCED, "merged")


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per setting: seeds, mean validation accuracy, median training wall time (minutes), its own
    space, and in each of :data:`SUMMARY_SPACES` the median λ₁ over seeds and ``ratio_SPACE``, the
    geometric mean over seeds of λ₁ / plain LoRA's λ₁ in that space with the same seed."""
    lora = table[table["method"] == "lora"].set_index("seed")
    rows = []
    for setting, g in table.groupby("setting", sort=False):
        g = g.set_index("seed")
        row = {"setting": setting, "method": g["method"].iloc[0], "seeds": len(g),
               "val_accuracy": g["val_accuracy"].mean(), "train_minutes": g["wall_time_s"].median() / 60,
               "own_space": g["own_space"].iloc[0]}
        for sp in SUMMARY_SPACES:
            x, base = g[f"lambda_{sp}"], lora[f"lambda_{sp}"].reindex(g.index).dropna()
            row[f"lambda_{sp}"] = x.median()
            row[f"ratio_{sp}"] = paired_log_ratio(x.loc[base.index], base)["ratio"]
        rows.append(row)
    return pd.DataFrame(rows)


def choose(summary: pd.DataFrame) -> pd.DataFrame:
    """Per method (plain LoRA aside): the setting with the best validation accuracy and the setting
    with the lowest λ₁ relative to LoRA's in its own space."""
    rows = []
    for method, g in summary[summary["method"] != "lora"].groupby("method", sort=False):
        own = pd.Series([r[f"ratio_{r['own_space']}"] for _, r in g.iterrows()], index=g.index)
        rows.append({"method": method, "best_validation": g.loc[g["val_accuracy"].idxmax(), "setting"],
                     "flattest_own_space": g.loc[own.idxmin(), "setting"] if own.notna().any() else "—"})
    return pd.DataFrame(rows)


EFFECTS = {"test_accuracy": "test accuracy − LoRA's", f"lambda_{BALANCED}": "balanced-LoRA λ₁ ÷ LoRA's",
           "lambda_merged": "merged λ₁ ÷ LoRA's", "gap": "(balanced-LoRA ÷ merged) ÷ LoRA's"}


def paired_effects(table: pd.DataFrame) -> pd.DataFrame:
    """Each setting against plain LoRA with the same seed (:func:`~landscape.study.report.paired_effects_table`),
    one row per setting × effect of :data:`EFFECTS`: the difference in test accuracy, and on the log
    scale (reported as ratios exp(d̄), with the Student-t interval) λ₁ in the balanced LoRA space, in
    the merged space, and the **gap** λ₁(balanced LoRA) ÷ λ₁(merged) — below 1 when a setting is
    flatter, against LoRA, in the LoRA space than in the merged space: the claim's pattern. p is
    Holm-adjusted within each effect over the settings shown: those with two seeds or more paired."""
    table = table.assign(gap=table[f"lambda_{BALANCED}"] / table["lambda_merged"])
    lora_seeds = set(table.loc[table["method"] == "lora", "seed"])
    pairs = table[table["seed"].isin(lora_seeds)].groupby("setting")["seed"].nunique()
    table = table[table["setting"].isin(pairs[pairs >= 2].index)]
    return paired_effects_table(table, EFFECTS, log=[c for c in EFFECTS if c != "test_accuracy"])


def within_setting_correlations(table: pd.DataFrame, min_n: int = 5) -> pd.DataFrame:
    """Spearman's ρ of λ₁ (balanced LoRA, merged) against test accuracy across the seeds of each
    setting with at least ``min_n`` seeds, never pooled over settings
    (:func:`~landscape.study.report.within_group_spearman`; Holm over every setting × space)."""
    long = pd.concat([table.assign(space=sp, lambda_max=table[f"lambda_{sp}"]) for sp in SUMMARY_SPACES])
    return within_group_spearman(long, "lambda_max", "test_accuracy", by=("setting", "space"), min_n=min_n,
                                 drop_small=True)


def _seeds_section(table: pd.DataFrame) -> list[str]:
    """The paired effects and the within-setting correlations, once some setting has two seeds."""
    effects = paired_effects(table)
    if effects.empty:
        return []
    shown = effects_display(effects, ["setting", "effect"])
    lines = ["", "## Against LoRA, paired by seed (settings with two seeds or more)", "",
             "Test accuracy as a difference, λ₁ as a ratio (geometric mean over seeds), each with its Student-t 95 % "
             "interval and paired t-test; p_holm is Holm-adjusted within each effect over the settings shown. The "
             "last effect is the claim's pattern: below 1, a setting is flatter, against LoRA, in the LoRA space "
             "than in the merged space.", "", markdown_table(shown, floatfmt=".3g")]
    within = within_setting_correlations(table)
    if len(within):
        lines += ["", "Spearman ρ of λ₁ against test accuracy across the seeds of each setting (within a setting; "
                      f"p exact over every pairing up to {EXACT_SPEARMAN_MAX_N} seeds; Holm over every setting × space):",
                  "", markdown_table(within, floatfmt=".3g")]
    return lines


def _claim_section(table: pd.DataFrame) -> list[str]:
    """Spearman's ρ of balanced-LoRA λ₁ against merged λ₁ across every run of the sweep, with its BCa
    bootstrap interval (:func:`~landscape.study.report.spearman_interval`), once there are
    :data:`~landscape.study.report.MIN_RUNS` runs."""
    if len(table) < MIN_RUNS:
        return []
    r = spearman_interval(table[f"lambda_{BALANCED}"], table["lambda_merged"])
    return ["", "## The claim across the sweep's runs", "",
            f"Balanced-LoRA λ₁ against merged λ₁ across the {r['n']} runs (every setting and seed): {spearman_phrase(r)}."]


def _noise_section(results: Path) -> list[str]:
    """The noise check's means per σ (RESULTS/noise_check.csv, from :func:`noise_check`), when there is one."""
    if not (results / "noise_check.csv").exists():
        return []
    made = read_json(results / "noise_check.json")
    means = pd.read_csv(results / "noise_check.csv").groupby("sigma")[
        ["noise_change", "noise_cosine", "batch_change", "batch_cosine"]].mean().reset_index()
    return ["", "## Does the noise do anything? (the noise check)", "",
            f"On `{made['run']}` (its content hashes in `noise_check.json`), over {made['batches']} training batches "
            f"of {made['batch_size']}: ‖g(W + ε) − g(W)‖ / ‖g(W)‖ for one draw of Flat-LoRA's noise at σ, against "
            f"‖g_next batch − g‖ / ‖g‖ (means; made by `{made['command']}`).", "",
            markdown_table(means, floatfmt=".3g")]


def seeds_phrase(table: pd.DataFrame) -> str:
    """How many settings ran at how many seeds, largest first: "4 settings × 5 seeds, 10 × 1 seed"."""
    counts = table.groupby("setting")["seed"].nunique().value_counts().sort_index(ascending=False)
    plural = lambda n, word: f"{word}s" if n > 1 else word  # noqa: E731
    return ", ".join(f"{n}{' ' + plural(n, 'setting') if i == 0 else ''} × {seeds} {plural(seeds, 'seed')}"
                     for i, (seeds, n) in enumerate(counts.items()))


def label_groups(runs: pd.DataFrame, within: float = 0.08) -> list[tuple[tuple[float, float], list[str]]]:
    """The scatter's labels without overlap: runs whose points lie within ``within`` decades of a
    group's first point on both log axes share one label at that point; each setting is named
    "METHOD REST" (plain "lora" for LoRA). Points are taken from the highest merged λ₁ down."""
    groups: list[tuple[tuple[float, float], list[str]]] = []
    for _, r in runs.sort_values(["lambda_merged", f"lambda_{BALANCED}"], ascending=False).iterrows():
        x, y = r[f"lambda_{BALANCED}"], r["lambda_merged"]
        name = r["setting"] if r["setting"] == r["method"] else f"{r['method']} {r['setting'].removeprefix(r['method'] + '-')}"
        near = [g for g in groups if max(abs(np.log10(x / g[0][0])), abs(np.log10(y / g[0][1]))) <= within]
        if near:
            near[0][1].append(name)
        else:
            groups.append(((x, y), [name]))
    return groups


def fig_sweep(table: pd.DataFrame, task: str):
    """Left: balanced-LoRA λ₁ against merged λ₁, one point per run of the sweep, coloured by method,
    on log axes (issue 14.6 for a MiniLM task); the first seed's points are labelled by a number
    keyed in the corner, nearby points under one number (:func:`label_groups`). Right, once some
    setting has two seeds or more (:func:`paired_effects`): per setting,
    λ₁ ÷ LoRA's with the same seed in the balanced LoRA space (circles) and the merged space
    (squares), geometric means with their 95 % intervals — a setting whose circle sits below its
    square is flatter, against LoRA, in the LoRA space than in the full one."""
    effects = paired_effects(table)
    fig, axes = new_figure(5.2, 4.4, panels=2 if len(effects) else 1)
    ax = axes[0]
    for method, g in table.groupby("method", sort=False):
        ax.scatter(g[f"lambda_{BALANCED}"], g["lambda_merged"], s=24, color=method_color(method), label=method)
    groups = label_groups(table[table["seed"] == table["seed"].min()])
    for i, ((x, y), _) in enumerate(groups, 1):
        ax.annotate(str(i), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    key = [textwrap.fill(f"{i}: {', '.join(names)}", 58, subsequent_indent="    ") for i, (_, names) in enumerate(groups, 1)]
    ax.text(0.98, 0.02, f"seed {table['seed'].min()}:\n" + "\n".join(key), transform=ax.transAxes, ha="right",
            va="bottom", multialignment="left", fontsize=5.5)
    ax.set(xlabel="λ₁, LoRA space (balanced gauge)", ylabel="λ₁, merged space",
           title=f"{task}: the settings sweep, one point per run\n{len(table)} runs: {seeds_phrase(table)}")
    plain_log_axes(ax)
    ax.legend(fontsize=7)
    if len(effects):
        _fig_paired_ratios(axes[1], effects, table)
    return fig


def _fig_paired_ratios(ax, effects: pd.DataFrame, table: pd.DataFrame) -> None:
    """:func:`fig_sweep`'s right panel: the paired λ₁ ratios of :func:`paired_effects` with their intervals."""
    methods = table.drop_duplicates("setting").set_index("setting")["method"]
    for effect, marker, dx in ((EFFECTS[f"lambda_{BALANCED}"], "o", -0.12),
                                (EFFECTS["lambda_merged"], "s", 0.12)):
        e = effects[effects["effect"] == effect].reset_index(drop=True)
        for i, r in e.iterrows():
            ax.errorbar(i + dx, r["difference"], yerr=[[r["difference"] - r["low"]], [r["high"] - r["difference"]]],
                        fmt=marker, color=method_color(methods[r["setting"]]), capsize=3,
                        mfc="white" if marker == "s" else None)
        ax.set_xticks(range(len(e)), [f"{s}\n({n} seeds)" for s, n in zip(e["setting"], e["pairs"])],
                      rotation=20, fontsize=7, ha="right")
    ax.axhline(1, color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set(ylabel="λ₁ ÷ LoRA's, same seed (geometric mean, 95 % CI)",
           title="each setting against LoRA, paired by seed")
    ax.legend(handles=[Line2D([], [], color="k", marker="o", ls="", label="balanced LoRA"),
                       Line2D([], [], color="k", marker="s", mfc="white", ls="", label="merged")],
              fontsize=7, title="space", title_fontsize=7)


def write_sweep_report(table: pd.DataFrame, results: Path, command: str, *, figures: Optional[Path] = None,
                       task: str = TASK) -> pd.DataFrame:
    """sweep.csv (the runs), summary.md (per setting, and the choice per method) in ``results``, and
    with ``figures`` FIGURES/TASK-sweep.{png,pdf} (:func:`fig_sweep`); returns the choice."""
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    made = save_figure(fig_sweep(table, task), Path(figures) / f"{task}-sweep") if figures is not None else []
    summary = summarize(table)
    chosen = choose(summary)
    atomic_write_text(results / "sweep.csv", table.to_csv(index=False))
    lines = [f"# The settings sweep: {len(table)} runs, {seeds_phrase(table)}", "",
             f"Made by `{command}` from `sweep.csv`.", "",
             "## Per setting (accuracy: mean; λ₁: median over seeds; ratio: geometric mean over seeds of λ₁ over "
             "LoRA's in the same space with the same seed)", "", markdown_table(summary, floatfmt=".3g"), "",
             "## The settings the comparison uses", "", markdown_table(chosen), *_seeds_section(table),
             *_claim_section(table),
             *_noise_section(results),
             *[f"\n![{p.stem}]({Path(os.path.relpath(p.resolve(), results.resolve())).as_posix()})" for p in made
               if p.suffix == ".png"]]
    atomic_write_text(results / "summary.md", "\n".join(lines) + "\n")
    return chosen
