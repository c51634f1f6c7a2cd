"""The settings sweep (landscape.study.sweep) on digits-mlp: each run's λ₁ in its own space (the
balanced LoRA space, or merged for SAM on W) and in the merged space, committed units that a new
machine builds the report from, the summary and the paired effects against LoRA with the same seed,
and the choice per method; the check that Flat-LoRA's noise moves the gradient (noise_check)."""
import json

import numpy as np
import pandas as pd
import pytest

from landscape.study import sweep
from landscape.study.exact import ExactStudyError, Setting

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
        table = sweep.sweep_table(out, SETTINGS, seeds=(0, 1), units=out / "units", task="digits-mlp", examples=64)
        yield out, table


def test_each_run_is_measured_in_its_own_space_and_in_merged(swept):
    _, table = swept
    assert len(table) == 8 and set(table["own_space"]) == {"lora-balanced", "merged"}
    own = np.where(table["method"] == "sam-full", table["lambda_merged"], table["lambda_lora-balanced"])
    np.testing.assert_array_equal(table["lambda_own"], own)
    assert (table["lambda_own"] > 0).all() and table["val_accuracy"].between(0, 1).all()


def test_the_sweep_reuses_its_units(swept, monkeypatch):
    out, table = swept
    monkeypatch.setattr(sweep, "_lambda_max", lambda *a: pytest.fail("measured a finished unit again"))
    again = sweep.sweep_table(out, SETTINGS, seeds=(0, 1), units=out / "units", task="digits-mlp", examples=64)
    pd.testing.assert_frame_equal(again, table)


def test_a_unit_is_a_portable_run_and_the_table_is_built_from_units_alone(swept, tmp_path, monkeypatch):
    """On a new machine (no OUT) the units give the same table without measuring anything, and each
    unit is a run folder that load_run reads, with the run's content hashes."""
    from flatlora import load_run
    from landscape.study.pipeline import run_fingerprint

    out, table = swept
    unit = out / "units" / "sam-lora-rho0.1-s1"
    local = out / "digits-mlp" / "sam-lora-rho0.1-s1"
    assert (unit / "adapter" / "adapter_model.safetensors").read_bytes() == (
        local / "adapter" / "adapter_model.safetensors").read_bytes()
    assert json.loads((unit / sweep.UNIT_ROW).read_text())["files"] == run_fingerprint(unit)
    assert not (unit / "checkpoint.pt").exists()
    load_run(unit)
    monkeypatch.setattr(sweep, "_lambda_max", lambda *a: pytest.fail("measured a unit whose run and settings match"))
    alone = sweep.sweep_table(tmp_path / "new-machine", SETTINGS, seeds=(0, 1), units=out / "units",
                              task="digits-mlp", examples=64)
    pd.testing.assert_frame_equal(alone, table)


def test_other_probe_settings_measure_the_unit_again(swept, tmp_path):
    import shutil

    out, table = swept
    units = tmp_path / "units"
    shutil.copytree(out / "units" / "lora-s0", units / "lora-s0")
    again = sweep.sweep_table(tmp_path / "new-machine", SETTINGS[:1], seeds=(0,), units=units, task="digits-mlp",
                              examples=32)
    assert again.loc[0, "lambda_merged"] != table.loc[0, "lambda_merged"]  # 32 examples, not 64
    assert json.loads((units / "lora-s0" / sweep.UNIT_ROW).read_text())["probe"]["examples"] == 32


def test_a_row_whose_run_was_not_kept_is_refused_under_other_probe_settings(swept, tmp_path):
    out, _ = swept
    units = tmp_path / "units"
    (units / "lora-s0").mkdir(parents=True)
    (units / "lora-s0" / sweep.UNIT_ROW).write_text((out / "units" / "lora-s0" / sweep.UNIT_ROW).read_text())
    kept = sweep.sweep_table(tmp_path, SETTINGS[:1], seeds=(0,), units=units, task="digits-mlp", examples=64)
    assert len(kept) == 1
    with pytest.raises(ExactStudyError, match="its run is not kept"):
        sweep.sweep_table(tmp_path, SETTINGS[:1], seeds=(0,), units=units, task="digits-mlp", examples=32)


def test_publish_run_refuses_an_unfinished_run(tmp_path):
    from landscape.study.pipeline import publish_run

    with pytest.raises(FileNotFoundError, match="no finished run"):
        publish_run(tmp_path, tmp_path / "unit")
    assert not (tmp_path / "unit").exists()


