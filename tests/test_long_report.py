"""The long runs' report sections (landscape.study.report) on small made-up tables whose answers are
known exactly: every method against LoRA paired by seed with Holm over the whole table, the worst
case beside its first-order term, ΔL with its Monte-Carlo interval, λ₁ against accuracy within each
method, one space against another across runs, and what one seed shows ("—", never NaN)."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from landscape.study.report import (MIN_RUNS, accuracy_section, against_lora, claim_contrast, claim_section,
                                    expected_loss_section, holm, paired_effects_table, paired_tests_sections, runs_section,
                                    sharpness_section, within_method, within_method_section, worst_case_section)

T975 = {2: stats.t.ppf(0.975, 2)}  # the Student-t quantile of a 95 % interval over 3 pairs


def metrics_frame(accuracy: dict[str, list[float]]) -> pd.DataFrame:
    """One run per method × seed (seed = position in the list), F1 = accuracy, 30 s per seed + 60 s."""
    return pd.DataFrame([{"task": "t", "method": m, "seed": s, "steps": 100, "accuracy": a, "f1_weighted": a,
                          "val_accuracy": a, "majority_baseline": 0.5, "wall_time_s": 60.0 + 30 * s}
                         for m, accs in accuracy.items() for s, a in enumerate(accs)])


def eigen_frame(lam: dict[tuple[str, str], list[float]]) -> pd.DataFrame:
    """Probe rows of λ₁ (measure eigenvalue, x = 1) per (method, space), one per seed."""
    return pd.DataFrame([{"task": "t", "method": m, "seed": s, "space": sp, "measure": "eigenvalue", "x": 1.0,
                          "value": v, "err": np.nan} for (m, sp), vs in lam.items() for s, v in enumerate(vs)])


def test_accuracy_against_lora_is_the_mean_paired_difference_with_its_t_interval():
    """Flat-LoRA = LoRA + (0.01, 0.02, 0.03) seed by seed: d̄ = 0.02, sd(d) = 0.01."""
    effects = against_lora(metrics_frame({"lora": [0.80, 0.70, 0.90], "flat-lora": [0.81, 0.72, 0.93]}))
    row = effects.set_index("effect").loc["test accuracy − LoRA's"]
    half = T975[2] * 0.01 / np.sqrt(3)
    assert (row["pairs"], row["difference"]) == (3, pytest.approx(0.02, rel=1e-12))
    assert (row["low"], row["high"]) == (pytest.approx(0.02 - half, rel=1e-9), pytest.approx(0.02 + half, rel=1e-9))
    assert row["p"] == pytest.approx(stats.ttest_1samp([0.01, 0.02, 0.03], 0).pvalue, rel=1e-9)


def test_lambda_against_lora_is_the_geometric_mean_ratio():
    """λ₁ = LoRA's × 0.5 × (e^0.1, 1, e^−0.1): mean log ratio log 0.5 exactly, sd 0.1."""
    lora = [10.0, 20.0, 40.0]
    probes = eigen_frame({("lora", "merged"): lora,
                          ("flat-lora", "merged"): [0.5 * v * np.exp(e) for v, e in zip(lora, (0.1, 0, -0.1))]})
    effects = against_lora(metrics_frame({"lora": [0.8] * 3, "flat-lora": [0.8] * 3}), probes)
    row = effects.set_index("effect").loc["λ₁ (merged) ÷ LoRA's"]
    half = T975[2] * 0.1 / np.sqrt(3)
    assert row["difference"] == pytest.approx(0.5, rel=1e-12)
    assert (row["low"], row["high"]) == (pytest.approx(0.5 * np.exp(-half), rel=1e-9),
                                         pytest.approx(0.5 * np.exp(half), rel=1e-9))


def test_holm_runs_over_every_comparison_of_the_task_not_within_an_effect():
    rng = np.random.default_rng(0)
    acc = {m: list(0.8 + rng.normal(0, 0.01, 4)) for m in ("lora", "flat-lora", "sam-lora")}
    probes = eigen_frame({(m, sp): list(rng.lognormal(size=4)) for m in acc for sp in ("lora-balanced", "merged")})
    effects = against_lora(metrics_frame(acc), probes)
    assert len(effects) == 2 * 4 and effects["p"].notna().all()  # 2 methods × (accuracy, F1, λ₁ × 2 spaces)
    np.testing.assert_allclose(effects["p_holm"], holm(effects["p"]), rtol=1e-12)
    assert effects["p_holm"].min() == pytest.approx(min(1.0, 8 * effects["p"].min()), rel=1e-12)


