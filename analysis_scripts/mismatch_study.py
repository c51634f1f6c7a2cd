#!/usr/bin/env python
"""The flatness-mismatch study: train every method × seed on each task, probe, make figures, report.

    .venv/bin/python analysis_scripts/mismatch_study.py --out runs/study            # everything
    .venv/bin/python analysis_scripts/mismatch_study.py --out runs/study --stage train

Stages (each resumable — finished runs and probe results are reused):

1. ``train``  — ``flatlora.run`` for each task × method × seed into OUT/TASK/METHOD-sSEED/;
2. ``probe``  — ``analysis_scripts/probe.py``'s suite on every run → OUT/TASK/probes.csv;
3. ``robust`` — accuracy under seeded text corruptions → OUT/TASK/robustness.csv;
4. ``report`` — figures into --figures and a markdown report OUT/report.md (accuracy and weighted F1
   mean ± std, Welch and paired t-tests of Flat-LoRA vs LoRA, sharpness per space and method, error
   analysis).

Under ``torchrun --nproc_per_node N`` the same command trains each run with DDP, splits each
probe's work and the robustness runs across the N processes; rank 0 writes the shared files.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd  # noqa: E402

from flatlora import TrainConfig, distributed, get_task, load_run, run  # noqa: E402
from flatlora.io import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from flatlora.training import RunExistsError  # noqa: E402
from landscape import Loss, loss_plane  # noqa: E402
from landscape.error_analysis import compare_predictions  # noqa: E402
from landscape.probe_suite import ProbeSettings  # noqa: E402
from landscape.robustness import corruption_accuracy  # noqa: E402
from landscape.study_report import (accuracy_section, collect_metrics, markdown_table, robustness_section,  # noqa: E402
                                    sharpness_section)
from make_figures import task_figures  # noqa: E402
from probe import add_probe_arguments, manifest, probe_runs, settings_from  # noqa: E402

DEFAULT_METHODS = ("full-ft", "lora", "flat-lora", "sam-lora", "sam-full")
STAGES = ("train", "probe", "robust", "report")


def say(message: str) -> None:
    """Print once (rank 0 under torchrun)."""
    if distributed.is_main():
        print(message, flush=True)


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
        atomic_write_json(res / "probes-manifest.json", manifest(settings, runs, split, examples, batch_size))
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
    """Accuracy under corruptions, one part file per run (under torchrun: the runs split across ranks)."""
    parts = {d: out / task / "robust-parts" / f"{d.name}.csv" for d in runs}
    for d in distributed.shard(runs):
        if not parts[d].exists():
            model, t, cfg = load_run(d)
            print(f"[study] corruptions on {d}", flush=True)
            frame = corruption_accuracy(model, t, limit=limit).assign(task=task, method=cfg["method"], seed=cfg["seed"])
            parts[d].parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(parts[d], frame.to_csv(index=False))
    distributed.barrier()
    if distributed.is_main():
        frames = [pd.read_csv(parts[d]) for d in runs]
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
        pngs = [f"![{p.stem}]({Path(os.path.relpath(p, results)).as_posix()})" for p in made if p.suffix == ".png"]
        sections += (["### Figures", ""] + pngs + [""]) if pngs else []
    path = results / "report.md"
    atomic_write_text(path, "\n".join(sections))
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/study")
    p.add_argument("--figures", default="figures/study")
    p.add_argument("--tasks", nargs="+", default=["rt-minilm", "r8-minilm"])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", nargs="+", default=["rt-minilm=150", "r8-minilm=100"],
                   help="TASK=STEPS per task (tasks not named use their default)")
    p.add_argument("--stage", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--results", default="results/study", help="tables and the report (committed)")
    # the probe suite's settings (analysis_scripts/probe.py), cheaper by default: on 2 CPU cores one
    # MiniLM forward of 32 sentences takes about 0.5 s, and the study probes 30 runs (λ₁ to 1 %)
    add_probe_arguments(p, spaces=["lora", "merged"], examples=32, sigmas=[0.05, 0.1], noise_samples=8,
                        directions=2, alphas=7, eig_tol=1e-2)
    p.add_argument("--robust-examples", type=int, default=150)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    steps = {t: None for t in a.tasks}
    for item in a.steps:
        name, _, value = item.partition("=")
        if name in steps:
            steps[name] = int(value)
    if "train" in a.stage:
        train_all(out, a.tasks, a.methods, a.seeds, steps, progress=not a.no_progress)
    results = Path(a.results)
    settings = settings_from(a)
    for task in a.tasks:
        runs = finished_runs(out, task, a.methods, a.seeds)
        if "probe" in a.stage and runs:
            probe_all(out, results, task, runs, settings, a.split, a.examples, a.batch_size)
        if "robust" in a.stage and runs and get_task(task).encode is not None:
            robust_all(out, results, task, runs, a.robust_examples)
    if "report" in a.stage and distributed.is_main():
        command = "python analysis_scripts/mismatch_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
        print(f"[study] report: {report(out, results, Path(a.figures), a.tasks, a.methods, a.seeds, command)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