def test_paired_effects_match_scipy_paired_t_tests(swept):
    from scipy import stats

    _, table = swept
    effects = sweep.paired_effects(table).set_index(["setting", "effect"])
    assert set(effects.index.get_level_values("setting")) == {s.name for s in SETTINGS[1:]}
    lora = table[table["setting"] == "lora"].set_index("seed")
    g = table[table["setting"] == "sam-lora-rho0.1"].set_index("seed")
    log_gap = np.log(g["lambda_lora-balanced"] / g["lambda_merged"]) - np.log(
        lora["lambda_lora-balanced"] / lora["lambda_merged"])
    gap = effects.loc[("sam-lora-rho0.1", sweep.EFFECTS["gap"])]
    assert gap["difference"] == pytest.approx(np.exp(log_gap.mean()), rel=1e-12)
    assert gap["p"] == pytest.approx(stats.ttest_1samp(log_gap, 0).pvalue, rel=1e-9)
    acc = effects.xs(sweep.EFFECTS["test_accuracy"], level="effect")
    p = [stats.ttest_rel(table[table["setting"] == s].set_index("seed")["test_accuracy"], lora["test_accuracy"]).pvalue
         for s in acc.index]
    np.testing.assert_allclose(acc["p"], p, rtol=1e-9)
    np.testing.assert_allclose(acc["p_holm"], np.minimum(1, np.maximum.accumulate(
        np.sort(p) * (len(p) - np.arange(len(p)))))[np.argsort(np.argsort(p))], rtol=1e-9)


def test_within_setting_correlations_are_spearman_within_each_setting():
    from scipy import stats

    from landscape.study.report import spearman_test

    rng = np.random.default_rng(0)
    table = pd.DataFrame({"setting": np.repeat(["lora", "sam-lora-rho0.1"], 6), "seed": np.tile(range(6), 2),
                          "test_accuracy": rng.uniform(0.7, 0.8, 12), "lambda_lora-balanced": rng.uniform(1, 9, 12),
                          "lambda_merged": rng.uniform(10, 90, 12)})
    within = sweep.within_setting_correlations(table).set_index(["setting", "space"])
    assert len(within) == 4
    g = table[table["setting"] == "sam-lora-rho0.1"]
    expected = stats.spearmanr(g["lambda_merged"], g["test_accuracy"]).statistic
    assert within.loc[("sam-lora-rho0.1", "merged"), "rho"] == pytest.approx(expected)
    # the p of six seeds is exact (every pairing): spearman_test, checked against brute force in test_study_tools
    assert within.loc[("sam-lora-rho0.1", "merged"), "p"] == pytest.approx(spearman_test(g["lambda_merged"],
                                                                                          g["test_accuracy"])[1])
    assert sweep.within_setting_correlations(table[table["seed"] < 4]).empty  # fewer than 5 seeds


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
    text = (tmp_path / "new" / "summary.md").read_text()
    assert "## The settings the comparison uses" in text
    assert "## Against LoRA, paired by seed" in text and "| sam-full-rho0.05 | merged λ₁ ÷ LoRA's | 2 |" in text


def test_the_noise_check_stage_writes_every_sigma_and_names_its_run(swept, tmp_path):
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
    assert len(fig.axes[1].containers) == 2 * (table["setting"].nunique() - 1)  # both spaces of each setting
    assert len(sweep.fig_sweep(table[table["seed"] == 0], "digits-mlp").axes) == 1  # one seed: no ratio panel
    assert "![digits-mlp-sweep](../fig/digits-mlp-sweep.png)" in (tmp_path / "results" / "summary.md").read_text()


def test_the_seeds_phrase_counts_settings_per_number_of_seeds():
    """Titles state the real number of seeds (issue 14.8): settings grouped by how many seeds ran."""
    table = pd.DataFrame({"setting": ["lora"] * 5 + ["a"] * 5 + ["b", "c"], "seed": [0, 1, 2, 3, 4] * 2 + [0, 0]})
    assert sweep.seeds_phrase(table) == "2 settings × 5 seeds, 2 × 1 seed"
    assert sweep.seeds_phrase(table[table["setting"] == "b"]) == "1 setting × 1 seed"


def test_nearby_points_share_one_label_and_every_setting_is_named():
    """The scatter's labels do not pile up: points within 0.08 decades share a label; none is lost."""
    runs = pd.DataFrame({"setting": ["lora", "flat-lora-a", "flat-lora-b", "sam-lora-c"],
                         "method": ["lora", "flat-lora", "flat-lora", "sam-lora"],
                         "lambda_lora-balanced": [20.0, 21.0, 10.0, 5.0], "lambda_merged": [100.0, 98.0, 99.0, 50.0]})
    groups = sweep.label_groups(runs)
    assert groups == [((20.0, 100.0), ["lora", "flat-lora a"]), ((10.0, 99.0), ["flat-lora b"]),
                      ((5.0, 50.0), ["sam-lora c"])]
