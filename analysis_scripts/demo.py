#!/usr/bin/env python
"""`make demo`: train LoRA and Flat-LoRA on the default task (rt-minilm) and print a table.

    .venv/bin/python analysis_scripts/demo.py [--steps 250] [--out runs/demo]

Finished runs under --out are reused, so a second `make demo` only prints.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from flatlora import TrainConfig, run

METHODS = ("lora", "flat-lora")


def train_or_reuse(method: str, steps: int, out: Path) -> dict:
    if (out / "metrics.json").exists():
        print(f"[demo] reusing the finished run in {out}")
        return json.loads((out / "metrics.json").read_text())
    print(f"[demo] training {method} on rt-minilm for {steps} steps → {out}")
    _, metrics = run(TrainConfig(task="rt-minilm", method=method, steps=steps, seed=0), out)
    return metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--out", default="runs/demo")
    a = p.parse_args()
    out = Path(a.out)
    rows = []
    for method in METHODS:
        m = train_or_reuse(method, a.steps, out / method)
        rows.append({"method": method, "test accuracy": m["accuracy"], "weighted F1": m["f1_weighted"],
                     "majority baseline": m["majority_baseline"], "train time (s)": m["wall_time_s"]})
    table = pd.DataFrame(rows).set_index("method")
    print()
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"\n[demo] runs, adapters and metrics are in {out.resolve()}")


if __name__ == "__main__":
    main()
