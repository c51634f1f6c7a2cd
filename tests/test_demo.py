"""`make demo` (analysis_scripts/demo.py) in miniature: the contrast of the study's strongest settings."""
import io
from pathlib import Path

import pandas as pd

from helpers import run_script

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_prints_each_method_against_lora_in_four_spaces(tmp_path, shared_digits_pretraining):
    r = run_script(ROOT / "analysis_scripts" / "demo.py", "--steps", "20", "--seeds", "0", "1", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    first = (tmp_path / "demo-table.md").read_text(encoding="utf-8").split("\n\n")[0]  # then the direct test's
    table = pd.read_csv(io.StringIO(first), sep="|", skipinitialspace=True).iloc[1:, 1:-1]
    table.columns = [c.strip() for c in table.columns]
    assert [m.strip() for m in table["method"]] == ["lora", "flat-lora-sigma0.2-constant", "sam-lora-rho0.1",
                                                    "sam-full-rho0.1"]
    for space in ("lora-balanced", "tangent", "normal", "merged"):
        assert float(table[f"÷ LoRA {space}"].iloc[0]) == 1.0  # LoRA against itself
        assert f"÷ LoRA {space}" in r.stdout
    assert "[λ₁ (lora-balanced) ÷ λ₁ (merged)] ÷ sam-full's" in r.stdout  # the claim's direct test, 2 pairs
    assert (tmp_path / "demo-eigenvalues.png").stat().st_size > 1000
