#!/usr/bin/env python
"""`make demo`: the contrast that carries the study's result (README, "Results"), in about a minute.

LoRA, Flat-LoRA (σ = 0.2, constant schedule), SAM on the LoRA factors A, B (ρ = 0.1) and SAM on the
merged weights W (ρ = 0.1) — the settings of the studies that change the landscape most — are
trained on digits-mlp for 3 seeds each, and each run's top Hessian eigenvalue λ₁ is measured in the
balanced LoRA space, the tangent space (what LoRA can move), the normal space (what it cannot) and
the merged space. The table gives, per method and space, the geometric mean of λ₁ over seeds and its
ratio to LoRA's with the same seed; then the claim's direct test, SAM on A, B's λ₁ over SAM on W's
with the same seed (:func:`landscape.study.report.claim_contrast`). On digits Flat-LoRA and SAM on W
lower the normal and merged λ₁ more than the LoRA-space λ₁, and SAM on A, B lowers both spaces
about alike: the mismatch that MiniLM shows (README, "What the data say") is faint there (the digits
study's direct test: gap ratio about three quarters, against a twentieth on rt-minilm).

    .venv/bin/python analysis_scripts/demo.py [--seeds 0 1 2] [--out runs/demo]
    .venv/bin/python analysis_scripts/demo.py --task rt-minilm --steps 200 --seeds 0   # the same on MiniLM (~20 min)

Finished runs and probes under --out are reused, so a second `make demo` only prints.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from flatlora import distributed, get_task
from flatlora.cli import ArgumentParser, fail
from flatlora.io import atomic_write_text
from landscape.plot import save_figure
from landscape.study.exact import Setting, run_path, train_runs
from landscape.study.figures import fig_eigenvalues
from landscape.study.pipeline import probe_runs
from landscape.study.report import claim_contrast, collect_metrics, effects_display, markdown_table, paired_log_ratio
from landscape.study.suite import ProbeSettings

SETTINGS = (Setting("lora"), Setting("flat-lora", sigma=0.2, schedule="constant"), Setting("sam-lora", rho=0.1),
            Setting("sam-full", rho=0.1))
SPACES = ("lora-balanced", "tangent", "normal", "merged")
PROBES = ProbeSettings(spaces=SPACES, eig_tol=1e-3, sigmas=(0.05,), noise_max_samples=8, rhos=(0.05,),
                       worst_case_steps=1, num_directions=1, alphas=5)
#: per task: optimizer steps (digits: as in the study), the probed split, its examples (None: all) and the batch size
#: (None: all in one batch, as the digits study's spectra)
TASKS = {"digits-mlp": (1200, "train", None, None), "rt-minilm": (200, "validation", 128, 32),
         "r8-minilm": (200, "validation", 128, 32)}


def contrast_table(probes: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Per method: test accuracy (mean over seeds), and per space λ₁ — geometric mean over seeds and
    the geometric-mean ratio to LoRA's with the same seed (:func:`paired_log_ratio`)."""
    lam = probes[(probes["measure"] == "eigenvalue") & (probes["x"] == 1)].pivot_table(
        index="seed", columns=["method", "space"], values="value")
    rows = []
    for s in SETTINGS:
        row = {"method": s.name, "seeds": int(metrics["method"].eq(s.method).sum()),
               "test accuracy": metrics.loc[metrics["method"] == s.method, "accuracy"].mean()}
        for sp in SPACES:
            x, base = lam[(s.method, sp)].dropna(), lam[("lora", sp)]
            row[f"λ₁ {sp}"] = float(np.exp(np.log(x).mean()))
            row[f"÷ LoRA {sp}"] = paired_log_ratio(x, base.reindex(x.index))["ratio"]
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--task", default="digits-mlp", choices=sorted(TASKS), help="the task")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of each method")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: 1,200 on digits, 200 on MiniLM)")
    p.add_argument("--out", default="runs/demo", help="folder for the runs, the table and the figure")
    a = p.parse_args(argv)
    steps, split, examples, batch_size = TASKS[a.task]
    steps = a.steps or steps
    if steps < 1:
        fail(f"--steps must be >= 1, got {steps}")
    distributed.ensure_initialized()  # under torchrun: join the process group
    out = Path(a.out)
    if distributed.is_main():
        print(f"[demo] {', '.join(s.name for s in SETTINGS)} on {a.task}, seeds {a.seeds}, {steps} steps each → {out}",
              flush=True)
    train_runs(out, SETTINGS, a.seeds, steps, progress=distributed.is_main(), task=a.task)
    runs = [run_path(out, s, seed, a.task) for s in SETTINGS for seed in a.seeds]
    examples = examples or len(get_task(a.task).splits[split])
    if distributed.is_main():
        print(f"[demo] λ₁ of every run in the {', '.join(SPACES)} spaces ({examples} {split} examples)", flush=True)
    probes, _ = probe_runs(runs, out / "probes.csv", PROBES, split, examples, batch_size or examples,
                           progress=distributed.is_main())
    if not distributed.is_main():  # under torchrun: rank 0 writes and prints
        return 0
    table = contrast_table(probes, collect_metrics(runs))
    direct = effects_display(claim_contrast(probes), ["effect"]).drop(columns="p_holm")
    atomic_write_text(out / "demo-table.md", markdown_table(table, floatfmt=".3g") + "\n\n"
                      + markdown_table(direct, floatfmt=".3g") + "\n")
    figure = save_figure(fig_eigenvalues(probes, task=a.task), out / "demo-eigenvalues")
    print()
    print(table.set_index("method").T.to_string(float_format=lambda v: f"{v:.3g}"))
    print("\n[demo] ÷ LoRA: λ₁ over plain LoRA's with the same seed (geometric mean); below 1 is flatter.")
    print("\n[demo] the claim's direct test: SAM on A, B's λ₁ over SAM on W's with the same seed, with its 95 % "
          "interval and paired t-test p (above 1: SAM on A, B is the sharper)")
    print(direct.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print("\n[demo] The studies' numbers, with intervals and tests, are in the README's Results.")
    print(f"[demo] table:  {(out / 'demo-table.md').resolve()}")
    print(f"[demo] figure: {figure[0].resolve()}")
    print(f"[demo] runs, adapters and metrics: {out.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