def test_full_fine_tuning_is_compared_only_in_the_merged_space():
    probes = eigen_frame({("lora", "lora-balanced"): [1.0, 2.0], ("lora", "merged"): [5.0, 6.0],
                          ("full-ft", "merged"): [7.0, 9.0]})
    effects = against_lora(metrics_frame({"lora": [0.8, 0.8], "full-ft": [0.9, 0.95]}), probes)
    assert list(effects["effect"]) == ["test accuracy − LoRA's", "weighted F1 − LoRA's", "λ₁ (merged) ÷ LoRA's"]


def test_robustness_drops_are_paired_differences():
    robust = pd.DataFrame([{"method": m, "seed": s, "kind": "typos", "level": "heavy", "drop": d}
                           for m, ds in (("lora", [0.10, 0.20]), ("flat-lora", [0.05, 0.11])) for s, d in enumerate(ds)])
    effects = against_lora(metrics_frame({"lora": [0.8, 0.8], "flat-lora": [0.8, 0.8]}), robust=robust)
    row = effects.set_index("effect").loc["accuracy drop, typos heavy − LoRA's"]
    assert row["difference"] == pytest.approx(-0.07, rel=1e-12)


def sam_pair_probes(balanced_ratio: float = 1.0, merged_ratio: float = 4.0) -> pd.DataFrame:
    """SAM on A, B and SAM on W over three seeds, with LoRA: per seed SAM on A, B's λ₁ is SAM on W's
    × ratio × (e^0.1, 1, e^−0.1) in the balanced space and × ratio exactly in the merged one."""
    w_bal, w_mer = [2.0, 3.0, 5.0], [7.0, 11.0, 13.0]
    wiggle = np.exp([0.1, 0.0, -0.1])
    return eigen_frame({("lora", "lora-balanced"): [4.0] * 3, ("lora", "merged"): [20.0] * 3,
                        ("sam-full", "lora-balanced"): w_bal, ("sam-full", "merged"): w_mer,
                        ("sam-lora", "lora-balanced"): list(balanced_ratio * np.array(w_bal) * wiggle),
                        ("sam-lora", "merged"): list(merged_ratio * np.array(w_mer))})


def test_the_claim_contrast_is_sam_on_a_b_over_sam_on_w_per_space_and_their_gap():
    """Balanced ratio 1 (× the wiggle, mean log 0), merged ratio 4: the gap ratio is 1/4 per seed
    × the wiggle, so its geometric mean is 0.25 with the wiggle's t interval."""
    contrast = claim_contrast(sam_pair_probes())
    np.testing.assert_allclose(contrast["p_holm"], holm(contrast["p"]), rtol=1e-12)  # its own family: the table
    effects = contrast.set_index("effect")
    assert set(effects["method"]) == {"sam-lora"} and (effects["pairs"] == 3).all()
    assert effects.loc["λ₁ (lora-balanced) ÷ sam-full's", "difference"] == pytest.approx(1.0, rel=1e-12)
    assert effects.loc["λ₁ (merged) ÷ sam-full's", "difference"] == pytest.approx(4.0, rel=1e-12)
    gap = effects.loc["[λ₁ (lora-balanced) ÷ λ₁ (merged)] ÷ sam-full's"]
    half = T975[2] * 0.1 / np.sqrt(3)
    assert gap["difference"] == pytest.approx(0.25, rel=1e-12)
    assert (gap["low"], gap["high"]) == (pytest.approx(0.25 * np.exp(-half), rel=1e-9),
                                         pytest.approx(0.25 * np.exp(half), rel=1e-9))
    assert gap["p"] == pytest.approx(stats.ttest_1samp(np.log(0.25) + np.array([0.1, 0.0, -0.1]), 0).pvalue, rel=1e-9)


