"""The layers, as the imports draw them: the contract and the privacy core import nothing above
them, and the hospital node and the coordinator never import each other (each import statement
is read, lazy ones inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ("federation", "privacy", "clients", "server", "engines", "cli", "experiments")


def _imports(package: str) -> dict[str, set[str]]:
    """Module path -> the top-level fedrisk packages it imports."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names & set(FLOORS)
    return found


@pytest.mark.parametrize("package", ["federation", "privacy"])
def test_the_contract_and_the_privacy_core_import_nothing_above_them(package: str) -> None:
    allowed = {"federation", "privacy"}
    upward = {module: sorted(names - allowed) for module, names in _imports(package).items() if names - allowed}
    assert upward == {}


@pytest.mark.parametrize(("package", "other"), [("clients", "server"), ("server", "clients")])
def test_the_hospital_node_and_the_coordinator_never_import_each_other(package: str, other: str) -> None:
    crossing = sorted(module for module, names in _imports(package).items() if other in names)
    assert crossing == []


def test_the_product_does_not_import_experiments() -> None:
    product = ("federation", "privacy", "clients", "server", "engines")
    crossing = sorted(module for package in product for module, names in _imports(package).items()
                      if "experiments" in names)
    assert crossing == []
