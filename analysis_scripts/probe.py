#!/usr/bin/env python
"""Probe trained runs, or LoRA adapters trained anywhere: the sharpness suite in several spaces → a
tidy CSV and a JSON manifest.

    flatlora-probe runs/rt/lora-s0 runs/rt/flat-lora-s0 --out results/probes.csv
    flatlora-probe --base-model MODEL_DIR --adapter ADAPTER_DIR [--adapter …] --data test.csv \
        --text-column text --label-column label --out probes.csv

(``flatlora-probe`` is ``python analysis_scripts/probe.py``.) The second form loads peft adapters
saved with ``save_pretrained`` on a local Hugging Face model folder (an adapter that does not fit
it is an error) and probes them all on the same batches of a CSV or JSON-lines file; labels are
class ids, or names listed in a labels.json beside the adapter.

For every run (a folder written by train.py) the same fixed batches of the validation split are used
(paired comparisons). Measures per space: top Hessian eigenvalue(s), trace (``--trace-samples``),
expected loss increase on a σ grid (Flat-LoRA filter noise), worst-case sharpness, and the loss
along K filter-normalized directions. Each run's results are kept in OUT.parts/ as they finish,
keyed by the run's path and fingerprinted by its files and every probe setting, so an interrupted
probe resumes and a changed run or setting is probed again; the CSV (and OUT-curves.csv, and
OUT-manifest.json) are written atomically at the end.

Under ``torchrun --nproc_per_node N`` the same command splits each probe's work over N processes
(grid points, noise samples, Hessian products — see README "Several processes"); rank 0 writes.
"""
from __future__ import annotations

import json
import sys
from argparse import BooleanOptionalAction
from pathlib import Path

from flatlora.cli import ArgumentParser, command_line, fail
from flatlora import distributed
from flatlora.io import atomic_write_json
from landscape.study.pipeline import manifest, probe_adapters, probe_runs
from landscape.study.suite import ProbeSettings, positive_int


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("runs", nargs="*", help="run folders written by train.py")
    p.add_argument("--out", required=True, help="CSV of measures (curves go to OUT-curves.csv)")
    own = p.add_argument_group("adapters trained anywhere (instead of run folders)")
    own.add_argument("--base-model", help="a local Hugging Face model folder the adapters were trained on")
    own.add_argument("--adapter", action="append", default=[], help="a peft adapter folder (repeat for several)")
    own.add_argument("--data", help="a CSV or JSON-lines file of examples to probe on")
    own.add_argument("--text-column", default="text", help="the data's text column")
    own.add_argument("--label-column", default="label", help="the data's label column")
    own.add_argument("--max-length", type=positive_int, default=128, help="tokens kept per text")
    ProbeSettings.add_arguments(p)
    p.add_argument("--progress", action=BooleanOptionalAction, default=sys.stderr.isatty(),
                   help="progress bars (default here: %(default)s — on when stderr is a terminal)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    distributed.ensure_initialized()  # under torchrun: join the process group
    out = Path(a.out)
    try:
        settings = ProbeSettings.from_arguments(a)
    except ValueError as e:
        fail(str(e))
    own = a.base_model or a.adapter or a.data
    if a.runs and own:
        fail("give run folders, or --base-model/--adapter/--data, not both")
    if not a.runs and not own:
        fail("give run folders written by train.py, or --base-model DIR --adapter DIR --data FILE")
    if own and not (a.base_model and a.adapter and a.data):
        fail("probing adapters needs all of --base-model, --adapter and --data")
    for r in a.runs:
        if not (Path(r) / "metrics.json").exists():
            fail(f"{r} holds no finished run (no metrics.json): train it with train.py, or pass another folder")
    for path, what in [(a.base_model, "--base-model"), *((x, "--adapter") for x in a.adapter), (a.data, "--data")]:
        if own and not Path(path).exists():
            fail(f"{what} {path} does not exist")
    if out.is_dir():
        fail(f"--out {out} is a folder: name a CSV file, e.g. {out / 'probes.csv'}")
    if a.runs:
        probe_runs(a.runs, out, settings, a.split, a.examples, a.batch_size, a.progress)
    else:
        try:
            probe_adapters(a.base_model, a.adapter, a.data, out, settings, text_column=a.text_column,
                           label_column=a.label_column, examples=a.examples, batch_size=a.batch_size,
                           max_length=a.max_length, progress=a.progress)
        except ValueError as e:  # an adapter that does not fit the base model, a bad data file
            fail(str(e))
    if distributed.is_main():
        made = manifest(settings, a.runs or a.adapter, out, "data" if own else a.split, a.examples, a.batch_size,
                        command_line("probe.py", argv))
        atomic_write_json(out.with_name(out.stem + "-manifest.json"), made)
        print(json.dumps({"measures": str(out), "curves": str(out.with_name(out.stem + "-curves.csv"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
