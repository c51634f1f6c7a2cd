#!/usr/bin/env python
"""Train one method on one task and write OUT/{config.json, adapter/, metrics.json, labels.json, predictions.json}.

    python analysis_scripts/train.py --task rt-minilm --method flat-lora --steps 250 --out runs/rt/flat-lora-s0

An interrupted run resumes when started again with the same arguments; a finished one is kept
unless --overwrite is given, and then replaced only once the new run has finished (it is written
to OUT.overwrite/ meanwhile, and resumes from there when interrupted). ``--task custom`` takes
--model-dir, --train-csv, --test-csv [--validation-csv] (CSV columns: text,label); config.json
records their absolute paths. Every argument is checked before any model is loaded: a bad one is
an error, and so is an option the chosen task or method would ignore (--sigma with --method lora).

Launched by torchrun it trains data-parallel (DDP), --batch-size per process, --steps global:

    torchrun --nproc_per_node 2 analysis_scripts/train.py --task rt-minilm --method flat-lora --out runs/rt/ddp
"""
from __future__ import annotations

import dataclasses
import json
import sys
from argparse import BooleanOptionalAction

from flatlora import METHODS, SAM_VARIANTS, TASKS, TrainConfig, distributed, run
from flatlora.cli import ArgumentParser, fail
from flatlora.flat_lora import SCHEDULES
from flatlora.perturb import MODES
from flatlora.sam import ADAPTIVE_SCOPES, SAM_GRADIENTS
from flatlora.tasks import TaskError
from flatlora.training import ConfigError, RunExistsError

CUSTOM_OPTIONS = ("model_dir", "train_csv", "test_csv", "validation_csv")  # task 'custom' only


def parser() -> ArgumentParser:
    """train.py's options; None stands for the task's or the method's default."""
    p = ArgumentParser(description=__doc__)
    p.add_argument("--task", default="rt-minilm", choices=sorted(TASKS), help="the task to train on")
    p.add_argument("--method", default="lora", choices=sorted(METHODS), help="the training method")
    p.add_argument("--rank", type=int, help="LoRA rank r; None: the task's (8 for the text tasks)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (scale alpha / r); None: the task's (16 for the text tasks)")
    p.add_argument("--lora-dropout", type=float, default=TrainConfig.lora_dropout,
                   help="dropout on the LoRA branch's input, in [0, 1)")
    p.add_argument("--sigma", type=float, help="Flat-LoRA noise scale σ (flat-lora only); None: the task's (0.05)")
    p.add_argument("--schedule", default=TrainConfig.schedule, choices=SCHEDULES,
                   help="Flat-LoRA's σ schedule over optimizer steps")
    p.add_argument("--mode", default=TrainConfig.mode, choices=MODES, help="Flat-LoRA's weight-perturbation mode")
    p.add_argument("--shared-noise", action="store_true",
                   help="under torchrun: rank 0's Flat-LoRA noise on every rank (else independent per rank)")
    p.add_argument("--rho", type=float, help="SAM radius ρ (SAM methods only); None: the method's ("
                   + ", ".join(f"{m} {v.rho}" for m, v in SAM_VARIANTS.items()) + ")")
    p.add_argument("--sam-gradient", default=TrainConfig.sam_gradient, choices=SAM_GRADIENTS,
                   help="under torchrun: SAM's ε from each rank's own gradient (local: cheaper) or from their mean "
                   "(global: equals one process with the whole batch)")
    p.add_argument("--adaptive-scope", default=TrainConfig.adaptive_scope, choices=ADAPTIVE_SCOPES,
                   help="ASAM methods: T = |θ| + η on every tensor (all) or on weights only, T = 1 on biases "
                   "(weights: the SamsungLabs/ASAM code)")
    p.add_argument("--lr", type=float, help="learning rate; None: the task's")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="optimizer steps; None: the task's, or --epochs")
    g.add_argument("--epochs", type=float, help="epochs over the train split (instead of --steps)")
    p.add_argument("--batch-size", type=int, help="micro-batch size, per process under torchrun; None: the task's")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order, dropout and noise")
    p.add_argument("--device", help="cpu, cuda, cuda:1 …; None: cuda if available (under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out (once the new one has "
                   "finished)")
    p.add_argument("--progress", action=BooleanOptionalAction, default=sys.stderr.isatty(),
                   help="progress bars (default here: %(default)s — on when stderr is a terminal)")
    custom = p.add_argument_group("task 'custom' (only)")
    custom.add_argument("--model-dir", help="a local Hugging Face model folder")
    custom.add_argument("--train-csv", help="training examples: a CSV with the columns text,label")
    custom.add_argument("--test-csv", help="test examples: a CSV with the columns text,label")
    custom.add_argument("--validation-csv", help="validation examples; None: a tenth of --train-csv, set aside")
    return p


def parse_args(argv=None):
    return parser().parse_args(argv)


def option(setting: str) -> str:
    """A TrainConfig field spelled as its option: ``lora_dropout`` → ``--lora-dropout``."""
    return "--" + setting.replace("_", "-")


def config(a) -> TrainConfig:
    """The run's settings from the arguments; options that the task or method would ignore are errors."""
    custom = {k: getattr(a, k) for k in CUSTOM_OPTIONS if getattr(a, k) is not None}
    if custom and a.task != "custom":
        fail(f"{', '.join(map(option, custom))} only apply to --task custom (this is --task {a.task}); drop them, or "
             "pass --task custom")
    cfg = TrainConfig(task=a.task, method=a.method, rank=a.rank, alpha=a.alpha, lora_dropout=a.lora_dropout,
                      sigma=a.sigma, lr=a.lr, steps=a.steps, epochs=a.epochs, batch_size=a.batch_size,
                      grad_accum=a.grad_accum, seed=a.seed, schedule=a.schedule, mode=a.mode, rho=a.rho,
                      shared_noise=a.shared_noise, sam_gradient=a.sam_gradient, adaptive_scope=a.adaptive_scope,
                      task_options=custom)
    for name in cfg.unused_settings():
        readers = [m for m in sorted(METHODS) if dataclasses.replace(cfg, method=m).reads(name)]
        fail(f"{option(name)} does not apply to --method {a.method} (it is used by {', '.join(readers)}); drop it, or "
             "choose one of those methods")
    return cfg


def main(argv=None) -> int:
    a = parse_args(argv)
    distributed.ensure_initialized()  # under torchrun: join the process group
    try:
        _, metrics = run(config(a), a.out, overwrite=a.overwrite, progress=a.progress, device=a.device)
    except ConfigError as e:
        fail(e.for_command_line())
    except (TaskError, RunExistsError) as e:
        fail(str(e))
    if distributed.is_main():
        summary = {k: metrics[k] for k in ("task", "method", "seed", "steps", "accuracy", "f1_weighted", "wall_time_s")}
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
