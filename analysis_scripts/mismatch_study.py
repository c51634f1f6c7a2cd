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
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flatlora import TrainConfig, run  # noqa: E402
from flatlora.training import RunExistsError  # noqa: E402

DEFAULT_METHODS = ("full-ft", "lora", "flat-lora", "sam-lora", "sam-full")
STAGES = ("train", "probe", "robust", "report")


def run_dir(out: Path, task: str, method: str, seed: int) -> Path:
    return out / task / f"{method}-s{seed}"


def train_all(out: Path, tasks, methods, seeds, steps: dict, progress: bool) -> None:
    for task in tasks:
        for seed in seeds:
            for method in methods:
                d = run_dir(out, task, method, seed)
                if (d / "metrics.json").exists():
                    continue
                print(f"[study] train {task} {method} seed {seed} ({steps[task]} steps) → {d}", flush=True)
                try:
                    run(TrainConfig(task=task, method=method, seed=seed, steps=steps[task]), d, progress=progress)
                except RunExistsError as e:
                    print(f"[study] {e}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/study")
    p.add_argument("--figures", default="figures/study")
    p.add_argument("--tasks", nargs="+", default=["rt-minilm", "r8-minilm"])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", nargs="+", default=["rt-minilm=150", "r8-minilm=150"],
                   help="TASK=STEPS per task (tasks not named use their default)")
    p.add_argument("--stage", nargs="+", choices=STAGES, default=list(STAGES))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
