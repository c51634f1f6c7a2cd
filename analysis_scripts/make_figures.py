#!/usr/bin/env python
"""Paper-style figures from probe tables: every figure the data allow, and a line for each one it
cannot draw and why.

    flatlora-figures --probes runs/probes.csv --out figures/mine          # probe.py's output
    flatlora-figures --probes P.csv --metrics M.csv --out DIR             # accuracies from a table
    flatlora-figures --results results/study --out figures/study          # the study's task folders

From probe.py's CSV (its curves are read from PROBES-curves.csv beside it) it draws, per task, the
loss lines, the expected loss ΔL(σ), the top eigenvalues and — with accuracies from --metrics or
from the probed runs' metrics.json — sharpness against accuracy. The study's folders
(results/study/TASK/) add the loss planes (LoRA, Flat-LoRA and SAM side by side, and
each one's difference from LoRA) and robustness. Figures are written as PNG and PDF and their
paths printed; the command fails (exit status 1) when it could draw nothing.
"""
from __future__ import annotations

import sys
from pathlib import Path

from flatlora.cli import ArgumentParser
from landscape.study.pipeline import draw_figures, read_probe_tables, task_figures


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--probes", help="a probe table written by probe.py --out")
    src.add_argument("--results", help="the study's results folder (one folder per task)")
    p.add_argument("--curves", help="loss-line curves (default: PROBES-curves.csv beside --probes)")
    p.add_argument("--metrics", help="a CSV with task, method, seed, accuracy (default: the probed runs' metrics.json)")
    p.add_argument("--planes", help="a loss-plane CSV (alpha, beta, loss, method)")
    p.add_argument("--robustness", help="a robustness CSV (kind, level, drop, method)")
    p.add_argument("--out", "--figures", dest="out", default="figures/study", help="folder for the figures")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    made = []
    if a.results:
        results = Path(a.results)
        task_dirs = sorted(d for d in results.iterdir() if d.is_dir()) if results.is_dir() else []
        if not task_dirs:
            hint = " (for probe.py's output use --probes FILE.csv)" if list(results.glob("*.csv")) else ""
            print(f"error: no task folders under {results}{hint}", file=sys.stderr)
            return 2
        for d in task_dirs:
            made += task_figures(d, out)
    else:
        try:
            per_task = read_probe_tables(Path(a.probes), curves=a.curves, metrics=a.metrics, planes=a.planes,
                                         robustness=a.robustness)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for task, tables in per_task.items():
            drawn, skipped = draw_figures(tables, out, task)
            made += drawn
            for name, why in skipped:
                print(f"skipped {name}: {why}", file=sys.stderr)
    for path in made:
        print(path)
    if not made:
        print("error: no figure could be drawn from the given tables", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
