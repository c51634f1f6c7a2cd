"""The stages of the flatness-mismatch study, and probing of trained runs, as library functions that
the scripts in ``analysis_scripts/`` call.

* :func:`probe_runs` — the probe suite on run folders written by :func:`flatlora.run`, resumable:
  each run's tables are a part (:class:`landscape.results.PartFiles`) keyed by the run's resolved
  path and fingerprinted by the run's files (config, metrics, weights) and every probe setting, so
  a part is reused only for the same run, trained the same way, probed the same way;
* :func:`task_figures` — every figure that a task's result tables allow;
* :func:`run_study` — train → probe → robustness → report, each stage resumable.

Under ``torchrun`` every rank calls these alike: training is data-parallel, each probe's work is
split over the ranks, the robustness runs are split across them; rank 0 writes the shared files.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from flatlora import TrainConfig, distributed, get_task, load_run, run
from flatlora.io import atomic_write_json, atomic_write_text, read_json
from flatlora.training import RunExistsError

from ..curves import loss_plane
from ..loss import Loss
from ..plot import save_figure
from ..results import PartFiles, file_digest
from .error_analysis import compare_predictions
from .figures import (fig_eigenvalues, fig_expected_loss, fig_lines, fig_planes, fig_robustness,
                      fig_sharpness_vs_accuracy)
from .report import accuracy_section, collect_metrics, markdown_table, robustness_section, sharpness_section
from .robustness import corruption_accuracy
from .suite import ProbeSettings, probe_model

__all__ = ["probe_runs", "run_fingerprint", "manifest", "task_figures", "run_study", "DEFAULT_METHODS", "STAGES"]

DEFAULT_METHODS = ("full-ft", "lora", "flat-lora", "sam-lora", "sam-full")
STAGES = ("train", "probe", "robust", "report")


def say(message: str) -> None:
    """Print once (rank 0 under torchrun)."""
    if distributed.is_main():
        print(message, flush=True)


def run_fingerprint(run_path: Path) -> dict:
    """Content hashes of what a finished run holds: its settings, metrics and trained weights."""
    weights = run_path / "adapter" if (run_path / "adapter").exists() else run_path / "model"
    return {name: file_digest(path) for name, path in
            (("config", run_path / "config.json"), ("metrics", run_path / "metrics.json"), ("weights", weights))}


def _part_key(run_path: Path) -> str:
    resolved = str(run_path.resolve())
    return f"{run_path.name}-{hashlib.sha1(resolved.encode()).hexdigest()[:12]}"


def _relative(path: Path, to: Path) -> str:
    """``path`` relative to the folder ``to`` (results meant to be committed carry no machine's paths)."""
    return Path(os.path.relpath(path.resolve(), to.resolve())).as_posix()


def probe_runs(runs: Sequence[str | os.PathLike], out: Path, settings: ProbeSettings, split: str, examples: int,
               batch_size: int, progress: bool = False, parts: Optional[Path] = None
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Probe each run, resuming from ``parts`` (default ``OUT.parts/``), then write ``out`` (measures)
    and ``OUT-curves.csv`` atomically; return both frames. Rows are tagged with the task, method,
    seed and the run's path relative to ``out``'s folder.

    A part is reused only when the run's files and every setting (the suite's, the split, the
    number of examples, the batch size) are those it was made with; otherwise the run is probed
    again and its part replaced."""
    out = Path(out)
    parts = PartFiles(parts or out.with_name(out.name + ".parts"), names=("measures", "curves"))
    measures, curves = [], []
    for run_path in map(Path, runs):
        fingerprint = {"run": str(run_path.resolve()), "files": run_fingerprint(run_path),
                       "settings": settings.as_dict(), "split": split, "examples": examples, "batch_size": batch_size}

        def compute(run_path=run_path) -> dict[str, pd.DataFrame]:
            model, task, cfg = load_run(run_path)
            loss = Loss(task.batches(split, batch_size, limit=examples))
            ranks = distributed.world_size()
            say(f"[probe] {run_path} ({cfg['method']}, seed {cfg['seed']}) on {loss.total} {split} examples"
                f"{f' on {ranks} processes' if ranks > 1 else ''}")
            m, c = probe_model(model, loss, settings, lora_targets=task.lora_targets,
                               progress=progress and distributed.is_main())
            tags = {"task": cfg["task"], "method": cfg["method"], "seed": cfg["seed"]}
            return {"measures": m.assign(**tags), "curves": c.assign(**tags)}

        tables = parts.get(_part_key(run_path), fingerprint, compute)
        rel = _relative(run_path, out.parent)
        measures.append(tables["measures"].assign(run=rel))
        curves.append(tables["curves"].assign(run=rel))
    m_all, c_all = pd.concat(measures, ignore_index=True), pd.concat(curves, ignore_index=True)
    if distributed.is_main():
        atomic_write_text(out, m_all.to_csv(index=False))
        atomic_write_text(out.with_name(out.stem + "-curves.csv"), c_all.to_csv(index=False))
    distributed.barrier()
    return m_all, c_all


def manifest(settings: ProbeSettings, runs, out: Path, split: str, examples: int, batch_size: int) -> dict:
    """What made a probe table: settings, runs (relative to the table's folder), versions, command."""
    import peft
    import torch
    import transformers

    return {"settings": settings.as_dict(), "runs": [_relative(Path(r), Path(out).parent) for r in runs],
            "split": split, "examples": examples, "batch_size": batch_size,
            "versions": {"torch": torch.__version__, "peft": peft.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "world_size": distributed.world_size(), "command": " ".join(sys.argv)}


def task_figures(task_dir: Path, figures: Path) -> list[Path]:
    """Every figure the tables in ``task_dir`` (metrics, probes, probes-curves, planes, robustness
    CSVs) allow, as PNG and PDF under ``figures``; returns their paths."""
    task = task_dir.name
    read = lambda name: pd.read_csv(task_dir / name) if (task_dir / name).exists() else None  # noqa: E731
    metrics, probes, curves = read("metrics.csv"), read("probes.csv"), read("probes-curves.csv")
    planes, robust = read("planes.csv"), read("robustness.csv")
    made = []
    if curves is not None:
        made += save_figure(fig_lines(curves, task=task), figures / f"{task}-lines")
    if planes is not None:
        for fig, method in zip(fig_planes(planes, task=task), ("lora", "flat-lora")):
            made += save_figure(fig, figures / f"{task}-plane-{method}")
    if probes is not None:
        made += save_figure(fig_expected_loss(probes, task=task), figures / f"{task}-expected-loss")
        made += save_figure(fig_eigenvalues(probes, task=task), figures / f"{task}-eigenvalues")
        if metrics is not None:
            made += save_figure(fig_sharpness_vs_accuracy(probes, metrics, task=task),
                                figures / f"{task}-sharpness-vs-accuracy")
    if robust is not None:
        made += save_figure(fig_robustness(robust, task=task), figures / f"{task}-robustness")
    return made


# ------------------------------------------------------------------------------------ the study
def run_dir(out: Path, task: str, method: str, seed: int) -> Path:
    return out / task / f"{method}-s{seed}"


def train_all(out: Path, tasks, methods, seeds, steps: dict, progress: bool) -> None:
    for task in tasks:  # method-major: every seed of the first methods before the next method
        for method in methods:
            for seed in seeds:
                d = run_dir(out, task, method, seed)
                if distributed.broadcast_object((d / "metrics.json").exists()):
                    continue
                say(f"[study] train {task} {method} seed {seed} ({steps[task]} steps) → {d}")
                try:
                    run(TrainConfig(task=task, method=method, seed=seed, steps=steps[task]), d, progress=progress)
                except RunExistsError as e:
                    say(f"[study] {e}")


def finished_runs(out: Path, task: str, methods, seeds) -> list[Path]:
    return [d for s in seeds for m in methods if ((d := run_dir(out, task, m, s)) / "metrics.json").exists()]


def probe_all(out: Path, results: Path, task: str, runs: list[Path], settings: ProbeSettings, split: str,
              examples: int, batch_size: int) -> None:
    """The probe suite on every run, and loss planes (merged space) of LoRA and Flat-LoRA, seed 0."""
    res = results / task
    res.mkdir(parents=True, exist_ok=True)
    probe_runs(runs, res / "probes.csv", settings, split, examples, batch_size, parts=out / task / "probe-parts")
    if distributed.is_main():
        atomic_write_json(res / "probes-manifest.json", manifest(settings, runs, res / "probes.csv", split, examples,
                                                                 batch_size))
    planes = []
    for method in ("lora", "flat-lora"):
        d = run_dir(out, task, method, 0)
        if not (d / "metrics.json").exists():
            continue
        model, t, _ = load_run(d)
        loss = Loss(t.batches(split, batch_size, limit=examples))
        frame = loss_plane(model, loss, space="merged", grid=11, span=1.0, seed=0,
                           results_path=out / task / f"plane-{method}.json", progress=False)
        planes.append(frame.assign(task=task, method=method, seed=0))
    if planes and distributed.is_main():
        atomic_write_text(res / "planes.csv", pd.concat(planes, ignore_index=True).to_csv(index=False))


def robust_all(out: Path, results: Path, task: str, runs: list[Path], limit: int) -> None:
    """Accuracy under corruptions, one part per run (under torchrun: the runs split across ranks)."""
    parts = PartFiles(out / task / "robust-parts", names=("robustness",))
    for d in distributed.shard(runs):
        def compute(d=d) -> dict[str, pd.DataFrame]:
            model, t, cfg = load_run(d)
            print(f"[study] corruptions on {d}", flush=True)
            frame = corruption_accuracy(model, t, limit=limit)
            return {"robustness": frame.assign(task=task, method=cfg["method"], seed=cfg["seed"])}

        parts.get(_part_key(d), {"files": run_fingerprint(d), "limit": limit}, compute, collective=False)
    distributed.barrier()
    if distributed.is_main():
        frames = [parts.read(_part_key(d))["robustness"] for d in runs]
        atomic_write_text(results / task / "robustness.csv", pd.concat(frames, ignore_index=True).to_csv(index=False))
    distributed.barrier()


def error_section(out: Path, task: str, seeds) -> str:
    """LoRA vs Flat-LoRA on the same test examples, per seed (the pairs share the data order)."""
    t = get_task(task)
    labels = [e["label"] for e in t.splits["test"]]
    rows, shown = [], None
    for s in seeds:
        a, b = run_dir(out, task, "lora", s), run_dir(out, task, "flat-lora", s)
        if not ((a / "predictions.json").exists() and (b / "predictions.json").exists()):
            continue
        counts, table = compare_predictions(labels, read_json(a / "predictions.json")["predictions"],
                                            read_json(b / "predictions.json")["predictions"], names=("lora", "flat-lora"),
                                            texts=t.texts.get("test"), label_names=t.label_names)
        rows.append({"seed": s, **counts})
        shown = table if shown is None else shown
    if not rows:
        return "(no paired runs)"
    lines = [markdown_table(pd.DataFrame(rows)), ""]
    if shown is not None and len(shown):
        lines += ["Examples (first seed):", ""]
        lines += [f"- *{r.kind}* — label **{r.label}**: \"{str(r.text)[:160]}\"" for r in shown.itertuples()]
    return "\n".join(lines)


def report(out: Path, results: Path, figures: Path, tasks, methods, seeds, command: str) -> Path:
    """Metrics tables, figures and ``results/report.md`` from what the earlier stages wrote."""
    sections = ["# Flatness-mismatch study", "", f"Made by `{command}`.", ""]
    for task in tasks:
        runs = finished_runs(out, task, methods, seeds)
        if not runs:
            continue
        res = results / task
        metrics = collect_metrics(runs)
        atomic_write_text(res / "metrics.csv", metrics.drop(columns="run").to_csv(index=False))
        made = task_figures(res, figures)
        sections += [f"## {task}", "", "### Accuracy", "", accuracy_section(metrics), ""]
        if (res / "probes.csv").exists():
            sections += ["### Sharpness per space (mean ± std over seeds)", "",
                         sharpness_section(pd.read_csv(res / "probes.csv")), ""]
        if (res / "robustness.csv").exists():
            sections += ["### Robustness to messy input", "", robustness_section(pd.read_csv(res / "robustness.csv")), ""]
        sections += ["### Error analysis: LoRA vs Flat-LoRA", "", error_section(out, task, seeds), ""]
        pngs = [f"![{p.stem}]({_relative(p, results)})" for p in made if p.suffix == ".png"]
        sections += (["### Figures", ""] + pngs + [""]) if pngs else []
    path = results / "report.md"
    atomic_write_text(path, "\n".join(sections))
    return path


def run_study(out: Path, results: Path, figures: Path, *, tasks: Sequence[str], methods: Sequence[str],
              seeds: Sequence[int], steps: dict, stages: Sequence[str], settings: ProbeSettings, split: str,
              examples: int, batch_size: int, robust_examples: int, progress: bool, command: str) -> None:
    """The stages in order (each skips what is already done): ``train`` every task × method × seed
    into OUT/TASK/METHOD-sSEED/, ``probe`` them (results/TASK/probes.csv, planes.csv), ``robust``
    (results/TASK/robustness.csv), ``report`` (figures and results/report.md)."""
    out, results = Path(out), Path(results)
    if "train" in stages:
        train_all(out, tasks, methods, seeds, steps, progress=progress)
    for task in tasks:
        runs = finished_runs(out, task, methods, seeds)
        if "probe" in stages and runs:
            probe_all(out, results, task, runs, settings, split, examples, batch_size)
        if "robust" in stages and runs and get_task(task).encode is not None:
            robust_all(out, results, task, runs, robust_examples)
    if "report" in stages and distributed.is_main():
        say(f"[study] report: {report(out, results, Path(figures), tasks, methods, seeds, command)}")