def test_the_claim_contrast_joins_the_tasks_holm_family():
    """Against LoRA: accuracy, F1, λ₁ × 2 spaces for two methods (8 rows); the contrast 3 rows (the
    merged ratio is 4 at every seed, so it has no p): one Holm family of the rows with a p, which
    adjusts the gap's p more than the contrast's own family of two does."""
    rng = np.random.default_rng(1)
    metrics = metrics_frame({m: list(0.8 + rng.normal(0, 0.01, 3)) for m in ("lora", "sam-lora", "sam-full")})
    probes = sam_pair_probes(merged_ratio=4.0)
    text = "\n".join(paired_tests_sections(metrics, probes))
    contrast = claim_contrast(probes)
    ps = pd.concat([against_lora(metrics, probes)["p"], contrast["p"]], ignore_index=True)
    family = holm(ps)
    gap_p = family[len(ps) - 1]
    assert "### The claim's direct test: sam-lora against sam-full, paired by seed" in text
    assert f"{ps.notna().sum()} of its {len(ps)} comparisons have a p." in text
    gap_row = next(line for line in text.split("The claim's direct test")[1].splitlines()
                   if line.startswith("| [λ₁ (lora-balanced) ÷ λ₁ (merged)]"))
    assert gap_row.endswith(f"| {gap_p:.3g} |")
    assert gap_p > contrast["p_holm"].iloc[-1]  # the larger family adjusts more


def test_without_both_sam_methods_there_is_no_contrast_section():
    probes = eigen_frame({(m, "merged"): [1.0, 2.0] for m in ("lora", "sam-lora")})
    assert claim_contrast(probes).empty and claim_contrast(None).empty
    assert "The claim's direct test" not in "\n".join(paired_tests_sections(metrics_frame({"lora": [0.8] * 2,
                                                                                         "sam-lora": [0.8] * 2}), probes))


def test_log_effects_leave_out_runs_without_a_positive_value():
    frame = pd.DataFrame({"setting": ["lora"] * 3 + ["a"] * 3, "seed": [0, 1, 2] * 2,
                          "lam": [1.0, 2.0, 4.0, 2.0, -1.0, 16.0]})
    row = paired_effects_table(frame, {"lam": "λ ratio"}, log={"lam"}).iloc[0]
    assert (row["pairs"], row["difference"]) == (2, pytest.approx(np.sqrt(2 * 4), rel=1e-12))  # seeds 0 and 2


def test_one_seed_shows_the_estimate_and_dashes_for_interval_and_p():
    probes = eigen_frame({("lora", "merged"): [4.0], ("flat-lora", "merged"): [2.0]})
    text = "\n".join(paired_tests_sections(metrics_frame({"lora": [0.8], "flat-lora": [0.9]}), probes))
    assert "| λ₁ (merged) ÷ LoRA's | flat-lora | 1 | 0.5 [—] | — | — |" in text


def test_every_section_renders_one_seed_without_nan():
    metrics = metrics_frame({"lora": [0.8], "flat-lora": [0.9]})
    probes = pd.concat([eigen_frame({(m, sp): [3.0] for m in ("lora", "flat-lora") for sp in ("lora-balanced", "merged")}),
                        pd.DataFrame([{"task": "t", "method": m, "seed": 0, "space": "merged", "measure": measure,
                                       "x": 0.05, "value": 0.1, "err": 0.01 if measure == "expected_loss" else np.nan}
                                      for m in ("lora", "flat-lora")
                                      for measure in ("expected_loss", "worst_case", "worst_case_first_order")])])
    texts = [runs_section(metrics), accuracy_section(metrics), sharpness_section(probes), worst_case_section(probes),
             expected_loss_section(probes), *paired_tests_sections(metrics, probes), within_method_section(metrics, probes),
             claim_section(probes)]
    assert not [t for t in texts if "nan" in t.lower()]


def test_runs_state_their_wall_time_in_minutes():
    assert "| flat-lora | 1 | 100 | 0.9 | 0.9 | 1.5 |" in runs_section(metrics_frame({"lora": [0.8], "flat-lora": [0.8, 0.9]}))


def test_the_curvature_part_is_the_worst_case_less_its_first_order_term():
    """Worst case (0.10, 0.14), ρ‖∇L‖ (0.08, 0.10): curvature (0.02, 0.04), mean 0.03, std 0.01·√2."""
    probes = pd.DataFrame([{"method": "lora", "seed": s, "space": "merged", "measure": measure, "x": 0.05, "value": v}
                           for measure, vs in (("worst_case", (0.10, 0.14)), ("worst_case_first_order", (0.08, 0.10)))
                           for s, v in enumerate(vs)])
    assert "| 0.05 | merged | lora | 2 | 0.1200 ± 0.0283 | 0.0900 ± 0.0141 | 0.0300 ± 0.0141 |" in worst_case_section(probes)


