#!/usr/bin/env python
"""The cost columns of Li et al. (ICML 2025) Table 6 — step time and memory of LoRA, Flat-LoRA, SAM on
the LoRA factors and SAM on the merged weights — measured side by side.

    .venv/bin/python analysis_scripts/benchmarks/bench_sam_cost.py [--reps 20] [--threads 1]

On ``rt-minilm`` (MiniLM-L6, LoRA r=8 on query/value + head) at batch 16, real micro-batches of the
training stream, every method in one process and interleaved step by step (lora, flat-lora,
sam-lora, sam-full, lora, …) so machine noise hits all alike:

* step time (both passes for SAM, forward + backward + AdamW) — medians and ratios to LoRA;
* peak tensor memory of one step above the memory held before it — every tensor allocation and free
  the PyTorch profiler records (:func:`flatlora.memory.peak_step_memory`) — its excess
  over LoRA's, and the size of the adapted weights Σ m·n, which ``sam-full`` must hold as ε_W.

Flat-LoRA runs its ``constant`` σ schedule so that every timed step is perturbed (the cosine
schedule's σ is 0 at step 0). Writes ``figures/bench_sam_cost.md``.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from flatlora import TrainConfig, get_method, get_task, lora_layers, prepare_model
from flatlora.io import atomic_write_text
from flatlora.memory import peak_step_memory
from flatlora.training import micro_batches

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("lora", "flat-lora", "sam-lora", "sam-full")


def build_runners(task, total_steps: int) -> dict:
    runners = {}
    for method in METHODS:
        cfg = TrainConfig(task="rt-minilm", method=method, seed=0, schedule="constant", steps=total_steps,
                          mode="exact").resolved(task)
        model = prepare_model(task, cfg).train()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=cfg.lr)
        runners[method] = get_method(method).build(model, opt, cfg.method_options(), loss_fn=task.loss)
    return runners


def interleaved_step_times(runners: dict, batch_at, warmup: int, reps: int) -> dict[str, float]:
    """Median seconds per optimizer step of each runner, one step of each in turn on the same batch."""
    times = {name: [] for name in runners}
    for k in range(warmup + reps):
        batch = batch_at(k)
        for name, runner in runners.items():
            t0 = time.perf_counter()
            runner.step([batch], k)
            if k >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=20, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: less noise on a shared machine)")
    p.add_argument("--out", default=str(ROOT / "figures" / "bench_sam_cost.md"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    task = get_task("rt-minilm")
    runners = build_runners(task, a.warmup + a.reps)
    batch_at = micro_batches(task, 16, seed=0)
    med = interleaved_step_times(runners, batch_at, a.warmup, a.reps)
    peaks = {name: peak_step_memory(r, batch_at(0), a.warmup + a.reps, torch.device("cpu"))
             for name, r in runners.items()}
    adapted = sum(v.weight.numel() * v.weight.element_size() for v in lora_layers(runners["lora"].model))

    lines = [
        "# Cost of Flat-LoRA and the SAM family (Li et al. 2025, Table 6)",
        "",
        f"`python analysis_scripts/benchmarks/bench_sam_cost.py --reps {a.reps} --threads {a.threads}` — rt-minilm "
        f"(MiniLM-L6, LoRA r=8 on query/value + head), batch 16, {a.reps} interleaved steps per method after "
        f"{a.warmup} warm-up; default ρ (sam-lora {runners['sam-lora'].sam.rho}, sam-full "
        f"{runners['sam-full'].sam.rho}), Flat-LoRA σ={runners['flat-lora'].flat_lora.sigma} constant, exact mode; "
        f"CPU, torch {torch.__version__}, {platform.processor() or platform.machine()}, {a.threads} thread(s).",
        "",
        "| method | median step (s) | time × LoRA | peak step memory above start (MiB) | extra over LoRA (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name in METHODS:
        lines.append(f"| {name} | {med[name]:.3f} | {med[name] / med['lora']:.2f}× | {peaks[name] / 2**20:.1f} | "
                     f"{(peaks[name] - peaks['lora']) / 2**20:+.1f} |")
    lines += [
        "",
        f"Adapted weights Σ m·n (fp32): {adapted / 2**20:.2f} MiB — the size of ε_W that `sam-full` holds "
        "during its second pass (and of g_W during its first).",
        "",
    ]
    atomic_write_text(a.out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
