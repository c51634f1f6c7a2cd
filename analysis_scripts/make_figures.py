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

from landscape.study.pipeline import task_figures


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
