"""The README's study numbers are the committed results files' numbers: every table row and every
decimal in the prose of the README's study sections appears in the summary the study's command wrote,
and the headline statistics, recomputed here with scipy from the committed tables, are the ones
the summaries state."""
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


EXACT = ROOT / "results" / "study" / "digits-exact" / "summary.md"
EXACT_SECTION = "### Study v2: digits-mlp with exact spectra"


SWEEP = ROOT / "results" / "study" / "rt-minilm-sweep" / "summary.md"
SWEEP_SECTION = "### MiniLM: the settings sweep"
GRID = {"0.003", "0.01", "0.03", "0.05", "0.1", "0.2"}  # the settings' ρ and σ, named in setting names


def _section(title: str) -> str:
    """The README's section that starts with ``title``, up to the next heading of its level or above."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index(title):]
    ends = [i for head in ("\n### ", "\n## ") if (i := section.find(head, len(title))) >= 0]
    return section[: min(ends, default=len(section))]


def _exact_section() -> str:
    return _section(EXACT_SECTION)


def _tables(text: str) -> list[list[str]]:
    """The markdown tables of ``text``: runs of consecutive lines that start with "|"."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables, current = tables + [current], []
    return tables


def _decimals(text: str) -> set[str]:
    """Every decimal number in ``text``, whole: "0.11" is not among the numbers of "0.116"."""
    import re

    return set(re.findall(r"(?<![\w.])\d+\.\d+(?:e-?\d+)?(?![\d])", text))


def _prose_decimals(section: str) -> set[str]:
    """Every decimal in ``section`` outside tables and code blocks."""
    import re

    prose = re.sub(r"```.*?```", "", section, flags=re.S)
    return _decimals("\n".join(line for line in prose.splitlines() if not line.startswith("|")))


def _unquoted(numbers: set[str], *reports: Path) -> list[str]:
    """The ``numbers`` (less the settings' grid) that are no number of any of ``reports``."""
    found = set().union(*(_decimals(r.read_text(encoding="utf-8")) for r in reports))
    return sorted(numbers - GRID - found)


def test_readme_quotes_the_exact_digits_summary_as_it_is():
    """Every table row of the README's digits exact-spectra section is a row of the committed
    summary.md (written by analysis_scripts/exact_study.py), and every sentence of its Findings is
    quoted whole."""
    section, summary = _exact_section(), EXACT.read_text(encoding="utf-8").splitlines()
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert len(rows) >= 10
    assert [row for row in rows if row not in summary] == []
    findings = summary[summary.index("## Findings (sentences made from the tables below)"):]
    findings = [line for line in findings[: findings.index("## Runs flat in one space and sharp in the other")]
                if line.startswith("- ")]
    assert len(findings) >= 8 and [f for f in findings if f not in section.splitlines()] == []


def test_every_decimal_in_the_exact_digits_prose_is_in_the_summary():
    """The prose around the tables holds no number of its own: each decimal in it (outside tables and
    code) appears in summary.md — so a rerun that changes a number fails here until the README says it."""
    numbers = _prose_decimals(_exact_section())
    assert numbers, "the section quotes no numbers"
    assert _unquoted(numbers, EXACT) == []


def test_readme_quotes_the_minilm_sweep_summary_as_it_is():
    """The README's MiniLM sweep tables are the committed rt-minilm-sweep/summary.md's, whole (every
    row, none missing): the settings, the paired effects against LoRA, the within-setting
    correlations once a setting has 5 seeds, and the noise check — all but the choice of settings,
    which the prose names."""
    tables = _tables(SWEEP.read_text(encoding="utf-8"))
    assert len(tables) >= 4
    assert _tables(_section(SWEEP_SECTION)) == [tables[0], *tables[2:]]


