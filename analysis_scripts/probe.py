#!/usr/bin/env python
"""Probe trained runs: the sharpness suite in several spaces → a tidy CSV and a JSON manifest.

    .venv/bin/python analysis_scripts/probe.py runs/rt/lora-s0 runs/rt/flat-lora-s0 --out results/probes.csv

For every run (a folder written by train.py) the same fixed batches of the validation split are used
(paired comparisons). Measures per space: top Hessian eigenvalue(s), trace (``--trace-samples``),
expected loss increase on a σ grid (Flat-LoRA filter noise), worst-case sharpness, and the loss
along K filter-normalized directions. Each run's results are kept in OUT.parts/ as they finish, so
an interrupted probe resumes; the CSV (and OUT-curves.csv, and OUT-manifest.json) are written
atomically at the end.

Under ``torchrun --nproc_per_node N`` the same command splits each probe's work over N processes
(grid points, noise samples, Hessian products — see README "Several processes"); rank 0 writes.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import pandas as pd

from flatlora import distributed, load_run
from flatlora.io import atomic_write_json, atomic_write_text
from landscape import Loss
from landscape.probe_suite import ProbeSettings, probe_model


def add_probe_arguments(p: argparse.ArgumentParser, **defaults) -> None:
    """The suite's settings as options (shared with mismatch_study.py, which has cheaper defaults)."""
    d = {"spaces": ["lora", "merged", "tangent", "normal"], "examples": 64, "sigmas": [0.02, 0.05, 0.1],
         "noise_samples": 16, "directions": 3, "alphas": 11, "eig_tol": 1e-3, **defaults}
    p.add_argument("--spaces", nargs="+", default=d["spaces"])
    p.add_argument("--split", default="validation")
    p.add_argument("--examples", type=int, default=d["examples"], help="probe examples (first N of the split)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eig-k", type=int, default=1)
    p.add_argument("--eig-tol", type=float, default=d["eig_tol"], help="Lanczos relative residual")
    p.add_argument("--trace-samples", type=int, default=0, help="Hutch++ products per space (0: skip)")
    p.add_argument("--sigmas", nargs="+", type=float, default=d["sigmas"])
    p.add_argument("--noise-samples", type=int, default=d["noise_samples"])
    p.add_argument("--rhos", nargs="+", type=float, default=[0.05])
    p.add_argument("--directions", type=int, default=d["directions"])
    p.add_argument("--alphas", type=int, default=d["alphas"])
    p.add_argument("--seed", type=int, default=0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders written by analysis_scripts/train.py")
    p.add_argument("--out", required=True, help="CSV of measures (curves go to OUT-curves.csv)")
    add_probe_arguments(p)
    p.add_argument("--progress", action="store_true")
    return p.parse_args(argv)


def settings_from(a: argparse.Namespace) -> ProbeSettings:
    return ProbeSettings(spaces=tuple(a.spaces), eig_k=a.eig_k, eig_tol=a.eig_tol, trace_samples=a.trace_samples,
                         sigmas=tuple(a.sigmas), noise_max_samples=a.noise_samples,
                         noise_min_samples=min(8, a.noise_samples), rhos=tuple(a.rhos), num_directions=a.directions,
                         alphas=a.alphas, seed=a.seed)


def probe_runs(runs, out: Path, settings: ProbeSettings, split: str, examples: int, batch_size: int,
               progress: bool = False, parts: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Probe each run (resuming from ``parts``, default OUT.parts/), then write the CSVs atomically.

    Under ``torchrun`` every rank takes part in each probe (:mod:`flatlora.distributed`); rank 0
    alone writes files and prints, and every rank returns the same frames."""
    parts = parts or out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    main_rank = distributed.is_main()
    measures, curves = [], []
    for run_path in map(Path, runs):
        key = f"{run_path.parent.name}__{run_path.name}"
        m_file, c_file = parts / f"{key}.csv", parts / f"{key}-curves.csv"
        if distributed.broadcast_object(m_file.exists() and c_file.exists()):  # rank 0's view, for every rank
            m, c = pd.read_csv(m_file), pd.read_csv(c_file)
        else:
            model, task, cfg = load_run(run_path)
            loss = Loss(task.batches(split, batch_size, limit=examples))
            if main_rank:
                print(f"[probe] {run_path} ({cfg['method']}, seed {cfg['seed']}) on {loss.total} {split} examples"
                      f"{f' on {distributed.world_size()} processes' if distributed.world_size() > 1 else ''}",
                      flush=True)
            m, c = probe_model(model, loss, settings, lora_targets=task.lora_targets, progress=progress and main_rank)
            tags = {"task": cfg["task"], "method": cfg["method"], "seed": cfg["seed"], "run": str(run_path)}
            m, c = m.assign(**tags), c.assign(**tags)
            if main_rank:
                atomic_write_text(c_file, c.to_csv(index=False))
                atomic_write_text(m_file, m.to_csv(index=False))
        measures.append(m)
        curves.append(c)
    m_all, c_all = pd.concat(measures, ignore_index=True), pd.concat(curves, ignore_index=True)
    if main_rank:
        atomic_write_text(out, m_all.to_csv(index=False))
        atomic_write_text(out.with_name(out.stem + "-curves.csv"), c_all.to_csv(index=False))
    distributed.barrier()
    return m_all, c_all


def manifest(settings: ProbeSettings, runs, split: str, examples: int, batch_size: int) -> dict:
    import peft
    import torch
    import transformers

    return {"settings": settings.as_dict(), "runs": [str(r) for r in runs], "split": split, "examples": examples,
            "batch_size": batch_size, "versions": {"torch": torch.__version__, "peft": peft.__version__,
                                                  "transformers": transformers.__version__,
                                                  "python": platform.python_version()},
            "world_size": distributed.world_size(), "command": " ".join(sys.argv)}


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    settings = settings_from(a)
    for r in a.runs:
        if not (Path(r) / "metrics.json").exists():
            print(f"error: {r} holds no finished run (no metrics.json)", file=sys.stderr)
            return 2
    probe_runs(a.runs, out, settings, a.split, a.examples, a.batch_size, a.progress)
    if distributed.is_main():
        atomic_write_json(out.with_name(out.stem + "-manifest.json"), manifest(settings, a.runs, a.split, a.examples,
                                                                              a.batch_size))
        print(json.dumps({"measures": str(out), "curves": str(out.with_name(out.stem + "-curves.csv"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
