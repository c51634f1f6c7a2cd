"""The settings sweep (landscape.study.sweep) on digits-mlp: each run's λ₁ in its own space (the
balanced LoRA space, or merged for SAM on W) and in the merged space, resumable parts, the summary
against LoRA with the same seed, and the choice per method."""
import numpy as np
import pandas as pd
import pytest

from landscape.study import sweep
from landscape.study.exact import Setting

SETTINGS = [Setting("lora"), Setting("sam-lora", rho=0.01), Setting("sam-lora", rho=0.1), Setting("sam-full", rho=0.05)]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    import helpers
    from flatlora import TASKS

    out = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        helpers.digits_task()
        mp.setitem(TASKS, "digits-mlp", helpers.digits_task)
        sweep.train_sweep(out, SETTINGS, seeds=(0, 1), task="digits-mlp", steps=6, lr=1e-2, task_options={},
                          progress=False)
        table = sweep.sweep_table(out, SETTINGS, seeds=(0, 1), task="digits-mlp", examples=64)
        yield out, table


def test_each_run_is_measured_in_its_own_space_and_in_merged(swept):
    _, table = swept
    assert len(table) == 8 and set(table["own_space"]) == {"lora-balanced", "merged"}
    own = np.where(table["method"] == "sam-full", table["lambda_merged"], table["lambda_lora-balanced"])
    np.testing.assert_array_equal(table["lambda_own"], own)
    assert (table["lambda_own"] > 0).all() and table["val_accuracy"].between(0, 1).all()


def test_the_sweep_reuses_its_parts(swept, monkeypatch):
    out, table = swept
    monkeypatch.setattr(sweep, "_lambda_max", lambda *a: pytest.fail("recomputed a finished part"))
    again = sweep.sweep_table(out, SETTINGS, seeds=(0, 1), task="digits-mlp", examples=64)
    pd.testing.assert_frame_equal(again, table)


def test_summary_ratios_pair_seeds_and_choose_picks_per_method(swept, tmp_path):
    _, table = swept
    summary = sweep.summarize(table).set_index("setting")
    assert summary.loc["lora", "own_ratio_to_lora"] == pytest.approx(1.0)
    lora = table[table["method"] == "lora"].set_index("seed")
    g = table[table["setting"] == "sam-full-rho0.05"].set_index("seed")
    expected = np.exp(np.mean(np.log(g["lambda_merged"] / lora["lambda_merged"])))
    assert summary.loc["sam-full-rho0.05", "own_ratio_to_lora"] == pytest.approx(expected, rel=1e-12)
    chosen = sweep.write_sweep_report(table, tmp_path, "test").set_index("method")
    assert list(chosen.index) == ["sam-lora", "sam-full"]
    sam = summary[summary["method"] == "sam-lora"]
    assert chosen.loc["sam-lora", "best_validation"] == sam["val_accuracy"].idxmax()
    assert chosen.loc["sam-lora", "flattest_own_space"] == sam["own_ratio_to_lora"].idxmin()
    assert (tmp_path / "sweep.csv").exists() and "## The settings the comparison uses" in (tmp_path / "summary.md").read_text()
