"""The README's study numbers are the committed results files' numbers: every table row that
``landscape.study.report`` makes from results/study/TASK/{metrics,probes,robustness}.csv — accuracy
with its tests, sharpness per space, robustness — appears in README.md as it is."""
from pathlib import Path

import pandas as pd
import pytest

from landscape.study.report import accuracy_section, robustness_section, sharpness_section

ROOT = Path(__file__).resolve().parents[1]
TASKS = sorted(d for d in (ROOT / "results" / "study").iterdir() if (d / "metrics.csv").exists())
SECTIONS = {"metrics.csv": accuracy_section, "probes.csv": sharpness_section, "robustness.csv": robustness_section}


@pytest.mark.parametrize("task", TASKS, ids=[d.name for d in TASKS])
@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_readme_quotes_the_results_files(task, name):
    if not (task / name).exists():
        pytest.skip(f"no {name} for {task.name}")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = [line for line in SECTIONS[name](pd.read_csv(task / name)).splitlines() if line.startswith("| ")]
    missing = [row for row in rows if row not in readme]
    assert not missing, f"README.md does not quote {task.name}/{name} as it is now; first missing row: {missing[0]}"
