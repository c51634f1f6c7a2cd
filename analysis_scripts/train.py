#!/usr/bin/env python
"""Train one method on one task and write OUT/{config.json, adapter/, metrics.json, predictions.json}.

    python analysis_scripts/train.py --task rt-minilm --method flat-lora --steps 250 --out runs/rt/flat-lora-s0

An interrupted run resumes when started again with the same arguments; a finished one is kept
unless --overwrite is given. ``--task custom`` takes --model-dir, --train-csv, --test-csv
[--validation-csv] (CSV columns: text,label).

Launched by torchrun it trains data-parallel (DDP), --batch-size per process, --steps global:

    torchrun --nproc_per_node 2 analysis_scripts/train.py --task rt-minilm --method flat-lora --out runs/rt/ddp
"""
from __future__ import annotations

import argparse
import json
import sys

from flatlora import METHODS, SAM_VARIANTS, TASKS, TrainConfig, distributed, run
from flatlora.flat_lora import SCHEDULES
from flatlora.perturb import MODES
from flatlora.sam import ADAPTIVE_SCOPES, SAM_GRADIENTS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="rt-minilm", choices=sorted(TASKS))
    p.add_argument("--method", default="lora", choices=sorted(METHODS))
    p.add_argument("--rank", type=int, help="LoRA rank r (task default: 8)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (task default: 16)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA branch's input")
    p.add_argument("--sigma", type=float, help="Flat-LoRA noise scale σ (task default: 0.05)")
    p.add_argument("--schedule", default=TrainConfig.schedule, choices=SCHEDULES,
                   help="σ schedule over optimizer steps")
    p.add_argument("--mode", default=TrainConfig.mode, choices=MODES, help="weight-perturbation mode")
    p.add_argument("--shared-noise", action="store_true",
                   help="under torchrun: rank 0's Flat-LoRA noise on every rank (default: independent per rank)")
    p.add_argument("--rho", type=float, help="SAM radius ρ (SAM methods; default per method: "
                   + ", ".join(f"{m} {v.rho}" for m, v in SAM_VARIANTS.items()) + ")")
    p.add_argument("--sam-gradient", default=TrainConfig.sam_gradient, choices=SAM_GRADIENTS,
                   help="under torchrun: SAM's ε from each rank's own gradient (local, default: cheaper) or from "
                   "their mean (global: equals one process with the whole batch)")
    p.add_argument("--adaptive-scope", default=TrainConfig.adaptive_scope, choices=ADAPTIVE_SCOPES,
                   help="ASAM methods: T = |θ| + η on every tensor (all, default) or on weights only, T = 1 on "
                   "biases (weights: the SamsungLabs/ASAM code)")
    p.add_argument("--lr", type=float, help="learning rate (task default)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="optimizer steps")
    g.add_argument("--epochs", type=float, help="epochs over the train split (instead of --steps)")
    p.add_argument("--batch-size", type=int, help="micro-batch size, per process under torchrun (task default)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--no-progress", action="store_true")
    custom = p.add_argument_group("task 'custom'")
    custom.add_argument("--model-dir")
    custom.add_argument("--train-csv")
    custom.add_argument("--test-csv")
    custom.add_argument("--validation-csv")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    distributed.ensure_initialized()  # under torchrun: join the process group
    task_options = {}
    if a.task == "custom":
        task_options = {k: v for k, v in (("model_dir", a.model_dir), ("train_csv", a.train_csv),
                                           ("test_csv", a.test_csv), ("validation_csv", a.validation_csv)) if v}
    cfg = TrainConfig(task=a.task, method=a.method, rank=a.rank, alpha=a.alpha, lora_dropout=a.lora_dropout,
                      sigma=a.sigma, lr=a.lr, steps=a.steps, epochs=a.epochs, batch_size=a.batch_size,
                      grad_accum=a.grad_accum, seed=a.seed, schedule=a.schedule, mode=a.mode, rho=a.rho,
                      shared_noise=a.shared_noise, sam_gradient=a.sam_gradient, adaptive_scope=a.adaptive_scope,
                      task_options=task_options)
    try:
        _, metrics = run(cfg, a.out, overwrite=a.overwrite, progress=not a.no_progress, device=a.device)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if distributed.is_main():
        summary = {k: metrics[k] for k in ("task", "method", "seed", "steps", "accuracy", "f1_weighted", "wall_time_s")}
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
