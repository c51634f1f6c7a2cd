#!/usr/bin/env python
"""`make demo`: train LoRA and Flat-LoRA on the default task (rt-minilm), probe both in the LoRA and
merged spaces, and write one figure and one table.

    .venv/bin/python analysis_scripts/demo.py [--steps 200] [--out runs/demo]

Finished runs and probes under --out are reused, so a second `make demo` only prints.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from flatlora.cli import ArgumentParser
from flatlora import TrainConfig, distributed, run
from flatlora.io import atomic_write_text
from landscape.plot import save_figure
from landscape.study.figures import fig_lines
from landscape.study.pipeline import probe_runs
from landscape.study.report import markdown_table
from landscape.study.suite import ProbeSettings

METHODS = ("lora", "flat-lora")
SETTINGS = ProbeSettings(spaces=("lora-balanced", "merged"), sigmas=(0.05,), noise_max_samples=8, rhos=(0.05,),
                         worst_case_steps=1, num_directions=2, alphas=9)


def train_or_reuse(method: str, steps: int, out: Path) -> dict:
    if distributed.broadcast_object((out / "metrics.json").exists()):
        if distributed.is_main():
            print(f"[demo] reusing the finished run in {out}")
        return json.loads((out / "metrics.json").read_text())
    if distributed.is_main():
        print(f"[demo] training {method} on rt-minilm for {steps} steps → {out}", flush=True)
    _, metrics = run(TrainConfig(task="rt-minilm", method=method, steps=steps, seed=0), out)
    return metrics


def main() -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per training run")
    p.add_argument("--out", default="runs/demo", help="folder for the runs, the table and the figure")
    a = p.parse_args()
    distributed.ensure_initialized()  # under torchrun: join the process group
    out = Path(a.out)
    metrics = {m: train_or_reuse(m, a.steps, out / m) for m in METHODS}
    if distributed.is_main():
        print("[demo] probing both runs in the balanced LoRA and merged spaces (32 validation examples)", flush=True)
    probes, curves = probe_runs([out / m for m in METHODS], out / "probes.csv", SETTINGS, "validation", 32, 32,
                                progress=True)
    if not distributed.is_main():  # under torchrun: rank 0 writes and prints
        return
    rows = []
    for m in METHODS:
        row = {"method": m, "test accuracy": metrics[m]["accuracy"], "weighted F1": metrics[m]["f1_weighted"]}
        for sp in SETTINGS.spaces:
            sel = probes[(probes["method"] == m) & (probes["space"] == sp)].set_index("measure")["value"]
            row[f"λ₁ {sp}"] = sel["eigenvalue"]
            row[f"ΔL(σ=0.05) {sp}"] = sel["expected_loss"]
        rows.append(row)
    table = pd.DataFrame(rows)
    atomic_write_text(out / "demo-table.md", markdown_table(table) + "\n")
    figure = save_figure(fig_lines(curves, task="rt-minilm"), out / "demo-lines")
    print()
    print(table.set_index("method").to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"\n[demo] majority-class baseline: {metrics['lora']['majority_baseline']:.4f}")
    print(f"[demo] table:  {(out / 'demo-table.md').resolve()}")
    print(f"[demo] figure: {figure[0].resolve()}")
    print(f"[demo] runs, adapters and metrics: {out.resolve()}")


if __name__ == "__main__":
    main()
