#!/usr/bin/env python
"""The flatness-mismatch study: train every method × seed on each task, probe, make figures, report.

    .venv/bin/python analysis_scripts/mismatch_study.py --out runs/study            # everything
    .venv/bin/python analysis_scripts/mismatch_study.py --out runs/study --stage train

The long MiniLM runs of issue 14 (≥ 2 epochs, 5 seeds, the reference recipe, each method at the
setting that changed the landscape most in the digits study):

    .venv/bin/python analysis_scripts/mismatch_study.py --seeds 0 1 2 3 4 \
        --steps rt-minilm=1350 r8-minilm=940 --lr 5e-4 --lora-targets all-linear \
        --sigma 0.2 --schedule constant --rho-lora 0.1 --rho-full 0.1

A finished run trained otherwise than asked is an error, never reused.

Stages (each resumable — finished runs and probe results are reused):

1. ``train``  — ``flatlora.run`` for each task × method × seed into OUT/TASK/METHOD-sSEED/, each
   finished LoRA-family run then copied (config, metrics, predictions, adapter: a few MB) to its
   unit RESULTS/TASK/units/METHOD-sSEED/, which every later stage reads; a full fine-tuning run's
   unit is a record (the same files, its weights as the digest model.sha1): its committed parts
   serve the report on any machine, and probing it again means training it again;
2. ``probe``  — ``analysis_scripts/probe.py``'s suite on every run → RESULTS/TASK/probes.csv (one part
   per run in RESULTS/TASK/probe-parts/, keyed by the run's name and the content hashes of its files);
   ``--noise-pairs N`` then gives each run's ΔL cells whose interval holds 0 N antithetic pairs in all
   (``landscape.study.noise_top_up``: the extra draws alone, merged exactly; parts in noise-parts/);
   a later probe stage without it keeps the top-up that the task's probes-manifest.json records;
3. ``robust`` — accuracy under seeded text corruptions → RESULTS/TASK/robustness.csv;
4. ``report`` — figures into --figures and a markdown report RESULTS/report.md, per task, from the
   finished runs (partial data is fine: with one seed the intervals and p-values are "—"):
   - each run's steps, test and validation accuracy and training wall time;
   - mean ± std over seeds of accuracy, weighted F1, sharpness per space and method, the worst case
     beside its first-order term ρ‖∇L‖, ΔL with its Monte-Carlo interval (marked where it holds 0),
     and the accuracy drop under each corruption;
   - every method against LoRA paired by seed (a seed pairs data order and initialisation):
     accuracy, F1, ΔL and drops as differences, λ₁ and the worst case as geometric-mean ratios, each
     with a Student-t 95 % interval and the paired t-test, Holm-adjusted over the whole table (one
     family per task);
   - Spearman's ρ of λ₁ against test accuracy within each method with ≥ 5 seeds (never pooled over
     methods; Holm over method × space);
   - balanced-LoRA against merged λ₁, and tangent against normal, across the LoRA-family runs:
     Spearman's ρ with a BCa bootstrap interval and the runs flat in one space and sharp in the other;
   - the error analysis of LoRA against Flat-LoRA, seed by seed.

Commit RESULTS as it grows (each unit and part is small): a new machine then goes on where the last
stopped — nothing committed is trained or probed again. Full fine-tuning's weights are not committed
(MiniLM's are 90 MB): its probe parts are, and the run itself stays in OUT. On another machine,
``--stage train --retrain-records`` trains such a run again for a stage that needs its weights,
and keeps the weights only if they are bit-identical to the record's digest.

Under ``torchrun --nproc_per_node N`` the same command trains each run with DDP, splits each
probe's work and the robustness runs across the N processes; rank 0 writes the shared files.
"""
from __future__ import annotations

import sys
from pathlib import Path

from flatlora.cli import ArgumentParser, command_line, fail
from flatlora import distributed
from landscape.study.pipeline import (DEFAULT_METHODS, STAGES, Recipe, RecordWithoutWeightsError, StudySettingsError,
                                     run_study)
