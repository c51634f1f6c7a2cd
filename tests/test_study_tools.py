"""Text corruptions (seeded, paired across models), the paired error analysis, and the report's statistics
(Holm's adjustment, paired differences, Spearman within groups and across runs)."""
import pytest

from landscape.study.corruption import CORRUPTIONS, LEVELS, corrupt, corrupt_all
from landscape.study.error_analysis import compare_predictions

TEXT = "a gripping story, with superb acting and a script that never lets go of you."


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corruptions_are_seeded_and_scale_with_level(kind):
    texts = [TEXT] * 40
    light, heavy = corrupt_all(texts, kind, "light", seed=0), corrupt_all(texts, kind, "heavy", seed=0)
    assert light == corrupt_all(texts, kind, "light", seed=0)  # deterministic: the same for every model
    assert light != corrupt_all(texts, kind, "light", seed=1)
    changed = lambda out: sum(t != TEXT for t in out)
    assert 0 < changed(light) < changed(heavy) <= len(texts)


def test_corruptions_do_what_they_say():
    conf = corrupt(TEXT, "confusables", "heavy", index=3)
    assert conf != TEXT and any(ord(ch) > 127 for ch in conf) and len(conf) == len(TEXT)
    emoji = corrupt(TEXT, "emoji", "heavy", index=3)
    assert any(ord(ch) > 0x1F000 for ch in emoji) and emoji.replace(" ", "").startswith("agripping")
    typo = corrupt(TEXT, "typos", "heavy", index=3)
    assert typo != TEXT and abs(len(typo) - len(TEXT)) <= len(TEXT.split())


def test_bad_corruption_names():
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(TEXT, "leet")
    with pytest.raises(ValueError, match="unknown level"):
        corrupt(TEXT, "typos", "medium")
    assert set(LEVELS) == {"light", "heavy"}


def test_compare_predictions_counts_and_mcnemar():
    labels = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    a = [0, 1, 0, 1, 0, 1, 0, 1, 1, 0]  # right on 8
    b = [1, 0, 1, 0, 1, 0, 0, 1, 0, 1]  # right on 4
    counts, table = compare_predictions(labels, a, b, names=("lora", "flat"), texts=[str(i) for i in range(10)])
    assert counts["both right"] == 2 and counts["both wrong"] == 0
    assert counts["only lora right"] == 6 and counts["only flat right"] == 2
    assert counts["mcnemar_p"] == pytest.approx(0.2890625)  # two-sided binomial, 2 of 8 at p = 1/2
    assert list(table["kind"]).count("only lora right") == 3 and set(table["text"]) <= {str(i) for i in range(10)}
    with pytest.raises(ValueError, match="length"):
        compare_predictions(labels, a[:5], b)


def test_holm_adjusts_as_holm_1979_and_skips_nan():
    """p = (0.01, 0.04, NaN, 0.03, 0.5): m = 4 finite; sorted 0.01·4, 0.03·3, max(0.04·2, 0.09), 0.5·1."""
    import numpy as np

    from landscape.study.report import holm

    out = holm([0.01, 0.04, np.nan, 0.03, 0.5])
    np.testing.assert_allclose(out, [0.04, 0.09, np.nan, 0.09, 0.5], rtol=1e-12)
    assert holm([0.6, 0.5]).tolist() == [1.0, 1.0]  # capped at 1