def test_expected_loss_shows_the_monte_carlo_interval_of_the_mean_and_marks_one_that_holds_zero():
    """Half-widths 0.003 and 0.004 over two seeds: √(0.003² + 0.004²) / 2 = 0.0025 about the mean."""
    probes = pd.DataFrame([{"method": m, "seed": s, "space": "merged", "measure": "expected_loss", "x": 0.1, "value": v,
                            "err": h} for m, vh in (("lora", ((0.010, 0.003), (0.012, 0.004))),
                                                    ("flat-lora", ((0.001, 0.003), (0.001, 0.004))))
                           for s, (v, h) in enumerate(vh)])
    assert "| 0.1 | merged | 0.011 [0.0085, 0.0135] | 0.001 [-0.0015, 0.0035] † |" in expected_loss_section(probes)


def test_lambda_and_accuracy_are_correlated_within_each_method_never_pooled():
    """Within LoRA λ₁ rises with accuracy, within Flat-LoRA it falls; SAM has too few seeds to show."""
    n = MIN_RUNS
    acc = {"lora": list(np.linspace(0.80, 0.84, n)), "flat-lora": list(np.linspace(0.70, 0.74, n)),
           "sam-lora": [0.8] * (n - 2)}
    lam = {("lora", "merged"): [1.0, 2.0, 3.0, 5.0, 4.0], ("flat-lora", "merged"): [9.0, 8.0, 7.0, 6.0, 5.0],
           ("sam-lora", "merged"): [1.0] * (n - 2)}
    within = within_method(metrics_frame(acc), eigen_frame(lam)).set_index("method")
    assert list(within.index) == ["lora", "flat-lora"]
    assert within.loc["lora", "rho"] == pytest.approx(stats.spearmanr(lam[("lora", "merged")], acc["lora"]).statistic)
    assert within.loc["flat-lora", "rho"] == pytest.approx(-1.0)
    np.testing.assert_allclose(within["p_holm"], holm(within["p"]), rtol=1e-12)


def test_the_claim_correlates_spaces_across_the_lora_runs_and_names_the_mismatched():
    """Eight LoRA-family runs with both spaces (full fine-tuning, merged only, is not among them)."""
    lam = {"lora": [(1, 8), (2, 1), (3, 2), (6, 6)], "flat-lora": [(8, 3), (5, 4), (4, 7), (7, 5)]}
    probes = eigen_frame({**{(m, sp): [v[i] for v in vs] for m, vs in lam.items()
                             for i, sp in enumerate(("lora-balanced", "merged"))},
                          **{(m, sp): [10.0 * v[i] for v in vs] for m, vs in lam.items()
                             for i, sp in enumerate(("tangent", "normal"))},
                          ("full-ft", "merged"): [50.0, 60.0, 70.0, 80.0]})
    text = claim_section(probes)
    pairs = [v for vs in lam.values() for v in vs]
    rho = stats.spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
    assert f"λ₁ (lora-balanced) against λ₁ (merged) across the 8 runs that have both: Spearman ρ = {rho:.3g} [" in text
    assert "runs flat in lora-balanced, sharp in merged: flat-lora-s2, lora-s0." in text
    assert "runs flat in merged, sharp in lora-balanced: flat-lora-s0." in text


def test_the_claim_waits_for_enough_runs():
    probes = eigen_frame({(m, sp): [1.0, 2.0] for m in ("lora", "flat-lora") for sp in ("lora-balanced", "merged")})
    assert f"4 runs have both so far; the correlation and the runs flat in one space and sharp in the other wait for " \
           f"{MIN_RUNS}." in claim_section(probes)


def test_without_lora_the_direct_test_states_its_own_family():
    lam = {"lora-balanced": [3.0, 5.0, 13.0], "merged": [7.0, 11.0, 29.0]}
    probes = eigen_frame({(m, sp): [1.0, 2.0, 4.0] if m == "sam-full" else lam[sp]
                          for m in ("sam-lora", "sam-full") for sp in lam})
    text = "\n".join(paired_tests_sections(metrics_frame({"sam-lora": [0.8] * 3, "sam-full": [0.8] * 3}), probes))
    assert "(no method has a run with one of LoRA's seeds)" in text
    assert "p_holm is Holm-adjusted over every comparison of this table, one family for the task: 3 of its 3" in text