def test_the_minilm_sweep_paired_tests_recomputed_with_scipy():
    """The claim's pattern on MiniLM: for each setting with several seeds, the paired t-test of
    log λ₁(balanced LoRA) − log λ₁(merged) against LoRA's with the same seed, by scipy.stats.ttest_rel
    on the committed sweep.csv, and Holm written out here, are the p and p_holm that summary.md states."""
    import numpy as np
    from scipy import stats

    runs = pd.read_csv(SWEEP.with_name("sweep.csv"))
    runs["gap"] = np.log(runs["lambda_lora-balanced"]) - np.log(runs["lambda_merged"])
    gap = runs.pivot(index="seed", columns="setting", values="gap")
    several = [s for s in gap.columns if s != "lora" and gap[s].notna().sum() >= 2]
    assert len(several) >= 3
    p = {s: stats.ttest_rel(gap[s].dropna(), gap["lora"][gap[s].notna()]).pvalue for s in several}
    adjusted, running = {}, 0.0
    for i, (s, value) in enumerate(sorted(p.items(), key=lambda kv: kv[1])):
        running = max(running, min(1.0, (len(p) - i) * value))
        adjusted[s] = running
    rows = [line.split(" | ") for line in SWEEP.read_text(encoding="utf-8").splitlines()
            if "| (balanced-LoRA ÷ merged) ÷ LoRA's |" in line]
    stated = {r[0].lstrip("| "): (r[4], r[5].rstrip(" |")) for r in rows}
    assert stated == {s: (f"{p[s]:.3g}", f"{adjusted[s]:.3g}") for s in several}


def test_every_decimal_in_the_minilm_sweep_prose_is_in_its_summary():
    numbers = _prose_decimals(_section(SWEEP_SECTION))
    assert _unquoted(numbers, SWEEP) == []


def test_the_exact_digits_correlation_recomputed_with_scipy():
    """The headline Spearman ρ and p, recomputed from the committed spectra.csv with scipy directly
    (so a bug in landscape.study.exact's statistics would show)."""
    import json

    from scipy import stats

    table = pd.read_csv(EXACT.with_name("spectra.csv"))
    wide = table.pivot(index="run", columns="space", values="lambda_max").dropna(subset=["lora-balanced"])
    test = stats.spearmanr(wide["lora-balanced"], wide["merged"])
    saved = json.loads(EXACT.with_name("summary.json").read_text())["spearman_lora_balanced_vs_merged"]
    assert saved["n"] == len(wide)
    assert saved["rho"] == pytest.approx(test.statistic, abs=1e-12)
    assert saved["p"] == pytest.approx(test.pvalue, rel=1e-9)


def test_the_exact_digits_direct_test_recomputed_with_scipy():
    """SAM on A, B against SAM on W at ρ = 0.1 on digits, on the gap λ₁(balanced LoRA) ÷ λ₁(merged):
    scipy's paired t-test on the logs of the committed spectra.csv gives the ratio and p of the
    summary's direct-test row, and the README quotes that row."""
    import numpy as np
    from scipy import stats

    table = pd.read_csv(EXACT.with_name("spectra.csv"))
    wide = table.pivot_table(index=["setting", "seed"], columns="space", values="lambda_max")
    gap = np.log(wide["lora-balanced"] / wide["merged"])
    a, w = gap.loc["sam-lora-rho0.1"], gap.loc["sam-full-rho0.1"]
    test = stats.ttest_rel(a, w.loc[a.index])
    ratio = float(np.exp((a - w.loc[a.index]).mean()))
    row = f"| [λ₁ (lora-balanced) ÷ λ₁ (merged)] ÷ sam-full-rho0.1's | sam-lora-rho0.1 | {len(a)} | {ratio:.3g} ["
    line = next(line for line in EXACT.read_text(encoding="utf-8").splitlines() if line.startswith(row))
    assert line.split(" | ")[4] == f"{test.pvalue:.3g}"
    assert line in _exact_section()


def test_the_exact_digits_accuracy_tests_recomputed_with_scipy():
    """Each setting's accuracy against LoRA with the same seed: scipy's paired t-test on the committed
    spectra.csv, and Holm's adjustment written out here (sorted p times m, m − 1, …, running maximum,
    capped at 1), are the p and p_holm of summary.json."""
    import json

    from scipy import stats

    runs = pd.read_csv(EXACT.with_name("spectra.csv")).drop_duplicates("run")
    acc = runs.pivot(index="seed", columns="setting", values="accuracy")
    p = {s: stats.ttest_rel(acc[s], acc["lora"]).pvalue for s in acc.columns if s != "lora"}
    adjusted, running = {}, 0.0
    for i, (s, value) in enumerate(sorted(p.items(), key=lambda kv: kv[1])):
        running = max(running, min(1.0, (len(p) - i) * value))
        adjusted[s] = running
    saved = {r["setting"]: r for r in json.loads(EXACT.with_name("summary.json").read_text())["accuracy_against_lora"]}
    assert sorted(saved) == sorted(p)
    for s in p:
        assert saved[s]["p"] == pytest.approx(p[s], rel=1e-9)
        assert saved[s]["p_holm"] == pytest.approx(adjusted[s], rel=1e-9)


