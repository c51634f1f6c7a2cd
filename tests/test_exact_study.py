"""The exact-spectrum study (landscape.study.exact) and what it rests on: orthonormal bases of the
tangent / normal spaces, restricted spectra equal to the library's dense tangent Hessian, the tidy
table, resumable parts, the statistics and the script. The study runs on a smaller digits model
(hidden 6, LoRA r = 2) so that its dense Hessians take seconds."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from landscape import Loss, SpaceError, dense_hessian, space
from landscape.study import exact
from landscape.study.exact import Setting
from helpers import run_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "analysis_scripts" / "exact_study.py"


SEEDS = (0, 1, 2)
TINY_SETTINGS = [Setting("lora"), Setting("sam-lora", rho=0.01), Setting("full-ft")]


def _data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 12, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g))]


@pytest.mark.parametrize("kind", ["tangent", "normal"])
def test_space_basis_spans_the_projection(linear_lora, kind):
    sp = space(linear_lora.double(), kind)
    q = sp.basis()
    v = torch.randn(sp.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert q.shape == (sp.dim, sp.subspace_dim)
    torch.testing.assert_close(q.t() @ q, torch.eye(sp.subspace_dim, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(q @ (q.t() @ v), sp.to_vector(sp.project(sp.from_vector(v))), rtol=0, atol=1e-12)


def test_space_basis_of_an_unprojected_space_raises(linear_lora):
    with pytest.raises(SpaceError, match="basis\\(\\) is for the tangent and normal spaces"):
        space(linear_lora, "merged").basis()


def test_restricted_tangent_spectrum_is_the_dense_tangent_hessians_without_its_zeros(linear_lora):
    """Q_Tᵀ H Q_T has the eigenvalues of the library's P H P (dense_hessian in 'tangent') less dim − d zeros."""
    model, loss = linear_lora.double(), Loss(_data())
    spectra, _ = exact.exact_spectra(model, loss)
    h = dense_hessian(model, loss, "tangent", progress=False).numpy()
    padded = np.sort(np.concatenate([spectra["tangent"], np.zeros(len(h) - len(spectra["tangent"]))]))
    np.testing.assert_allclose(padded, np.linalg.eigvalsh((h + h.T) / 2), rtol=0, atol=1e-10)


def test_settings_are_the_issues_grid_with_unique_names():
    names = [s.name for s in exact.SETTINGS]
    assert len(names) == len(set(names)) == 15  # lora, 3 σ × 2 schedules, 4 ρ sam-lora, 3 ρ sam-full, full-ft
    assert "flat-lora-sigma0.1-constant" in names and "sam-full-rho0.05" in names


def test_select_settings_names_an_unknown_method():
    with pytest.raises(exact.ExactStudyError, match=r"unknown method\(s\) \['asam'\]"):
        exact.select_settings(["lora", "asam"])


# ------------------------------------------------------------------------ the study, on a small model
def _tiny_mlp():
    from flatlora.tasks.digits import MLP

    model = MLP(hidden=6)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """Train, spectra and report of lora, sam-lora (ρ 0.01) and full-ft, 3 seeds, 20 steps, on digits
    with a hidden width of 6, LoRA r = 2 (LoRA space 196, merged 480 coordinates) and 128 train examples."""
    from flatlora import TASKS

    original = TASKS["digits-mlp"]

    def build():
        task = original()
        task.build_model = _tiny_mlp
        task.defaults = {**task.defaults, "rank": 2, "alpha": 4}
        task.splits = {**task.splits, "train": task.splits["train"][:128]}  # the Hessians' loss: 128 examples
        return task

    root = tmp_path_factory.mktemp("exact")
    with pytest.MonkeyPatch.context() as mp:  # for the module's tests: they read and resume the study
        mp.setitem(TASKS, "digits-mlp", build)
        exact.run_exact_study(root / "runs", root / "results", root / "figures", settings=TINY_SETTINGS, seeds=SEEDS,
                              steps=20, progress=False, command="test")
        yield root


