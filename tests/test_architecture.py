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


def test_the_command_is_the_top_nothing_imports_cli() -> None:
    crossing = sorted(module for package in FLOORS if package != "cli"
                      for module, names in _imports(package).items() if "cli" in names)
    assert crossing == []


PRODUCT = ("federation", "privacy", "clients", "server", "engines", "cli")


def _inline_audit_actions(source: str, filename: str = "<source>") -> list[str]:
    """Audit appends whose action is not a `privacy.audit` constant: `<file>:<line> <action>`.

    An append counts when its receiver reads as an audit log (`audit`, `self.audit`,
    `state.audit()`, the signals trail's `self.log`). Its action must be a name imported from
    `privacy.audit`, or a parameter of the enclosing function that forwards one."""
    tree = ast.parse(source, filename=filename)
    constants = {alias.asname or alias.name for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module == "privacy.audit" for alias in node.names}
    found: list[str] = []

    def visit(node: ast.AST, parameters: frozenset[str]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            parameters = frozenset(a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "append"
                and ("audit" in ast.unparse(node.func.value).lower() or ast.unparse(node.func.value) == "self.log")):
            action = node.args[0] if node.args else None
            if not (isinstance(action, ast.Name) and (action.id in constants or action.id in parameters)):
                found.append(f"{filename}:{node.lineno} {ast.unparse(action) if action else '(no action)'}")
        for child in ast.iter_child_nodes(node):
            visit(child, parameters)

    visit(tree, frozenset())
    return found


def test_every_audit_append_in_the_product_names_its_action_by_a_privacy_audit_constant() -> None:
    spelled = [hit for package in PRODUCT for path in sorted((ROOT / package).rglob("*.py"))
               for hit in _inline_audit_actions(path.read_text(), str(path.relative_to(ROOT)))]
    assert spelled == []


def test_the_audit_action_check_catches_an_action_spelled_inline() -> None:
    source = '''
from privacy.audit import RELEASE
def f(state, audit, action):
    state.audit().append("release.made", details={})
    audit.append(f"round.{action}")
    audit.append(RELEASE)
    audit.append(action)
    errors = []; errors.append("not an audit log")
'''
    assert _inline_audit_actions(source) == ["<source>:4 'release.made'", "<source>:5 f'round.{action}'"]


def test_every_tiered_test_file_exists_so_no_file_silently_changes_tier() -> None:
    from tests.conftest import E2E_TIER, UNIT_TIER

    files = {path.name for path in (ROOT / "tests").rglob("test_*.py")}
    assert not UNIT_TIER & E2E_TIER
    assert sorted((UNIT_TIER | E2E_TIER) - files) == []