def _seeded_runs():
    """Three settings × 6 seeds of made-up accuracies and λ₁ (seeded)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = [{"setting": s, "seed": k, "accuracy": 0.9 + shift + rng.normal(0, 0.01), "lambda_max": rng.lognormal()}
            for s, shift in (("lora", 0.0), ("a", 0.02), ("b", 0.0)) for k in range(6)]
    return pd.DataFrame(rows)


def test_paired_differences_are_scipys_paired_t_with_holm():
    import numpy as np
    from scipy import stats

    from landscape.study.report import holm, paired_differences

    frame = _seeded_runs()
    out = paired_differences(frame.sample(frac=1, random_state=1), "accuracy").set_index("setting")  # order-free
    lora = frame[frame["setting"] == "lora"].set_index("seed")["accuracy"]
    p = []
    for s in ("a", "b"):
        x = frame[frame["setting"] == s].set_index("seed")["accuracy"]
        test = stats.ttest_rel(x, lora[x.index])
        p.append(test.pvalue)
        assert out.loc[s, "p"] == pytest.approx(test.pvalue, rel=1e-10)
        assert out.loc[s, "difference"] == pytest.approx((x - lora[x.index]).mean(), rel=1e-12)
        assert out.loc[s, "low"] < out.loc[s, "difference"] < out.loc[s, "high"]
    np.testing.assert_allclose(out.loc[["a", "b"], "p_holm"], holm(p), rtol=1e-12)


def test_pairs_that_all_differ_by_the_same_count_have_no_t_test():
    """Two seeds where Flat-LoRA's drop is 4 in 150 above LoRA's both times: the differences agree up
    to float rounding, and scipy's t-test would call that p = 6e-17. No spread, no test: p and the
    interval are NaN ("—"), and the estimate stays."""
    import numpy as np
    import pandas as pd

    from landscape.study.report import paired_differences

    n = 150
    drops = {("lora", 0): 1 / n, ("lora", 1): 3 / n, ("flat-lora", 0): 5 / n, ("flat-lora", 1): 7 / n}
    frame = pd.DataFrame([{"setting": m, "seed": s, "drop": d} for (m, s), d in drops.items()])
    row = paired_differences(frame, "drop").set_index("setting").loc["flat-lora"]
    assert (5 / n - 1 / n) != (7 / n - 3 / n)  # the rounding the guard is for
    assert row["difference"] == pytest.approx(4 / n, rel=1e-12)
    assert np.isnan(row["p"]) and np.isnan(row["low"]) and np.isnan(row["high"])


def test_a_mean_difference_of_zero_counts_is_zero_not_its_rounding():
    """Drops of 0, 0, 3 in 150 against 0, 1, 2: the differences sum to 0 counts, but in floats their
    mean is -2.9e-19, which the report would print as an effect. The t-test still runs (the pairs
    differ)."""
    import numpy as np
    import pandas as pd

    from landscape.study.report import paired_differences

    n = 150
    drops = {"flat-lora": [0, 0, 3], "lora": [0, 1, 2]}
    frame = pd.DataFrame([{"setting": m, "seed": s, "drop": k / n} for m, ks in drops.items() for s, k in enumerate(ks)])
    assert (np.array(drops["flat-lora"]) / n - np.array(drops["lora"]) / n).mean() != 0  # the rounding
    row = paired_differences(frame, "drop").set_index("setting").loc["flat-lora"]
    assert row["difference"] == 0.0
    assert row["p"] == pytest.approx(1.0)


def test_within_group_spearman_never_pools_groups():
    from scipy import stats

    from landscape.study.report import within_group_spearman

    frame = _seeded_runs()
    out = within_group_spearman(frame, "lambda_max", "accuracy").set_index("setting")
    for s, g in frame.groupby("setting"):
        assert out.loc[s, "rho"] == pytest.approx(stats.spearmanr(g["lambda_max"], g["accuracy"]).statistic, abs=1e-12)
    assert out["n"].tolist() == [6, 6, 6]


def test_spearman_p_of_a_few_seeds_is_the_exact_share_of_pairings():
    """Against brute force over all 6! pairings (ties in y): the share with |ρ*| ≥ |ρ| — the null
    distribution is symmetric (reversing y's ranks negates ρ), so this is the two-sided p. Five seeds
    ranked alike get 2/5!, not the t approximation's ~1e-24."""
    import itertools

    import numpy as np
    from scipy import stats

    from landscape.study.report import spearman_test

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=6), np.round(rng.normal(size=6))
    rho, p = spearman_test(x, y)
    null = np.array([stats.spearmanr(np.array(q), y).statistic for q in itertools.permutations(x)])
    assert rho == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert p == pytest.approx(np.mean(np.abs(null) >= abs(rho) - 1e-12), abs=1e-12)
    assert spearman_test([1, 2, 3, 4, 5], [0.3, 0.4, 0.5, 0.8, 0.9]) == (pytest.approx(1.0), pytest.approx(2 / 120))
    assert stats.spearmanr([1, 2, 3, 4, 5], [0.3, 0.4, 0.5, 0.8, 0.9]).pvalue < 1e-20  # what it replaces


