"""The dependency rules of DESIGN.md, checked on every import statement in the tree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RULES = {
    "shared": {"coordinator", "site_client"},
    "coordinator": {"site_client"},
    "site_client": {"coordinator"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text("utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(RULES))
def test_packages_respect_the_dependency_rule(package: str) -> None:
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _files(package)
        for name in _imports(path)
        if name.split(".")[0] in RULES[package]
    ]
    assert not bad, bad


def test_site_core_never_imports_qt() -> None:
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _files("site_client/core")
        for name in _imports(path)
        if name.split(".")[0] in {"PySide6", "shiboken6", "pyqtgraph"}
    ]
    assert not bad, bad


def test_the_rules_see_real_imports() -> None:
    """Guard against a rule that cannot fail: the scanner finds known imports."""
    assert "shared.protocol.session" in _imports(ROOT / "coordinator" / "server.py")
