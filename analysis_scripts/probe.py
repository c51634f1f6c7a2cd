#!/usr/bin/env python
"""Probe trained runs: the sharpness suite in several spaces → a tidy CSV and a JSON manifest.

    .venv/bin/python analysis_scripts/probe.py runs/rt/lora-s0 runs/rt/flat-lora-s0 --out results/probes.csv

For every run (a folder written by train.py) the same fixed batches of the validation split are used
(paired comparisons). Measures per space: top Hessian eigenvalue(s), trace (``--trace-samples``),
expected loss increase on a σ grid (Flat-LoRA filter noise), worst-case sharpness, and the loss
along K filter-normalized directions. Each run's results are kept in OUT.parts/ as they finish,
keyed by the run's path and fingerprinted by its files and every probe setting, so an interrupted
probe resumes and a changed run or setting is probed again; the CSV (and OUT-curves.csv, and
OUT-manifest.json) are written atomically at the end.

Under ``torchrun --nproc_per_node N`` the same command splits each probe's work over N processes
(grid points, noise samples, Hessian products — see README "Several processes"); rank 0 writes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flatlora import distributed
from flatlora.io import atomic_write_json
from landscape.study.pipeline import manifest, probe_runs
from landscape.study.suite import ProbeSettings


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders written by analysis_scripts/train.py")
    p.add_argument("--out", required=True, help="CSV of measures (curves go to OUT-curves.csv)")
    ProbeSettings.add_arguments(p)
    p.add_argument("--progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    settings = ProbeSettings.from_arguments(a)
    for r in a.runs:
        if not (Path(r) / "metrics.json").exists():
            print(f"error: {r} holds no finished run (no metrics.json)", file=sys.stderr)
            return 2
    probe_runs(a.runs, out, settings, a.split, a.examples, a.batch_size, a.progress)
    if distributed.is_main():
        atomic_write_json(out.with_name(out.stem + "-manifest.json"),
                          manifest(settings, a.runs, out, a.split, a.examples, a.batch_size))
        print(json.dumps({"measures": str(out), "curves": str(out.with_name(out.stem + "-curves.csv"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
