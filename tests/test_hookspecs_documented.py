"""The plugin contract is documented: every hookspec in its docstring and in docs/plugins.md.

After datasette's ``test_plugin_hooks_are_documented``: a hook without a section in the guide
(headed by its exact signature), or without a docstring that names every argument, its call
mode, what it may change and when it was added, fails the build. The guide's code blocks must
be exactly the snippets they include, which the test suite runs (tests/docs_examples/).
"""

from __future__ import annotations

import inspect
import re
import tomllib
from collections.abc import Callable
from typing import Any

import pytest

from filterhost import hookspecs
from filterhost.testing import Harness
from tests.docs_examples import guide_plugins, snippets

HOOKS: dict[str, Callable[..., Any]] = {
    name: getattr(hookspecs, name)
    for name in dir(hookspecs)
    if name.startswith("filterhost_") and callable(getattr(hookspecs, name))
}
GUIDE = snippets.GUIDE.read_text(encoding="utf-8")


def signature(hook: Callable[..., Any]) -> str:
    """``name(arg: Type, ...) -> Return``, from the spec's annotations as written."""
    annotations = dict(hook.__annotations__)
    returns = annotations.pop("return")
    args = ", ".join(f"{name}: {annotations[name]}" for name in inspect.signature(hook).parameters)
    return f"{hook.__name__}({args}) -> {returns}"


def test_every_hook_is_in_the_order_and_every_spec_is_a_hook() -> None:
    assert set(hookspecs.HOOKS_IN_ORDER) == set(HOOKS)
    assert len(hookspecs.HOOKS_IN_ORDER) == len(HOOKS)
    assert set(HOOKS) > hookspecs.PIPELINE_HOOKS
    # The spec marker is on every one of them (a plain function would not be a hook).
    for hook in HOOKS.values():
        assert hasattr(hook, "filterhost_spec"), hook.__name__


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hookspec_docstring_is_complete(name: str) -> None:
    hook = HOOKS[name]
    doc = inspect.getdoc(hook)
    assert doc, f"{name} has no docstring"
    summary = doc.splitlines()[0]
    assert summary.endswith("."), f"{name}: the first line is a one-sentence summary"
    for arg in inspect.signature(hook).parameters:
        assert re.search(rf"^:param {arg}: \S", doc, re.MULTILINE), f"{name}: no :param {arg}:"
    documented = re.findall(r"^:param (\w+):", doc, re.MULTILINE)
    assert documented == list(inspect.signature(hook).parameters), f"{name}: stale :param"
    if hook.__annotations__["return"] != "None":
        assert re.search(r"^:return: \S", doc, re.MULTILINE), f"{name}: no :return:"
    assert re.search(r"^Call mode: (chain|first|observe|every)", doc, re.MULTILINE), name
    assert re.search(r"^May change: \S", doc, re.MULTILINE), f"{name}: say what it may change"
    assert re.search(r"^\.\. versionadded:: \d+\.\d+", doc, re.MULTILINE), name
    pipeline = name in hookspecs.PIPELINE_HOOKS
    plain = "Must be a plain ``def``" in " ".join(doc.split())
    assert plain is not pipeline, f"{name}: say that a setup hook must not be async"


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_has_a_section_in_the_guide_with_its_exact_signature(name: str) -> None:
    heading = f"### `{signature(HOOKS[name])}`"
    assert heading in GUIDE.splitlines(), f"docs/plugins.md has no line {heading!r}"


def test_the_guide_has_no_section_for_a_hook_that_does_not_exist() -> None:
    headed = re.findall(r"^### `(filterhost_\w+)\(", GUIDE, re.MULTILINE)
    assert sorted(headed) == sorted(HOOKS)


def test_every_python_and_toml_block_of_the_guide_is_an_included_snippet() -> None:
    blocks = snippets.blocks(GUIDE)
    checked = [b for b in blocks if b.lang in ("python", "toml")]
    assert len(checked) >= 15
    for block in checked:
        assert block.include is not None, (
            f"docs/plugins.md:{block.line}: a {block.lang} block without an "
            "<!-- include: PATH#NAME --> line above it"
        )
        expected = snippets.snippet(*block.include)
        assert block.code == expected, (
            f"docs/plugins.md:{block.line}: differs from {block.include}; "
            "run python -m tests.docs_examples.snippets"
        )


def test_every_example_plugin_snippet_is_in_the_guide() -> None:
    included = {b.include for b in snippets.blocks(GUIDE) if b.include is not None}
    for module in (
        "tests/docs_examples/guide_plugins.py",
        "tests/docs_examples/test_guide_testing.py",
    ):
        names = re.findall(r"# -- start ([\w-]+) --", (snippets.REPO / module).read_text())
        for name in names:
            assert (module, name) in included, f"{module}#{name} is not used in the guide"


def test_the_guides_toml_examples_are_valid() -> None:
    conf = tomllib.loads(snippets.snippet("tests/docs_examples/conf/20-plugins.toml", None))
    harness = Harness(
        {
            "sizecap": guide_plugins.SizeCap,
            "reputation": guide_plugins.Reputation,
            "noexe": _noexe(),
        },
        conf,
    )
    assert harness.config.plugins.order == ["sizecap", "reputation", "noexe"]
    assert harness.hooks.impls("filterhost_message")[1].settings.timeout == 5.0
    pyproject = tomllib.loads(snippets.snippet("tests/docs_examples/nospam-pyproject.toml", None))
    assert pyproject["project"]["entry-points"]["filterhost.plugins"] == {"nospam": "nospam"}


def _noexe() -> object:
    from filterhost_example_plugin import NoExecutables  # noqa: PLC0415 - an installed example

    return NoExecutables