LONG = ROOT / "results" / "study" / "minilm" / "report.md"
LONG_SECTION = "### MiniLM: the long runs"
LONG_TASKS = ("rt-minilm", "r8-minilm")
# the second invocation: Flat-LoRA and SAM on W at their settings chosen on validation
BEST = ROOT / "results" / "study" / "minilm-best-validation" / "report.md"
BEST_SECTION = "### MiniLM: the settings chosen on validation"
# each recompute test runs on both reports: (report, the tasks it must have reported)
REPORTS = pytest.mark.parametrize("report,tasks", [(LONG, LONG_TASKS), (BEST, LONG_TASKS)],
                                  ids=["long-runs", "best-on-validation"])


def _report_section(task: str, report: Path = LONG) -> str:
    """The part of a MiniLM report about ``task``: from its ``## TASK`` heading to the next."""
    text = report.read_text(encoding="utf-8")
    section = text[text.index(f"\n## {task}\n"):]
    return section[: section.find("\n## ", 1) if "\n## " in section[1:] else len(section)]


def _probed_eigenvalues(report: Path, tasks):
    """(task, its committed λ₁ rows) for each of ``tasks`` in ``report``'s folder."""
    for task in tasks:
        probes = pd.read_csv(report.parent / task / "probes.csv")
        yield task, probes[(probes["measure"] == "eigenvalue") & (probes["x"] == 1.0)]


def test_readme_quotes_the_long_runs_report_as_it_is():
    """Every table row of the README's long-run section is a row of the committed
    results/study/minilm/report.md (written by analysis_scripts/mismatch_study.py's report stage)."""
    rows = [line for line in _section(LONG_SECTION).splitlines() if line.startswith("|")]
    assert len(rows) >= 10
    assert [row for row in rows if row not in LONG.read_text(encoding="utf-8").splitlines()] == []


def test_every_decimal_in_the_long_runs_prose_is_in_its_report():
    numbers = _prose_decimals(_section(LONG_SECTION))
    assert numbers, "the section quotes no numbers"
    assert _unquoted(numbers, LONG) == []


def test_readme_quotes_the_best_on_validation_report_as_it_is():
    """The section on the settings chosen on validation: its table rows are rows of
    results/study/minilm-best-validation/report.md, and each decimal of its prose is a number of it."""
    section = _section(BEST_SECTION)
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert len(rows) >= 5
    assert [row for row in rows if row not in BEST.read_text(encoding="utf-8").splitlines()] == []
    numbers = _prose_decimals(section)
    assert numbers, "the section quotes no numbers"
    assert _unquoted(numbers, BEST) == []


@REPORTS
def test_the_minilm_reports_ratios_recomputed_from_the_committed_probes(report, tasks):
    """Each method's λ₁ ÷ LoRA's in each space, exp(mean over seeds of log(method ÷ LoRA)) computed
    here from each probed task's committed probes.csv, is the estimate that task's paired table states."""
    import numpy as np

    checked = 0
    for task, eig in _probed_eigenvalues(report, tasks):
        wide = eig.pivot_table(index=["space", "seed"], columns="method", values="value")
        text = _report_section(task, report)
        for space in eig["space"].unique():
            for method in [m for m in wide.columns if m != "lora"]:
                pairs = (wide.loc[space, method] / wide.loc[space, "lora"]).dropna()  # seeds both have
                if pairs.empty:  # full fine-tuning has no LoRA space: the report shows no row
                    assert f"| λ₁ ({space}) ÷ LoRA's | {method} |" not in text, (task, space)
                    continue
                ratio = float(np.exp(np.mean(np.log(pairs))))
                assert f"| λ₁ ({space}) ÷ LoRA's | {method} | {len(pairs)} | {ratio:.3g} [" in text, (task, space)
                checked += 1
    assert checked >= 8 * len(tasks)


