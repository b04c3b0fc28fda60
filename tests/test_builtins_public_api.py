"""Built-in and example plugins use only the public API, and install no module named ``plugins``.

DESIGN.md section 3: a third-party author can copy a built-in as a template, so a built-in may
only use what a third party can: the names in ``filterhost.__all__`` (tests: and
``filterhost.testing.__all__``). A private helper a built-in needs becomes public.
"""

from __future__ import annotations

import ast
import configparser
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hatchling.builders.wheel import WheelBuilder

import filterhost
import filterhost.testing

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted(
    p
    for root in (REPO / "plugins", REPO / "examples")
    for p in root.rglob("*.py")
    if "__pycache__" not in p.parts
)
PUBLIC = {"filterhost": set(filterhost.__all__)}
PUBLIC_FOR_TESTS = {**PUBLIC, "filterhost.testing": set(filterhost.testing.__all__)}


def _is_test(path: Path) -> bool:
    return "tests" in path.relative_to(REPO).parts or path.name.startswith("test_")


def violations(tree: ast.AST, allowed: dict[str, set[str]]) -> Iterator[str]:
    """Every use of filterhost beyond ``allowed`` (module -> public names) in ``tree``."""
    aliases: dict[str, str] = {}  # local name -> filterhost module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            root = node.module.split(".")[0]
            if root != "filterhost":
                continue
            if node.level or node.module not in allowed:
                yield f"line {node.lineno}: from {node.module} import ..."
                continue
            for alias in node.names:
                if alias.name not in allowed[node.module]:
                    yield f"line {node.lineno}: {alias.name} is not in {node.module}.__all__"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "filterhost":
                    continue
                if alias.name not in allowed:
                    yield f"line {node.lineno}: import {alias.name}"
                else:
                    aliases[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node.value)
            if dotted in aliases and node.attr not in allowed[aliases[dotted]]:
                if f"{aliases[dotted]}.{node.attr}" in allowed:
                    continue  # filterhost.testing reached as an attribute, in a test
                yield f"line {node.lineno}: {dotted}.{node.attr} is not public"


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


def test_there_is_something_to_check() -> None:
    names = {p.name for p in SOURCES}
    assert "clamav.py" in names
    assert "test_noexe_harness.py" in names


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(REPO)) for p in SOURCES])
def test_only_public_names_are_imported(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    allowed = PUBLIC_FOR_TESTS if _is_test(path) else PUBLIC
    assert list(violations(tree, allowed)) == []


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("from filterhost import Verdict, hookimpl", []),
        ("from filterhost.verdict import Verdict", ["line 1: from filterhost.verdict import ..."]),
        ("from filterhost import HookRunner", ["line 1: HookRunner is not in filterhost.__all__"]),
        ("import filterhost.dispatch", ["line 1: import filterhost.dispatch"]),
        ("import filterhost as fh\nfh.Verdict\nfh.spool", ["line 3: fh.spool is not public"]),
        ("from filterhost.testing import Harness", ["line 1: from filterhost.testing import ..."]),
        (
            "from filterhost.testing._harness import Harness",
            ["line 1: from filterhost.testing._harness import ..."],
        ),
    ],
)
def test_the_checker_finds_private_uses(source: str, found: list[str]) -> None:
    assert list(violations(ast.parse(source), PUBLIC)) == found


def test_tests_may_use_filterhost_testing() -> None:
    tree = ast.parse("from filterhost.testing import Harness, make_transaction")
    assert list(violations(tree, PUBLIC_FOR_TESTS)) == []
    tree = ast.parse("from filterhost.testing import _harness")
    assert list(violations(tree, PUBLIC_FOR_TESTS)) == [
        "line 1: _harness is not in filterhost.testing.__all__"
    ]


def _wheel(project: Path, directory: Path) -> zipfile.ZipFile:
    builder = WheelBuilder(str(project))
    (path,) = builder.build(directory=str(directory), versions=["standard"])
    return zipfile.ZipFile(path)


def _entry_points(wheel: zipfile.ZipFile) -> dict[str, dict[str, str]]:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment, method-assign]  # keep names as written
    parser.read_string(wheel.read(name).decode())
    return {section: dict(parser[section]) for section in parser.sections()}


def test_the_wheel_installs_no_top_level_plugins_module(tmp_path: Path) -> None:
    wheel = _wheel(REPO, tmp_path)
    names = wheel.namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"filterhost", "filterhost_builtins"}
    assert {"filterhost/py.typed", "filterhost_builtins/py.typed"} <= set(names)
    assert "filterhost/testing/pytest_plugin.py" in names
    entry_points = _entry_points(wheel)
    builtins = entry_points["filterhost.plugins"]
    assert builtins["clamav"] == "filterhost_builtins.clamav:ClamavPlugin"
    assert all(target.startswith("filterhost_builtins.") for target in builtins.values())
    assert entry_points["pytest11"] == {"filterhost": "filterhost.testing.pytest_plugin"}


def test_the_example_plugin_is_a_package_of_its_own(tmp_path: Path) -> None:
    wheel = _wheel(REPO / "examples" / "filterhost-example-plugin", tmp_path)
    names = wheel.namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"filterhost_example_plugin"}
    assert "filterhost_example_plugin/py.typed" in names
    entry_points = _entry_points(wheel)
    assert entry_points == {
        "filterhost.plugins": {"noexe": "filterhost_example_plugin:NoExecutables"}
    }
