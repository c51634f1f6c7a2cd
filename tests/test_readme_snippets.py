"""Every Python snippet of the README runs as written (issue 12.14): they are executed in order, in
one namespace, in a scratch folder — the digits-sized examples a reader would paste first (digits-mlp pretrained
once per session: conftest's ``shared_digits_pretraining``)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_snippets():
    assert len(python_snippets()) >= 5


def test_every_readme_python_snippet_runs(tmp_path, monkeypatch, shared_digits_pretraining):
    monkeypatch.chdir(tmp_path)  # the snippets write figures/ and runs/
    namespace: dict = {}
    for i, code in enumerate(python_snippets()):
        try:
            exec(compile(code, f"README.md python snippet {i + 1}", "exec"), namespace)
        except Exception as e:  # noqa: BLE001 — name the snippet that failed
            pytest.fail(f"README python snippet {i + 1} failed: {type(e).__name__}: {e}\n{code}")
    assert (tmp_path / "figures" / "digits_lines.png").exists()
