"""No module uses another module's private names.

A leading underscore is the project's only privacy: a name a module keeps to
itself, free to change without telling anyone. This test reads every module
of the three packages and refuses

* ``from m import _name`` (or ``import m._private``) of one of our modules, and
* an attribute ``x._name`` that the module itself never defines: neither as
  a function, class or module-level name nor as an attribute it assigns
  (``self._name = ...``) or declares in a class body.

Reaching into an object of a class defined in the same module (``other._x``
in ``__eq__``, a record's own helper) stays allowed: the name is the
module's own. Dunder names are public protocol.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "adapters", "editor_bridge")
# Private names of the standard library and dependencies that are their
# documented way to do a thing.
FOREIGN_ALLOWED = frozenset({"_exit", "_getframe", "_replace", "_asdict", "_fields", "_make"})


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own_names(tree: ast.AST) -> set[str]:
    """Every private name the module defines itself."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name.split(".")[0])
    return {n for n in names if _private(n)}


def violations(source: str, name: str) -> list[str]:
    tree = ast.parse(source, filename=name)
    own = _own_names(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module:
            ours = node.module.split(".")[0] in PACKAGES or node.level > 0
            for alias in node.names:
                if ours and _private(alias.name):
                    origin = "." * node.level + node.module
                    found.append(f"{where}: imports {alias.name} from {origin}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in PACKAGES and any(_private(p) for p in parts[1:]):
                    found.append(f"{where}: imports {alias.name}")
        elif (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and node.attr not in own
            and node.attr not in FOREIGN_ALLOWED
        ):
            found.append(f"{where}: uses {ast.unparse(node)}, private to another module")
    return found


def modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_no_module_uses_another_modules_private_names() -> None:
    found = [
        line
        for path in modules()
        for line in violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    ]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from flows.store import _dumps\n", ["imports _dumps from flows.store"]),
        ("from .store import _dumps\n", ["imports _dumps from .store"]),
        ("import flows._secret\n", ["imports flows._secret"]),
        ("def f(engine):\n    return engine._committer\n", ["uses engine._committer"]),
        ("class A:\n    def __init__(self):\n        self._x = 1\n", []),
        ("class A:\n    _x = 1\n    def same(self, other):\n        return other._x\n", []),
        ("def _helper():\n    pass\n_helper()\n", []),
        ("import os\nos._exit(1)\n", []),
        ("from flows import builtin as _builtin\n", []),
        ("x = a.__class__\n", []),
    ],
)
def test_the_check_sees_what_it_should(source: str, expected: list[str]) -> None:
    # The check itself must be able to fail: each case is a module of its own.
    found = violations(source, "probe.py")
    assert [line.split(": ", 1)[1].split(",")[0] for line in found] == expected
