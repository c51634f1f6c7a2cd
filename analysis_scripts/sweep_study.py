"""The settings sweep on MiniLM (landscape.study.sweep): each method shown to work in its own space.

Every setting (LoRA; Flat-LoRA σ 0.05 / 0.1 / 0.2, cosine and constant; SAM on A, B ρ 0.003 / 0.01 /
0.03 / 0.1; SAM on W ρ 0.01 / 0.05 / 0.1) × seed is trained with LoRA on every linear layer of the
encoder, then λ₁ is measured in its own space (balanced LoRA, or merged for SAM on W) and in the
merged space on validation examples; the report picks, per method, the setting with the best
validation accuracy and the one that flattens its own space most.

    .venv/bin/python analysis_scripts/sweep_study.py                       # rt-minilm, seed 0
    .venv/bin/python analysis_scripts/sweep_study.py --stage train         # then --stage report
    .venv/bin/python analysis_scripts/sweep_study.py --settings lora sam-full-rho0.1   # some settings, in order

Stages (each resumable — finished runs and per-run λ₁ are reused):

1. ``train``  — OUT/TASK/SETTING-sSEED/;
2. ``noise``  — on the finished plain-LoRA run of the first seed, the gradient change from one draw of
   Flat-LoRA's noise at each swept σ against the change from one mini-batch to the next
   (landscape.study.noise_check) → RESULTS/noise_check.csv, and noise_check.json (the command, the
   run and the content hashes of its files);
3. ``report`` — each finished run in OUT becomes a committed unit RESULTS/units/SETTING-sSEED/ (its
   portable files and its row: λ₁ in both spaces, accuracy, wall time); then RESULTS/sweep.csv,
   RESULTS/summary.md (with the noise check when there is one) and the study's index
   RESULTS/../report.md, built from the units alone — commit RESULTS after each unit, and a new
   machine goes on where this one stopped.

    .venv/bin/python analysis_scripts/sweep_study.py --settings lora sam-lora-rho0.1 --seeds 0 1 2 3 4 --stage report
"""
from __future__ import annotations

import sys
from pathlib import Path

from flatlora.cli import ArgumentParser, command_line, fail
from landscape.study import sweep
from landscape.study.exact import ExactStudyError, select_settings
from landscape.study.report import write_index

STAGES = ("train", "noise", "report")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--task", default=sweep.TASK, choices=("rt-minilm", "r8-minilm"), help="the MiniLM task")
    p.add_argument("--out", default="runs/sweep", help="folder for the trained runs (not committed; the report "
                                                       "copies each finished run's small files into RESULTS/units/)")
    p.add_argument("--results", default=None,
                   help="folder for sweep.csv and summary.md (committed; default results/study/TASK-sweep)")
    p.add_argument("--figures", default="figures/study", help="folder for the sweep's figure (TASK-sweep.png)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of every setting")
    methods = list(dict.fromkeys(s.method for s in sweep.SWEEP_SETTINGS))
    p.add_argument("--methods", nargs="+", choices=methods, default=methods,
                   help="train and measure only these methods, each with all its settings; 'lora' is the baseline "
                        "of every ratio")
    names = [s.name for s in sweep.SWEEP_SETTINGS]
    p.add_argument("--settings", nargs="+", choices=names, default=None, metavar="SETTING",
                   help="train and measure only these settings, in this order (overrides --methods; the "
                        f"strongest first gives the answer early), among: {', '.join(names)}")
    p.add_argument("--steps", type=int, default=sweep.STEPS, help="optimizer steps per run (the task's batch size)")
    p.add_argument("--lr", type=float, default=sweep.LR, help="learning rate of every run")
    p.add_argument("--examples", type=int, default=sweep.EXAMPLES, help="validation examples of each λ₁")
    p.add_argument("--stage", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run, in order")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    for name in ("steps", "examples"):
        if getattr(a, name) < 1:
            fail(f"--{name} must be >= 1, got {getattr(a, name)}")
    if not a.lr > 0:
        fail(f"--lr must be > 0, got {a.lr}")
    if "lora" not in (a.settings or a.methods):
        fail("every ratio is to plain LoRA's λ₁ with the same seed: add 'lora' to --methods (or --settings)")
    command = command_line("sweep_study.py", argv)
    results = Path(a.results or f"results/study/{a.task}-sweep")
    try:
        if a.settings:
            settings = [next(s for s in sweep.SWEEP_SETTINGS if s.name == name) for name in a.settings]
        else:
            settings = [s for s in select_settings(a.methods) if s in sweep.SWEEP_SETTINGS]
        if "train" in a.stage:
            sweep.train_sweep(Path(a.out), settings, a.seeds, task=a.task, steps=a.steps, lr=a.lr,
                              progress=not a.no_progress)
        if "noise" in a.stage:
            rows = sweep.noise_check(Path(a.out), results, command.strip(), seed=a.seeds[0], task=a.task)
            print(rows.groupby("sigma")[["noise_change", "batch_change", "noise_cosine", "batch_cosine"]].mean())
        if "report" in a.stage:
            table = sweep.sweep_table(Path(a.out), settings, a.seeds, units=results / "units", task=a.task,
                                          examples=a.examples)
            if table.empty:
                fail(f"no finished runs in {a.out}/{a.task}: run --stage train first")
            print(sweep.write_sweep_report(table, results, command.strip(), figures=Path(a.figures),
                                           task=a.task).to_string(index=False))
            print(f"report: {results / 'summary.md'}; index: {write_index(results.parent)}")
    except (ExactStudyError, FileNotFoundError) as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