def test_table_has_every_space_of_every_run(tiny_study):
    table = pd.read_csv(tiny_study / "results" / "spectra.csv")
    dims = table.groupby(["method", "space"])["dim"].unique().map(list).to_dict()
    # r = 2 on fc1 (6×64), fc2 (6×6), head (10×6): tangent k·n + l·m − k·l per layer: 136 + 20 + 28 = 184
    assert dims == {("full-ft", "merged"): [480], **{(m, s): [d] for m in ("lora", "sam-lora") for s, d in
                    (("lora-balanced", 196), ("lora-as-trained", 196), ("merged", 480), ("tangent", 184),
                     ("normal", 296))}}
    assert len(table) == len(SEEDS) * (2 * 5 + 1)


def test_trace_of_tangent_and_normal_adds_up_to_merged(tiny_study):
    """P_T + P_N = I and the bases are orthonormal: Tr(Q_TᵀHQ_T) + Tr(Q_NᵀHQ_N) = Tr H."""
    table = pd.read_csv(tiny_study / "results" / "spectra.csv")
    wide = table[table["method"] != "full-ft"].pivot(index="run", columns="space", values="trace")
    np.testing.assert_allclose(wide["tangent"] + wide["normal"], wide["merged"], rtol=1e-10)


def test_thresholds_are_one_percent_of_lora_median(tiny_study):
    table = pd.read_csv(tiny_study / "results" / "spectra.csv")
    lora = table[table["method"] == "lora"].groupby("space")["lambda_max"].median()
    expected = {sp: 0.01 * lora[src] for sp, src in exact.THRESHOLD_SPACE.items()}
    assert table.groupby("space")["threshold"].first().to_dict() == pytest.approx(expected, rel=1e-12)


def test_spectra_stage_reuses_parts(tiny_study, monkeypatch):
    root = tiny_study
    before = (root / "results" / "spectra.csv").read_text()

    def fail(*args, **kwargs):
        raise AssertionError("a finished part was computed again")

    monkeypatch.setattr(exact, "exact_spectra", fail)
    exact.run_exact_study(root / "runs", root / "results", root / "figures", settings=TINY_SETTINGS, seeds=SEEDS,
                          steps=20, stages=("train", "spectra"), progress=False)
    assert (root / "results" / "spectra.csv").read_text() == before


def test_summary_spearman_is_scipys(tiny_study):
    root = tiny_study
    table = pd.read_csv(root / "results" / "spectra.csv")
    wide = table[table["method"] != "full-ft"].pivot(index="run", columns="space", values="lambda_max")
    summary = json.loads((root / "results" / "summary.json").read_text())
    from scipy.stats import spearmanr

    assert summary["spearman_lora_balanced_vs_merged"]["rho"] == pytest.approx(
        spearmanr(wide["lora-balanced"], wide["merged"]).statistic, abs=1e-12)
    assert summary["runs"] == len(SEEDS) * len(TINY_SETTINGS)


def test_findings_state_the_tables_numbers(tiny_study):
    """The summary's sentences carry the headline ρ of summary.json, one line per space, and the
    accuracy range of spectra.csv."""
    text = (tiny_study / "results" / "summary.md").read_text()
    summary = json.loads((tiny_study / "results" / "summary.json").read_text())["spearman_lora_balanced_vs_merged"]
    table = pd.read_csv(tiny_study / "results" / "spectra.csv")
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    head = f"Spearman ρ = {summary['rho']:.3g} [{summary['low']:.3g}, {summary['high']:.3g}], p = {summary['p']:.2g}."
    assert any(line.endswith(head) and f"across the {summary['n']} LoRA runs" in line for line in lines)
    assert sum("differs from LoRA's at Holm-adjusted p < 0.05" in line for line in lines) == len(exact.SPACES)
    acc = table.groupby("setting")["accuracy"].mean()
    assert any(f"{acc.min():.3f} ({acc.idxmin()}) to {acc.max():.3f} ({acc.idxmax()})" in line for line in lines)


def test_report_draws_the_figures(tiny_study):
    """The spectra figure, and the probe stage's: every figure its tables allow (no sam-full or
    flat-lora here, so the planes figure has LoRA's plane alone)."""
    names = {p.stem for p in (tiny_study / "figures").iterdir()}
    assert names == {exact.FIGURE, *(f"digits-mlp-{n}" for n in ("lines", "planes", "expected-loss", "eigenvalues",
                                                                  "sharpness-vs-accuracy", "robustness"))}


