#!/usr/bin/env python
"""Paper-style figures of the study from its result tables.

    .venv/bin/python analysis_scripts/make_figures.py --results results/study --figures figures/study

For every task folder under --results (holding metrics.csv, probes.csv, probes-curves.csv and, if
made, planes.csv and robustness.csv) it writes TASK-lines, TASK-planes-METHOD, TASK-expected-loss,
TASK-eigenvalues, TASK-sharpness-vs-accuracy and TASK-robustness as PNG and PDF, and prints their paths.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from landscape.plot import save_figure
from landscape.study_figures import (fig_eigenvalues, fig_expected_loss, fig_lines, fig_planes, fig_robustness,
                                     fig_sharpness_vs_accuracy)


def task_figures(task_dir: Path, figures: Path) -> list[Path]:
    task = task_dir.name
    read = lambda name: pd.read_csv(task_dir / name) if (task_dir / name).exists() else None
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results/study")
    p.add_argument("--figures", default="figures/study")
    a = p.parse_args(argv)
    results = Path(a.results)
    task_dirs = sorted(d for d in results.iterdir() if d.is_dir()) if results.is_dir() else []
    if not task_dirs:
        print(f"error: no task folders under {results}; run analysis_scripts/mismatch_study.py first", file=sys.stderr)
        return 2
    for d in task_dirs:
        for path in task_figures(d, Path(a.figures)):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
