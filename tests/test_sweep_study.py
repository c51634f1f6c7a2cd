"""The settings sweep (landscape.study.sweep) on digits-mlp: each run's λ₁ in its own space (the
balanced LoRA space, or merged for SAM on W) and in the merged space, resumable parts, the summary
against LoRA with the same seed, and the choice per method; the check that Flat-LoRA's noise moves the gradient (noise_check)."""
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
    assert summary.loc["lora", ["ratio_lora-balanced", "ratio_merged"]].tolist() == pytest.approx([1.0, 1.0])
    lora = table[table["method"] == "lora"].set_index("seed")
    g = table[table["setting"] == "sam-full-rho0.05"].set_index("seed")
    expected = np.exp(np.mean(np.log(g["lambda_merged"] / lora["lambda_merged"])))
    assert summary.loc["sam-full-rho0.05", "ratio_merged"] == pytest.approx(expected, rel=1e-12)
    chosen = sweep.write_sweep_report(table, tmp_path / "new", "test").set_index("method")
    assert list(chosen.index) == ["sam-lora", "sam-full"]
    sam = summary[summary["method"] == "sam-lora"]
    assert chosen.loc["sam-lora", "best_validation"] == sam["val_accuracy"].idxmax()
    assert chosen.loc["sam-lora", "flattest_own_space"] == sam["ratio_lora-balanced"].idxmin()  # its own space
    assert (tmp_path / "new" / "sweep.csv").exists()
    assert "## The settings the comparison uses" in (tmp_path / "new" / "summary.md").read_text()


def test_the_noise_check_stage_writes_every_sigma_and_names_its_run(swept, tmp_path):
    import json

    from landscape.study.pipeline import run_fingerprint

    out, _ = swept
    rows = sweep.noise_check(out, tmp_path / "new", "test", task="digits-mlp")
    assert sorted(rows["sigma"].unique()) == [0.05, 0.1, 0.2] and len(rows) == 3 * sweep.NOISE_BATCHES
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "new" / "noise_check.csv"), rows)
    meta = json.loads((tmp_path / "new" / "noise_check.json").read_text())
    assert meta["run"] == "lora-s0" and meta["run_files"] == run_fingerprint(out / "digits-mlp" / "lora-s0")
    with pytest.raises(FileNotFoundError, match="plain-LoRA run"):
        sweep.noise_check(out, tmp_path, "test", seed=7, task="digits-mlp")


def test_the_sweep_report_quotes_the_noise_check_means_per_sigma(swept, tmp_path):
    out, table = swept
    rows = sweep.noise_check(out, tmp_path, "test", task="digits-mlp")
    sweep.write_sweep_report(table, tmp_path, "test")
    text = (tmp_path / "summary.md").read_text()
    means = rows.groupby("sigma")["noise_change"].mean()
    assert "## Does the noise do anything? (the noise check)" in text
    assert all(f"| {sigma:.3g} | {change:.3g} |" in text for sigma, change in means.items())


def test_the_noise_check_measures_the_gradient_change_of_one_draw(linear_lora):
    """On a small LoRA model: the noise change grows with σ, linearly at small σ; the batch change
    does not depend on σ and equals the one computed here; the model is left bit for bit."""
    import torch

    from flatlora import batch_loss
    from landscape.study.noise_check import noise_gradient_effect

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(3)]
    before = {n: p.clone() for n, p in linear_lora.state_dict().items()}
    rows = noise_gradient_effect(linear_lora, batches, [0.01, 0.02, 0.2])
    assert all(torch.equal(before[n], p) for n, p in linear_lora.state_dict().items())
    change = rows.groupby("sigma")["noise_change"].mean()
    assert change[0.01] < change[0.02] < change[0.2] and change[0.02] / change[0.01] == pytest.approx(2, rel=0.1)
    assert rows.groupby("batch")["batch_change"].nunique().eq(1).all()
    from flatlora import lora_layers

    params = [p for v in lora_layers(linear_lora) for p in (v.lora_A_param, v.lora_B_param)]
    grads = [torch.cat([t.reshape(-1) for t in torch.autograd.grad(batch_loss(linear_lora.eval(), b), params)])
             for b in batches]
    assert rows.loc[0, "batch_change"] == pytest.approx(float((grads[1] - grads[0]).norm() / grads[0].norm()), rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 batches"):
        noise_gradient_effect(linear_lora, batches[:1], [0.1])
    linear_lora.requires_grad_(False)  # as load_run returns a run: the factors are found all the same
    frozen = noise_gradient_effect(linear_lora, batches, [0.01, 0.02, 0.2])
    pd.testing.assert_frame_equal(frozen, rows)
    assert not any(p.requires_grad for p in linear_lora.parameters())


def test_the_sweep_report_correlates_the_two_spaces_across_runs(swept, tmp_path):
    from scipy import stats

    _, table = swept
    sweep.write_sweep_report(table, tmp_path, "test")
    rho = stats.spearmanr(table["lambda_lora-balanced"], table["lambda_merged"]).statistic
    assert f"across the {len(table)} runs (every setting and seed): Spearman ρ = {rho:.3g} [" in (
        tmp_path / "summary.md").read_text()


def test_the_sweep_report_draws_one_point_per_run_and_links_it(swept, tmp_path):
    _, table = swept
    sweep.write_sweep_report(table, tmp_path / "results", "test", figures=tmp_path / "fig", task="digits-mlp")
    fig = sweep.fig_sweep(table, "digits-mlp")
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections) == len(table)
    assert "![digits-mlp-sweep](../fig/digits-mlp-sweep.png)" in (tmp_path / "results" / "summary.md").read_text()