def test_own_space_effects_pair_seeds_on_the_log_scale_with_holm_over_every_cell():
    """Two settings against LoRA on 6 seeds: one halves λ₁ (with seeded noise), one leaves it; the
    ratio, interval and p are the t-test of the log ratios computed here with scipy, and p_holm is
    Holm's adjustment over the four (setting × space) cells, worked out by hand."""
    from scipy import stats

    rng = np.random.default_rng(0)
    base = {sp: rng.uniform(1, 3, 6) for sp in ("lora-balanced", "merged")}
    factor = {"lora": 1.0, "half": 0.5, "same": 1.0}
    rows = [{"setting": st, "method": st, "seed": i, "space": sp,
             "lambda_max": base[sp][i] * factor[st] * (1 if st == "lora" else np.exp(rng.normal(0, 0.1)))}
            for st in factor for sp in base for i in range(6)]
    effects = exact.own_space_effects(pd.DataFrame(rows)).set_index(["setting", "space"])
    assert effects.loc["lora"]["p"].isna().all() and (effects.loc["lora"]["pairs"] == 0).all()
    p = {}
    for st in ("half", "same"):
        for sp in base:
            r = effects.loc[(st, sp)]
            x = np.array([row["lambda_max"] for row in rows if row["setting"] == st and row["space"] == sp])
            test = stats.ttest_rel(np.log(x), np.log(base[sp]))
            ci = test.confidence_interval(0.95)
            assert (r["ratio"], r["low"], r["high"], r["p"]) == pytest.approx(
                (np.exp(np.mean(np.log(x / base[sp]))), np.exp(ci.low), np.exp(ci.high), test.pvalue), rel=1e-10)
            assert r["pairs"] == 6 and r["below_lora"] == int((x < base[sp]).sum())
            p[(st, sp)] = r["p"]
    assert effects.loc["half"]["ratio"].between(0.4, 0.6).all() and effects.loc["same"]["ratio"].between(0.85, 1.15).all()
    ranked = sorted(p, key=p.get)
    expected = np.minimum(1, np.maximum.accumulate([(4 - i) * p[k] for i, k in enumerate(ranked)]))
    assert [effects.loc[k]["p_holm"] for k in ranked] == pytest.approx(list(expected), rel=1e-12)
    assert effects.loc[("half", "merged")]["p_holm"] < 0.01 < effects.loc[("same", "merged")]["p_holm"]


def test_direct_test_pairs_sam_on_ab_with_sam_on_w_by_seed_in_every_space():
    """SAM on A, B with λ₁ twice SAM on W's in the merged space and equal in the balanced LoRA space,
    seed by seed (4 seeds, seeded noise on the log scale): the direct test's merged ratio and gap
    ratio are scipy's paired t-test of the logs, the balanced ratio is near 1, and other settings
    (here LoRA's) stay out."""
    from scipy import stats

    rng = np.random.default_rng(1)
    base = {sp: rng.uniform(1, 3, 4) for sp in ("lora-balanced", "merged")}
    factor = {("sam-lora-rho0.1", "merged"): 2.0}
    rows = [{"setting": st, "method": st.split("-rho")[0], "seed": i, "space": sp,
             "lambda_max": base[sp][i] * factor.get((st, sp), 1.0) * np.exp(rng.normal(0, 0.05))}
            for st in ("lora", *exact.DIRECT_TEST) for sp in base for i in range(4)]
    frame = pd.DataFrame(rows)
    out = exact.direct_test(frame).set_index("effect")
    assert set(out["method"]) == {"sam-lora-rho0.1"} and (out["pairs"] == 4).all()

    def lam(st, sp):
        return frame[(frame["setting"] == st) & (frame["space"] == sp)]["lambda_max"].to_numpy()

    a, w = exact.DIRECT_TEST
    merged = out.loc["λ₁ (merged) ÷ sam-full-rho0.1's"]
    test = stats.ttest_rel(np.log(lam(a, "merged")), np.log(lam(w, "merged")))
    assert (merged["difference"], merged["p"]) == pytest.approx(
        (np.exp(np.mean(np.log(lam(a, "merged") / lam(w, "merged")))), test.pvalue), rel=1e-10)
    assert 1.8 < merged["difference"] < 2.2
    assert 0.9 < out.loc["λ₁ (lora-balanced) ÷ sam-full-rho0.1's"]["difference"] < 1.1
    gap = out.loc["[λ₁ (lora-balanced) ÷ λ₁ (merged)] ÷ sam-full-rho0.1's"]
    g = {st: np.log(lam(st, "lora-balanced") / lam(st, "merged")) for st in (a, w)}
    assert gap["p"] == pytest.approx(stats.ttest_rel(g[a], g[w]).pvalue, rel=1e-10)
    assert 0.45 < gap["difference"] < 0.55
    assert exact.direct_test(frame[frame["setting"] != w]).empty