@REPORTS
def test_the_minilm_reports_paired_accuracy_p_recomputed_with_scipy(report, tasks):
    """Each method's test accuracy against LoRA's with the same seeds: scipy's paired t-test on each
    task's committed metrics.csv gives the p of that task's section of the report (for every method
    with two seeds or more)."""
    from scipy import stats

    checked = 0
    for task in tasks:
        metrics = pd.read_csv(report.parent / task / "metrics.csv")
        acc = metrics.pivot(index="seed", columns="method", values="accuracy")
        rows = {line.split(" | ")[1]: line.split(" | ") for line in _report_section(task, report).splitlines()
                if line.startswith("| test accuracy − LoRA's |")}
        for method in [m for m in acc.columns if m != "lora"]:
            both = acc[[method, "lora"]].dropna()
            if len(both) < 2:
                continue
            p = stats.ttest_rel(both[method], both["lora"]).pvalue
            assert rows[method][2] == str(len(both)) and rows[method][4] == f"{p:.3g}", (task, method)
            checked += 1
    assert checked >= 4 * len(tasks)


@REPORTS
def test_the_minilm_reports_claim_correlation_recomputed_with_scipy(report, tasks):
    """λ₁ in the balanced LoRA space against λ₁ in the merged space across the probed runs of each
    task: scipy's Spearman ρ and p on that task's committed probes.csv are its section's."""
    from scipy import stats

    checked = 0
    for task, eig in _probed_eigenvalues(report, tasks):
        wide = eig.pivot_table(index=["method", "seed"], columns="space", values="value")
        wide = wide[["lora-balanced", "merged"]].dropna()
        test = stats.spearmanr(wide["lora-balanced"], wide["merged"])
        stated = (f"λ₁ (lora-balanced) against λ₁ (merged) across the {len(wide)} runs that have both: "
                  f"Spearman ρ = {test.statistic:.3g} ")
        line = next(line for line in _report_section(task, report).splitlines() if stated in line)
        assert line.endswith(f"p = {test.pvalue:.2g}."), task
        checked += 1
    assert checked == len(tasks)


@REPORTS
def test_the_claims_direct_test_recomputed_with_scipy(report, tasks):
    """SAM on A, B against SAM on W with the same seed, on the gap λ₁(balanced LoRA) ÷ λ₁(merged):
    scipy's paired t-test on the logs of each task's committed probes.csv gives the ratio and p
    that task's direct-test table states."""
    import numpy as np
    from scipy import stats

    checked = 0
    for task, eig in _probed_eigenvalues(report, tasks):
        wide = eig.pivot_table(index=["method", "seed"], columns="space", values="value")
        gap = np.log(wide["lora-balanced"] / wide["merged"])
        pairs = pd.concat([gap.loc["sam-lora"], gap.loc["sam-full"]], axis=1, keys=["a", "w"]).dropna()
        test = stats.ttest_rel(pairs["a"], pairs["w"])
        ratio = float(np.exp((pairs["a"] - pairs["w"]).mean()))
        row = (f"| [λ₁ (lora-balanced) ÷ λ₁ (merged)] ÷ sam-full's | sam-lora | {len(pairs)} | {ratio:.3g} [")
        line = next(line for line in _report_section(task, report).splitlines() if line.startswith(row))
        assert line.split(" | ")[4] == f"{test.pvalue:.3g}", task
        checked += 1
    assert checked == len(tasks)


WHAT_SECTION = "### What the data say"


def test_every_decimal_in_what_the_data_say_is_in_a_report():
    """The study's conclusions hold no number of their own: each decimal is in one of the committed
    reports the sections below it quote (digits, the sweep, the long runs, the settings chosen on validation)."""
    numbers = _prose_decimals(_section(WHAT_SECTION))
    assert numbers, "the section quotes no numbers"
    assert _unquoted(numbers, EXACT, SWEEP, LONG, BEST) == []
