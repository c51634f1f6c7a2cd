"""Benchmark: a loss plane on 2 processes (``torchrun --nproc_per_node 2``, gloo) against 1, side by side.

    .venv/bin/python analysis_scripts/benchmarks/bench_distributed.py [--model rt-minilm] [--grid 9] [--repeats 3]

writes ``figures/bench_distributed.md``. The driver launches the same worker (this file with
``--worker``) under ``torchrun`` in three configurations, round-robin, ``--repeats`` times each:

* 1 process × 1 thread — the baseline of the speed-up (the same work per thread as each rank of 2);
* 1 process × 2 threads — the fair competitor on a 2-core machine (all the cores, no launcher);
* 2 processes × 1 thread — grid points split across ranks (:mod:`flatlora.distributed`).

Each worker times ``loss_plane`` alone (barrier, plane, barrier: model loading and process start-up
are not counted) and rank 0 writes the losses, so the table also shows that 2 processes give the
numbers of 1. Times are wall-clock seconds (the work is split across processes, so CPU time would
not show the gain), the median of the repeats; the machine's load average is printed with them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = (("1 process × 1 thread", 1, 1), ("1 process × 2 threads", 1, 2), ("2 processes × 1 thread", 2, 1))


def worker(a: argparse.Namespace) -> None:
    import torch

    from flatlora import TrainConfig, distributed, get_task, prepare_model
    from landscape import Loss, loss_plane

    distributed.ensure_initialized()  # the worker runs under torchrun: join the process group
    task = get_task(a.model)
    model = prepare_model(task, TrainConfig(task=a.model, method="lora").resolved(task)).eval()
    loss = Loss(task.batches("test", a.batch_size, limit=a.examples))
    loss_plane(model, loss, space="merged", grid=3, seed=1, progress=False)  # warm-up: first-call costs
    distributed.barrier()
    start = time.perf_counter()
    frame = loss_plane(model, loss, space="merged", grid=a.grid, seed=0, progress=False)
    distributed.barrier()
    seconds = time.perf_counter() - start
    if distributed.is_main():
        Path(a.out).write_text(json.dumps({"seconds": seconds, "loss": frame["loss"].tolist(),
                                           "threads": torch.get_num_threads(), "world": distributed.world_size()}))


def launch(a: argparse.Namespace, nproc: int, threads: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           "--worker", "--out", str(out), "--model", a.model, "--grid", str(a.grid), "--examples", str(a.examples),
           "--batch-size", str(a.batch_size)]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="rt-minilm")
    p.add_argument("--grid", type=int, default=9, help="points per axis (odd)")
    p.add_argument("--examples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default=str(ROOT / "figures" / "bench_distributed.md"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return 0

    import numpy as np
    import torch

    from flatlora.io import atomic_write_text

    load = os.getloadavg()
    times = {name: [] for name, _, _ in CONFIGS}
    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for name, nproc, threads in CONFIGS:
                res = launch(a, nproc, threads, Path(tmp) / "out.json")
                times[name].append(res["seconds"])
                losses[name] = np.array(res["loss"])
                print(f"[bench] repeat {r + 1}: {name}: {res['seconds']:.2f} s", flush=True)
    base = float(np.median(times[CONFIGS[0][0]]))
    ref = losses[CONFIGS[0][0]]
    rows = [f"| {name} | {np.median(t):.2f} | {min(t):.2f} | {base / np.median(t):.2f} | "
            f"{np.abs(losses[name] - ref).max():.1e} |" for name, t in times.items()]
    text = "\n".join([
        f"{a.grid} × {a.grid} loss plane (`loss_plane`, merged space) of {a.model} with LoRA, on {a.examples} test "
        f"examples; wall-clock seconds of the plane alone, median of {a.repeats} runs per configuration "
        f"(round-robin); {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, gloo; "
        f"load average at start {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}.",
        "",
        "| configuration | median (s) | best (s) | speed-up vs 1 × 1 | max \\|Δ loss\\| vs 1 × 1 |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"Made by `.venv/bin/python analysis_scripts/benchmarks/bench_distributed.py --model {a.model} "
        f"--grid {a.grid} --examples {a.examples} --repeats {a.repeats}`.",
        "",
    ])
    atomic_write_text(a.output, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
