"""Probes on 2 CPU processes (``torchrun --nproc_per_node 2``, gloo) give the numbers of one process.

tests/dist_probe_worker.py runs every probe on a digits LoRA model and pickles the results; it is
run once in one process and once under torchrun, and every rank's results are compared with the
single process's. A shard file of partial results, left as by an interrupted run, is resumed.
"""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flatlora.io import atomic_write_json, read_json

ROOT = Path(__file__).resolve().parents[1]
SENTINEL = 12345.0


def launch(args, nproc=None, timeout=600):
    """Run a script in one process (``nproc=None``) or under torchrun on ``nproc`` CPU processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    head = [sys.executable] if nproc is None else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={nproc}"]
    done = subprocess.run(head + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@pytest.fixture(scope="module")
def probe_results(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    launch([ROOT / "tests" / "dist_probe_worker.py", one])
    # an interrupted 2-rank line probe: rank 1 had finished its points, one of them marked
    saved = read_json(one / "line.json")
    rows = [r for i, r in enumerate(saved["rows"]) if i % 2 == 1]
    rows[0] = {**rows[0], "loss": SENTINEL}
    atomic_write_json(two / "line.rank1-of-2.json", {"meta": saved["meta"], "rows": rows})
    launch([ROOT / "tests" / "dist_probe_worker.py", two], nproc=2)
    single = pickle.loads((one / "rank0.pkl").read_bytes())
    ranks = [pickle.loads((two / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    return single, ranks, rows[0], one, two


def _close_frames(a: pd.DataFrame, b: pd.DataFrame, rtol=1e-5, atol=1e-6):
    assert list(a.columns) == list(b.columns) and a.shape == b.shape
    num = [c for c in a.columns if pd.api.types.is_numeric_dtype(a[c])]
    np.testing.assert_allclose(a[num].to_numpy(float), b[num].to_numpy(float), rtol=rtol, atol=atol)
    others = [c for c in a.columns if c not in num]
    assert a[others].equals(b[others])


def test_two_ranks_equal_one_process(probe_results):
    single, ranks, _, _, _ = probe_results
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


def test_interrupted_shard_resumes_and_files_are_joined(probe_results):
    single, ranks, marked, one, two = probe_results
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


def test_probe_script_runs_unchanged_under_torchrun(tmp_path):
    from flatlora import TrainConfig, run

    run(TrainConfig(task="digits-mlp", method="lora", steps=20, seed=0), tmp_path / "runs" / "lora-s0", progress=False)
    args = [ROOT / "analysis_scripts" / "probe.py", tmp_path / "runs" / "lora-s0", "--spaces", "lora", "merged",
            "--examples", "96", "--directions", "2", "--alphas", "5", "--noise-samples", "8"]
    launch(args + ["--out", tmp_path / "one.csv"])
    launch(args + ["--out", tmp_path / "two.csv"], nproc=2)
    one, two = pd.read_csv(tmp_path / "one.csv"), pd.read_csv(tmp_path / "two.csv")
    _close_frames(one.drop(columns=["seconds"]), two.drop(columns=["seconds"]), rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "two-manifest.json").read_text())["world_size"] == 2
    assert not list(tmp_path.glob("*.rank*"))
