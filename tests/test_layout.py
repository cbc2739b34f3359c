"""The layout of the code: which package may import which, and modules small enough to read in one sitting."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "contracts", "pipelines", "serve", "hashray")
# What each package may import of ours (itself always): models at the bottom,
# the contracts above it, the two wings beside each other, the front door on top.
ALLOWED = {
    "models": set(),
    "contracts": {"models"},
    "pipelines": {"models", "contracts"},
    "serve": {"models", "contracts"},
    "hashray": {"models", "contracts", "pipelines", "serve"},
}
MAX_MODULE_LINES = 350


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("*.py"))


def imported_packages(path: Path) -> set[str]:
    """Top-level names of ours that ``path`` imports, wherever the import sits (functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


def test_every_package_has_modules() -> None:
    assert all(modules(package) for package in PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_the_packages_below_it(package: str) -> None:
    offending = {
        path.name: sorted(imported_packages(path) - ALLOWED[package] - {package})
        for path in modules(package)
        if imported_packages(path) - ALLOWED[package] - {package}
    }
    assert not offending, f"{package} may import only {sorted(ALLOWED[package])}: {offending}"


def test_only_the_front_door_imports_both_wings() -> None:
    both = [
        f"{package}/{path.name}"
        for package in PACKAGES
        for path in modules(package)
        if {"pipelines", "serve"} <= imported_packages(path)
    ]
    assert all(name.startswith("hashray/") for name in both), both


def test_the_import_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from serve.app import build_app\n    import pipelines.train\n")
    assert imported_packages(source) == {"serve", "pipelines"}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_is_longer_than_a_sitting(package: str) -> None:
    long = {path.name: n for path in modules(package) if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


@pytest.mark.parametrize("module", ["serve.catalog", "serve.shard"])
def test_replicas_that_hold_no_model_do_not_import_torch(module: str) -> None:
    # torch costs a process about 700 MiB resident: the catalog and every shard would pay it for nothing.
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