from landscape.study.report import write_index
from landscape.study.suite import ProbeSettings


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out", default="runs/study", help="folder for the trained runs and their checkpoints (not committed)")
    p.add_argument("--figures", default="figures/study", help="folder for the figures")
    p.add_argument("--tasks", nargs="+", default=["rt-minilm", "r8-minilm"], help="tasks to study")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="training methods to compare")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds per method (a seed pairs data order and init)")
    p.add_argument("--steps", nargs="+", default=["rt-minilm=150", "r8-minilm=100"],
                   help="TASK=STEPS per task (tasks not named use their default)")
    p.add_argument("--stage", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run, in order")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of the LoRA-family methods (default: each method's; full-ft keeps its own)")
    p.add_argument("--lora-targets", default=None, choices=("all-linear",),
                   help="LoRA on every linear layer of the encoder (default: the task's, query and value on MiniLM)")
    p.add_argument("--sigma", type=float, default=None, help="Flat-LoRA's σ (default: TrainConfig's)")
    p.add_argument("--schedule", default=None, choices=("cosine", "constant"),
                   help="Flat-LoRA's σ schedule (default: TrainConfig's)")
    p.add_argument("--rho-lora", type=float, default=None, help="SAM's ρ on the LoRA factors (sam-lora)")
    p.add_argument("--rho-full", type=float, default=None, help="SAM's ρ on the merged weights (sam-full)")
    p.add_argument("--results", default="results/study/minilm",
                   help="the runs' units, resumable parts, tables and the report (committed); the study's index "
                        "RESULTS/../report.md is rebuilt")
    # the probe suite's settings (analysis_scripts/probe.py): the LoRA space in the balanced gauge
    # beside the merged, tangent and normal spaces, on 128 validation examples (issue 14: λ₁ on 32
    # examples varied more between slices than between seeds); lines and noise cheaper than the
    # suite's defaults (on 2 CPU cores one MiniLM forward of 32 sentences takes about 0.5 s)
    ProbeSettings.add_arguments(p, examples=128, sigmas=[0.05, 0.1], noise_samples=8, directions=2, alphas=7,
                                eig_tol=1e-2)
    p.add_argument("--noise-pairs", type=int, default=None, metavar="N",
                   help="extend each run's ΔL cells whose 95%% interval holds 0 to N antithetic pairs in all (the draws "
                        "the probe did not make, merged exactly with its first ones; parts in noise-parts/); "
                        "default: the top-up that RESULTS/TASK/probes-manifest.json records, so probing again keeps it "
                        "(none on a first probe); 0: no top-up")
    p.add_argument("--retrain-records", action="store_true",
                   help="train stage: train again each full fine-tuning run committed as a record (its weights not "
                        "committed) that OUT does not hold, so that a stage needing its weights can run; the weights "
                        "must come out bit-identical to the record's model.sha1, else the study stops")
    p.add_argument("--robust-examples", type=int, default=150, help="test examples in the robustness stage")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    distributed.ensure_initialized()  # under torchrun: join the process group
    steps = {t: None for t in a.tasks}
    for item in a.steps:
        name, _, value = item.partition("=")
        if name in steps:
            steps[name] = int(value)
    command = command_line("mismatch_study.py", argv)
    recipe = Recipe(lr=a.lr, lora_targets=a.lora_targets, sigma=a.sigma, schedule=a.schedule, rho_lora=a.rho_lora,
                    rho_full=a.rho_full)
    try:
        run_study(Path(a.out), Path(a.results), Path(a.figures), tasks=a.tasks, methods=a.methods, seeds=a.seeds,
                  steps=steps, stages=a.stage, settings=ProbeSettings.from_arguments(a), split=a.split,
                  examples=a.examples, batch_size=a.batch_size, robust_examples=a.robust_examples,
                  progress=not a.no_progress, command=command, recipe=recipe, noise_pairs=a.noise_pairs,
                  retrain_records=a.retrain_records)
    except (StudySettingsError, RecordWithoutWeightsError) as e:
        fail(str(e))
    if "report" in a.stage and distributed.is_main():
        print(f"index: {write_index(Path(a.results).parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
