"""Probes on 2 CPU processes (``torchrun --nproc_per_node 2``, gloo) give the numbers of one process.

helpers.run_probes runs every probe on a digits LoRA model: once in this process (conftest's
``distributed_checks``) and once on each rank of the suite's one torchrun launch
(tests/dist_worker.py), and every rank's results are compared with the single process's. A shard
file of partial results, left as by an interrupted run, is resumed. The same launch runs the probe
script as is.
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd

from flatlora.io import read_json
from helpers import SENTINEL, one_thread, run_script

ROOT = Path(__file__).resolve().parents[1]


def probe_results(checks):
    """(single process, [rank 0, rank 1], the marked shard row, the single process's folder, the ranks' folder)."""
    return (checks["probes_single"], checks["probes_ranks"], checks["marked"], checks["probes_one_dir"],
            checks["probes_dir"])


def _close_frames(a: pd.DataFrame, b: pd.DataFrame, rtol=1e-5, atol=1e-6):
    assert list(a.columns) == list(b.columns) and a.shape == b.shape
    num = [c for c in a.columns if pd.api.types.is_numeric_dtype(a[c])]
    np.testing.assert_allclose(a[num].to_numpy(float), b[num].to_numpy(float), rtol=rtol, atol=atol)
    others = [c for c in a.columns if c not in num]
    assert a[others].equals(b[others])


def test_two_ranks_equal_one_process(distributed_checks):
    single, ranks, _, _, _ = probe_results(distributed_checks)
    assert single["world_size"] == 1
    for res in ranks:
        assert res["world_size"] == 2
        assert res["unchanged"] and single["unchanged"]  # probes leave the model bit-identical
        for key in ("plane", "noise", "worst"):
            _close_frames(single[key], res[key])
        _close_frames(single["density"], res["density"], rtol=1e-4, atol=1e-4)  # SLQ: 8 Lanczos steps
        np.testing.assert_allclose(res["eig"], single["eig"], rtol=1e-6)
        np.testing.assert_allclose(res["power"], single["power"], rtol=1e-5)
        for key in ("hutchinson", "hutch++"):
            np.testing.assert_allclose(res[key][:2], single[key][:2], rtol=1e-6)
            assert res[key][2] == single[key][2]  # every product counted once
    # expected loss stopped at the same sample count for every σ (stopping rule on the gathered, ordered samples)
    assert list(ranks[0]["noise"]["samples"]) == list(single["noise"]["samples"])


def test_interrupted_shard_resumes_and_files_are_joined(distributed_checks):
    single, ranks, marked, one, two = probe_results(distributed_checks)
    for res in ranks:  # the marked point came from the shard file, not from a new evaluation
        line = res["line"]
        hit = line[(line["direction"] == marked["direction"]) & np.isclose(line["alpha"], marked["alpha"])]
        assert hit["loss"].tolist() == [SENTINEL]
        rest = line.index != hit.index[0]
        _close_frames(single["line"][rest].reset_index(drop=True), line[rest].reset_index(drop=True))
    # rank 0 wrote the whole results file; the shard files are gone
    assert sorted(p.name for p in two.glob("*.json")) == ["line.json", "plane.json"]
    joined, alone = read_json(two / "plane.json"), read_json(one / "plane.json")
    assert joined["meta"] == alone["meta"]
    key = lambda r: (r["direction"], r["alpha"], r["beta"])  # noqa: E731
    assert sorted(map(key, joined["rows"])) == sorted(map(key, alone["rows"]))


def test_probe_script_runs_unchanged_under_torchrun(distributed_checks, shared_digits_pretraining):
    """analysis_scripts/probe.py on a finished digits run (conftest's ``digits_flat_lora_run``): run
    as ``__main__`` on each rank of the launch (tests/dist_worker.py's PROBE_SCRIPT → two.csv), and
    here in one process (→ one.csv)."""
    root = distributed_checks["root"]
    out = root / "probe-script"
    args = [ROOT / "analysis_scripts" / "probe.py", root / "runs" / "flat-lora-s0", "--spaces", "lora", "merged",
            "--examples", "96", "--directions", "2", "--alphas", "5", "--noise-samples", "8"]
    with one_thread():  # as each rank ran
        done = run_script(*args, "--out", out / "one.csv")
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = pd.read_csv(out / "one.csv"), pd.read_csv(out / "two.csv")
    _close_frames(one.drop(columns=["seconds"]), two.drop(columns=["seconds"]), rtol=1e-5, atol=1e-5)
    assert json.loads((out / "two-manifest.json").read_text())["world_size"] == 2
    assert not list(out.glob("*.rank*"))
