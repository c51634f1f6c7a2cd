"""The layout's rules, read from the source: imports run one way, scripts and tests stay thin, and the
declared dependency floors cover the APIs the code calls."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return names


def files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def layer(module: str) -> int:
    """flatlora 0 < landscape 1 < landscape.hessian 2 < landscape.study 3; other modules -1."""
    if module == "landscape.hessian" or module.startswith("landscape.hessian."):
        return 2
    if module == "landscape.study" or module.startswith("landscape.study."):
        return 3
    return {"flatlora": 0, "landscape": 1}.get(module.split(".")[0], -1)


@pytest.mark.parametrize("folder", ["flatlora", "landscape"])
def test_imports_run_one_way(folder):
    """No module imports a layer above its own (landscape/__init__ may re-export the Hessian)."""
    wrong = []
    for path in files(folder):
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        allowed = 2 if mod == "landscape" else layer(mod)
        wrong += [f"{mod} imports {m}" for m in imported_modules(path) if layer(m) > allowed]
    assert not wrong, wrong


def test_landscape_does_not_import_the_study():
    """`import landscape` leaves landscape.study unloaded (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = "import sys, landscape; print(any(m.startswith('landscape.study') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_scripts_import_only_packages():
    """analysis_scripts edit no sys.path and import no other script."""
    scripts = {p.stem for p in files("analysis_scripts")}
    for path in files("analysis_scripts"):
        assert "sys.path" not in path.read_text(), path
        assert not {m.split(".")[0] for m in imported_modules(path)} & scripts, path


def test_tests_never_import_test_modules():
    for path in files("tests"):
        bad = {m for m in imported_modules(path) if m.split(".")[0].startswith(("test_", "conftest", "dist_"))}
        assert not bad, f"{path.name} imports {bad}"


# API → the release that introduced it (a floor the project must declare when the code calls it)
API_FLOORS = {
    r"torch\.get_autocast_dtype|torch\.is_autocast_enabled\(\w": ("torch", (2, 4)),
    r"np\.trapezoid": ("numpy", (2, 0)),
}


def declared_floor(package: str) -> tuple[int, ...]:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(rf'"{package}>=([0-9.]+)"', text)
    assert m, f"pyproject.toml declares no floor for {package}"
    return tuple(int(x) for x in m.group(1).split("."))


@pytest.mark.parametrize("pattern", list(API_FLOORS))
def test_dependency_floors_cover_the_apis_used(pattern):
    package, floor = API_FLOORS[pattern]
    used = [p for folder in ("flatlora", "landscape", "tests") for p in files(folder)
            if p.name != Path(__file__).name and re.search(pattern, p.read_text())]
    if used:
        assert declared_floor(package) >= floor, f"{[p.name for p in used]} need {package} >= {floor}"
