#!/usr/bin/env python
"""Cost and exactness of Flat-LoRA's two perturbation modes against plain LoRA, side by side.

    .venv/bin/python analysis_scripts/benchmarks/bench_flatlora_step.py [--reps 30] [--drift-steps 1000]

On ``rt-minilm`` at batch 16 (real micro-batches of the training stream, dynamic padding), in one
process and interleaved (lora, exact, inplace, lora, …) so machine noise hits all three alike:

* step time (forward + backward + AdamW) — medians and ratios to LoRA;
* peak tensor memory of one step above the memory held before it, from the PyTorch profiler's
  memory timeline (every tensor allocation and free on the device), and its excess over LoRA's,
  compared with the size of the largest adapted weight;
* base-weight drift ‖W_after − W_before‖ / ‖W‖ after ``--drift-steps`` perturb/restore round trips
  of ``inplace`` mode, in fp32 and in bf16 (``exact``: measured too; 0 by construction).

Writes ``figures/bench_flatlora_step.md``. ``--device cuda --dtype bfloat16`` times the steps on a GPU
in bf16 (``analysis_scripts/benchmarks/gpu_check.sh`` does).
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path

import torch

from flatlora import FlatLoRA, StepRunner, TrainConfig, get_task, lora_layers, prepare_model
from flatlora.batches import batch_to
from flatlora.io import atomic_write_text
from flatlora.memory import peak_step_memory
from flatlora.methods import FlatLoRAStep
from flatlora.training import micro_batches

ROOT = Path(__file__).resolve().parents[2]


def drift(model, mode: str, steps: int, sigma: float) -> float:
    """Relative base-weight drift after ``steps`` perturb/restore round trips of Flat-LoRA."""
    views = lora_layers(model)
    before = [v.weight.detach().float().clone() for v in views]
    flat = FlatLoRA(model, sigma=sigma, total_steps=steps, schedule="constant", seed=0, mode=mode)
    for t in range(steps):
        with flat.perturb(t):
            pass  # forward/backward do not write W; the round trip alone decides the drift
    num = sum(float((v.weight.float() - b).norm() ** 2) for v, b in zip(views, before)) ** 0.5
    den = sum(float(b.norm() ** 2) for b in before) ** 0.5
    return num / den


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--drift-steps", type=int, default=1000)
    p.add_argument("--sigma", type=float, default=0.05)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="of the timed models")
    p.add_argument("--out", default=str(ROOT / "figures" / "bench_flatlora_step.md"))
    a = p.parse_args()
    device = torch.device(a.device)

    task = get_task("rt-minilm")
    cfg = TrainConfig(task="rt-minilm", method="lora", seed=0).resolved(task)
    base = prepare_model(task, cfg).to(device)
    timed = copy.deepcopy(base).to(getattr(torch, a.dtype))
    batch_at = micro_batches(task, 16, seed=0)
    runners = {}
    for name in ("lora", "flat-lora exact", "flat-lora inplace"):
        model = copy.deepcopy(timed)
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        if name == "lora":
            runners[name] = StepRunner(model, opt)
        else:
            flat = FlatLoRA(model, sigma=a.sigma, total_steps=10**6, schedule="constant", seed=0, mode=name.split()[-1])
            runners[name] = FlatLoRAStep(model, opt, flat_lora=flat)
        model.train()

    times = {n: [] for n in runners}
    for k in range(a.warmup + a.reps):
        batch = batch_to(batch_at(k), device)
        for name, runner in runners.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            runner.step([batch], k)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if k >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    batch = batch_to(batch_at(0), device)
    peaks = {name: peak_step_memory(r, batch, 1, device) for name, r in runners.items()}
    largest = max(v.weight.numel() * v.weight.element_size() for v in lora_layers(base))

    drifts = {}
    for dtype in (torch.float32, torch.bfloat16):
        for mode in ("exact", "inplace"):
            model = copy.deepcopy(base).to(dtype)
            drifts[(mode, str(dtype).replace("torch.", ""))] = drift(model, mode, a.drift_steps, a.sigma)

    med = {n: statistics.median(t) for n, t in times.items()}
    lines = [
        "# Flat-LoRA step cost and base-weight drift",
        "",
        f"`{' '.join(['python', 'analysis_scripts/benchmarks/bench_flatlora_step.py'])}` — rt-minilm (MiniLM-L6, LoRA r=8 on "
        f"query/value + head), batch 16, σ={a.sigma} (constant), {a.reps} interleaved steps per method after "
        f"{a.warmup} warm-up, {a.dtype}; device {device.type}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads.",
        "",
        "| method | median step (s) | time ratio to LoRA | peak step memory above start (MiB) | extra over LoRA (MiB) |",
        "|---|---|---|---|---|",
    ]
    for n in runners:
        lines.append(f"| {n} | {med[n]:.4f} | {med[n] / med['lora']:.3f}× | {peaks[n] / 2**20:.2f} | "
                     f"{(peaks[n] - peaks['lora']) / 2**20:+.2f} |")
    lines += [
        "",
        f"Largest adapted weight: {largest / 2**20:.2f} MiB (target: `exact`'s extra peak ≤ this; time ≤ 1.10× LoRA).",
        "",
        f"Base-weight drift ‖W_after − W_before‖/‖W‖ after {a.drift_steps} perturb/restore round trips (σ={a.sigma}):",
        "",
        "| mode | fp32 | bf16 |",
        "|---|---|---|",
    ]
    for mode in ("exact", "inplace"):
        lines.append(f"| {mode} | {drifts[(mode, 'float32')]:.3e} | {drifts[(mode, 'bfloat16')]:.3e} |")
    lines.append("")
    atomic_write_text(a.out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
