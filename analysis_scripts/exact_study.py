#!/usr/bin/env python
"""The flatness-mismatch claim on digits-mlp with exact Hessian spectra (landscape.study.exact).

Every method and setting (LoRA; Flat-LoRA σ 0.05 / 0.1 / 0.2, cosine and constant; SAM on A, B
ρ 0.003 / 0.01 / 0.03 / 0.1; SAM on W ρ 0.01 / 0.05 / 0.1; full fine-tuning) × every seed is trained,
and the dense float64 Hessian of the training loss is eigendecomposed in the balanced and as-trained
LoRA spaces and the merged, tangent and normal spaces.

    .venv/bin/python analysis_scripts/exact_study.py                     # everything
    .venv/bin/python analysis_scripts/exact_study.py --stage train       # then spectra, probe, robust, report

Stages (each resumable — finished runs and per-run spectra are reused):

1. ``train``   — OUT/digits-mlp/SETTING-sSEED/;
2. ``spectra`` — one part per run in OUT/digits-mlp/exact-parts/, then RESULTS/spectra.csv (tidy);
3. ``probe``   — the probe suite and loss planes on every seed of each method's strongest setting
   (landscape.study.exact_probes): RESULTS/probes.csv, planes.csv and FIGURES/digits-mlp-*;
4. ``robust``  — every run's test accuracy under pixel noise and pixel dropout: RESULTS/robustness.csv and
   FIGURES/digits-mlp-robustness.{png,pdf};
5. ``report``  — from those tables: RESULTS/summary.json, RESULTS/summary.md (with the claim's direct
   test — SAM on A, B against SAM on W at ρ = 0.1 —, the accuracy and robustness tests and the probe
   summary), FIGURES/digits-exact-lora-vs-merged.{png,pdf}, and the
   study's index RESULTS/../report.md (landscape.study.report.write_index).
"""
from __future__ import annotations

import sys
from pathlib import Path

from flatlora.cli import ArgumentParser, command_line, fail
from landscape.study.report import write_index
from landscape.study.exact import SETTINGS, STAGES, STEPS, ExactStudyError, run_exact_study, select_settings


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out", default="runs/exact", help="folder for the trained runs and the resumable spectra parts "
                                                       "(not committed)")
    p.add_argument("--results", default="results/study/digits-exact",
                   help="folder for spectra.csv, summary.json and summary.md (committed)")
    p.add_argument("--figures", default="figures/study", help="folder for the figure")
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(10)),
                   help="seeds of every setting (a seed pairs data order and initialisation across methods)")
    methods = list(dict.fromkeys(s.method for s in SETTINGS))
    p.add_argument("--methods", nargs="+", choices=methods, default=methods,
                   help="train and measure only these methods, each with all its settings; 'lora' is needed for "
                        "the eigenvalue thresholds")
    p.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per run (batch 64)")
    p.add_argument("--stage", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run, in order")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.steps < 1:
        fail(f"--steps must be >= 1, got {a.steps}")
    if "spectra" in a.stage and "lora" not in a.methods:
        fail("the eigenvalue thresholds are 1 % of plain LoRA's median λ₁: add 'lora' to --methods")
    command = command_line("exact_study.py", argv)
    try:
        run_exact_study(Path(a.out), Path(a.results), Path(a.figures), settings=select_settings(a.methods),
                        seeds=a.seeds, steps=a.steps, stages=a.stage, progress=not a.no_progress,
                        command=command.strip())
        if "report" in a.stage:
            print(f"report: {Path(a.results) / 'summary.md'}; index: {write_index(Path(a.results).parent)}")
    except ExactStudyError as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