def test_script_needs_lora_for_the_thresholds(tmp_path):
    r = run_script(SCRIPT, "--methods", "sam-lora", "--out", tmp_path)
    assert r.returncode == 2 and "add 'lora' to --methods" in r.stderr


def test_script_help_describes_every_option():
    r = run_script(SCRIPT, "--help")
    for option in ("--out", "--results", "--figures", "--seeds", "--methods", "--steps", "--stage", "--no-progress"):
        assert option in r.stdout


def test_probe_stage_probes_each_methods_strongest_setting_on_every_seed(tiny_study):
    probes = pd.read_csv(tiny_study / "results" / "probes.csv")
    assert probes.groupby("method")["seed"].unique().map(sorted).to_dict() == {m: list(SEEDS)
                                                                       for m in ("full-ft", "lora", "sam-lora")}


def test_probe_stage_lanczos_eigenvalue_is_the_exact_one(tiny_study):
    """λ₁ by Lanczos (float32, tolerance 1e-4) is the dense float64 λ₁ of the same run and space."""
    probes = pd.read_csv(tiny_study / "results" / "probes.csv")
    table = pd.read_csv(tiny_study / "results" / "spectra.csv")
    lanczos = probes[probes["measure"] == "eigenvalue"].set_index(["method", "seed", "space"])["value"]
    dense = table.set_index(["method", "seed", "space"])["lambda_max"].reindex(lanczos.index)
    np.testing.assert_allclose(lanczos, dense, rtol=1e-3)


def test_strongest_settings_pick_the_lowest_merged_ratio_per_method():
    from landscape.study.exact_probes import strongest_settings

    rows = [{"setting": name, "method": name.split("-rho")[0], "seed": k, "space": "merged",
             "lambda_max": base * (1 + 0.01 * k)}
            for name, base in (("lora", 1.0), ("sam-lora-rho0.01", 0.9), ("sam-lora-rho0.1", 0.5),
                               ("sam-full-rho0.1", 1.2), ("full-ft", 0.4)) for k in range(3)]
    chosen = [s.name for s in strongest_settings(pd.DataFrame(rows))]
    assert chosen == ["lora", "sam-lora-rho0.1", "sam-full-rho0.1", "full-ft"]


def test_robust_stage_measures_every_run_under_each_noise(tiny_study):
    robust = pd.read_csv(tiny_study / "results" / "robustness.csv")
    assert len(robust) == len(SEEDS) * len(TINY_SETTINGS) * 4  # 2 kinds × 2 levels
    np.testing.assert_allclose(robust["drop"], robust["clean_accuracy"] - robust["accuracy"], atol=1e-12)


def test_robustness_statistics_are_scipys_paired_t_with_holm(tiny_study):
    from scipy import stats

    from landscape.study.exact_probes import robustness_statistics

    robust = pd.read_csv(tiny_study / "results" / "robustness.csv")
    paired, _ = robustness_statistics(robust, pd.read_csv(tiny_study / "results" / "spectra.csv"))
    cell = robust[(robust["kind"] == "gaussian") & (robust["level"] == "heavy")]
    drop = cell.pivot(index="seed", columns="setting", values="drop")
    row = paired[(paired["setting"] == "sam-lora-rho0.01") & (paired["condition"] == "gaussian/heavy")].iloc[0]
    test = stats.ttest_rel(drop["sam-lora-rho0.01"], drop["lora"])
    assert row["difference"] == pytest.approx((drop["sam-lora-rho0.01"] - drop["lora"]).mean(), abs=1e-12)
    if np.isnan(test.pvalue):  # identical drops: no test, and Holm leaves it out
        assert np.isnan(row["p"])
    else:
        assert row["p"] == pytest.approx(test.pvalue, rel=1e-9)