def test_spearman_p_of_many_runs_is_the_t_approximation_and_a_constant_sample_has_none():
    import numpy as np
    from scipy import stats

    from landscape.study.report import EXACT_SPEARMAN_MAX_N, spearman_test

    x = np.arange(EXACT_SPEARMAN_MAX_N + 1.0)
    y = np.random.default_rng(2).normal(size=len(x))
    assert spearman_test(x, y)[1] == pytest.approx(stats.spearmanr(x, y).pvalue, abs=1e-12)
    assert np.isnan(spearman_test(x[:5], np.ones(5))).all()


def test_spearman_interval_is_seeded_and_holds_rho():
    import numpy as np

    from landscape.study.report import spearman_interval

    x = np.arange(30.0)
    y = x + np.random.default_rng(1).normal(0, 8, 30)
    a, b = (spearman_interval(x, y, seed=3, n_resamples=999) for _ in range(2))
    assert a == b and a["low"] < a["rho"] < a["high"]


def test_mismatched_runs_are_flat_in_one_space_and_sharp_in_the_other():
    """Among the runs with both spaces: a full fine-tuning run (merged only) is not ranked."""
    import pandas as pd

    from landscape.study.report import mismatched_runs

    lam = {"a": (1, 8), "b": (2, 1), "c": (3, 2), "d": (8, 3), "e": (5, 4), "f": (6, 5), "g": (7, 6), "h": (4, 7)}
    frame = pd.DataFrame([{"run": r, "space": sp, "lambda_max": v}
                          for r, vs in lam.items() for sp, v in zip(("lora-balanced", "merged"), vs)]
                         + [{"run": "full", "space": "merged", "lambda_max": 100.0}])
    assert mismatched_runs(frame) == {"flat in lora-balanced, sharp in merged": ["a", "h"],
                                      "flat in merged, sharp in lora-balanced": ["d"]}


def test_the_index_holds_every_part_in_order_with_links_rebased(tmp_path):
    from landscape.study.report import write_index

    (tmp_path / "rt-minilm-sweep").mkdir()
    (tmp_path / "rt-minilm-sweep" / "summary.md").write_text("# Sweep\n\nMade by `x`.\n")
    (tmp_path / "digits-exact").mkdir()
    (tmp_path / "digits-exact" / "summary.md").write_text("# Exact\n\n![fig](../../../figures/study/f.png)\n")
    (tmp_path / "empty").mkdir()
    text = write_index(tmp_path).read_text()
    assert text.index("## Exact") < text.index("## Sweep")  # digits first, by INDEX_ORDER
    assert "![fig](../../figures/study/f.png)" in text  # resolves from tmp_path as it did from digits-exact/
    assert "empty" not in text


def test_feature_noise_is_the_same_for_every_call_and_refuses_text_tasks():
    import helpers
    import pandas as pd

    from landscape.study.robustness import feature_noise_accuracy

    task = helpers.digits_task()
    model = task.build_model()
    first = feature_noise_accuracy(model, task, limit=64)
    pd.testing.assert_frame_equal(first, feature_noise_accuracy(model, task, limit=64))
    assert set(zip(first["kind"], first["level"])) == {(k, lv) for k in ("gaussian", "dropout") for lv in ("light", "heavy")}

    class Text:
        name, splits = "text", {"test": [{"input_ids": [1, 2], "label": 0}]}

    with pytest.raises(ValueError, match="no feature vectors"):
        feature_noise_accuracy(model, Text())


def test_equal_accuracy_drops_are_equal_numbers():
    """Two drops of 2 in 150 from different clean accuracies: float subtraction gives two numbers
    (their difference showed as -1.11e-16 in a report), the exact drop gives 2/150 both times, also
    for a table's columns."""
    import pandas as pd

    from landscape.study.robustness import accuracy_drop

    n = 150
    assert 100 / n - 98 / n != 102 / n - 100 / n  # the rounding this guards against
    assert accuracy_drop(100 / n, 98 / n, n) == accuracy_drop(102 / n, 100 / n, n) == 2 / n
    table = pd.DataFrame({"clean_accuracy": [100 / n, 102 / n], "accuracy": [98 / n, 100 / n], "n": [n, n]})
    assert accuracy_drop(table["clean_accuracy"], table["accuracy"], table["n"]).tolist() == [2 / n, 2 / n]
