"""Discovery and control: entry points, config errors about plugins, the order per hook."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import pytest

from filterhost import Transaction, Verdict, hookimpl
from filterhost.checks import check_configuration
from filterhost.cli import main
from filterhost.config import Problem
from filterhost.pluginmanager import Plugins
from filterhost.testing import ConfigError, Harness
from tests.filterhost_fixtures import write_conf


def _problems(tmp_path: Path, order: list[str], **plugins: object) -> list[Problem]:
    confdir = write_conf(
        tmp_path / "conf.d",
        {"spool": {"directory": str(tmp_path / "spool")}, "plugins": {"order": order}},
    )
    registered = Plugins()
    for name, plugin in plugins.items():
        registered.add(name, plugin)
    _, _, problems = check_configuration(confdir, registered)
    return problems


class Fine:
    @hookimpl
    def filterhost_message(self, transaction: Transaction) -> Verdict | None:
        return None


class Misspelled:
    @hookimpl
    def filterhost_mesage(self, transaction: Transaction) -> None:
        pass


class Wrapper:
    @hookimpl(wrapper=True)
    def filterhost_message(self) -> Generator[None, Verdict | None, Verdict | None]:
        return (yield)


class OldWrapper:
    @hookimpl(hookwrapper=True)
    def filterhost_rcpt(self) -> Generator[None, object, None]:
        yield


class Unmarked:
    def filterhost_message(self, transaction: Transaction) -> None:
        """Forgot @hookimpl: pluggy alone would ignore this silently."""


def test_an_unknown_name_in_the_order_is_an_error(tmp_path: Path) -> None:
    (problem,) = _problems(tmp_path, ["fine", "fien"], fine=Fine())
    assert problem.key == "plugins.order"
    assert problem.file is not None
    assert problem.file.endswith("00-test.toml")
    assert "no installed plugin is named 'fien' (installed: fine)" in problem.message


def test_a_misspelled_hook_is_an_error(tmp_path: Path) -> None:
    (problem,) = _problems(tmp_path, ["typo"], typo=Misspelled())
    assert problem.key == "plugins.typo"
    assert problem.message == (
        "filterhost_mesage is not a filterhost hook (did you mean filterhost_message? "
        "hooks are listed in filterhost.hookspecs)"
    )


@pytest.mark.parametrize(
    ("plugin", "hook"), [(Wrapper(), "filterhost_message"), (OldWrapper(), "filterhost_rcpt")]
)
def test_a_wrapper_on_a_pipeline_hook_is_an_error(
    tmp_path: Path, plugin: object, hook: str
) -> None:
    (problem,) = _problems(tmp_path, ["wrapped"], wrapped=plugin)
    assert problem.key == "plugins.wrapped"
    assert f"{hook} is implemented as a wrapper" in problem.message
    assert "pluggy cannot await" in problem.message


def test_an_unmarked_hook_is_an_error(tmp_path: Path) -> None:
    (problem,) = _problems(tmp_path, ["forgetful"], forgetful=Unmarked())
    assert problem.key == "plugins.forgetful"
    assert "filterhost_message is not marked with @hookimpl" in problem.message


def test_a_clean_plugin_set_has_no_problems(tmp_path: Path) -> None:
    assert _problems(tmp_path, ["fine"], fine=Fine(), other=Fine()) == []


def test_the_harness_refuses_the_same_mistakes() -> None:
    for plugin in (Misspelled(), Wrapper(), Unmarked()):
        with pytest.raises(ConfigError):
            Harness([plugin])


def test_installed_plugins_come_from_the_entry_point_group() -> None:
    plugins = Plugins.discover()
    assert {"clamav", "noexe"} <= set(plugins.installed)
    noexe = plugins.installed["noexe"]
    assert noexe.version == "0.1.0"
    assert noexe.source == "filterhost-example-plugin (filterhost_example_plugin:NoExecutables)"
    assert plugins.load_problems == []


class Everything:
    @hookimpl
    def filterhost_connect(self) -> None: ...

    @hookimpl
    def filterhost_message(self) -> None: ...

    @hookimpl
    def filterhost_shutdown(self) -> None: ...


def test_hook_order_follows_the_operators_order_and_reverses_shutdown(tmp_path: Path) -> None:
    harness = Harness(
        {"a": Everything(), "b": Fine(), "c": Everything(), "idle": Everything()},
        {"plugins": {"order": ["c", "b", "a"]}},
    )
    order = dict(harness._plugins.hook_order(harness.config))
    assert order["filterhost_connect"] == ["c", "a"]
    assert order["filterhost_message"] == ["c", "b", "a"]
    assert order["filterhost_shutdown"] == ["a", "c"]
    assert order["filterhost_route"] == []
    assert next(iter(order)) == "filterhost_add_config"
    assert list(order)[-1] == "filterhost_shutdown"


def test_filterhost_plugins_lists_version_source_and_order_per_hook(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    confdir = write_conf(
        tmp_path / "conf.d",
        {"spool": {"directory": str(tmp_path / "spool")}, "plugins": {"order": ["noexe"]}},
    )
    assert main(["plugins", "-c", str(confdir)]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    lines = out.out.splitlines()
    noexe = next(line for line in lines if line.startswith("noexe "))
    assert noexe.split()[:3] == ["noexe", "0.1.0", "active"]
    assert noexe.endswith("filterhost-example-plugin (filterhost_example_plugin:NoExecutables)")
    clamav = next(line for line in lines if line.startswith("clamav "))
    assert "inactive" in clamav
    hooks = lines[lines.index("hooks:") + 1 : -1]
    assert [h.split()[0] for h in hooks][:5] == [
        "filterhost_add_config",
        "filterhost_check_config",
        "filterhost_configure",
        "filterhost_startup",
        "filterhost_connect",
    ]
    by_hook = {h.split()[0]: h.split()[1:] for h in hooks}
    assert by_hook["filterhost_message"] == ["noexe"]
    assert by_hook["filterhost_check_config"] == ["noexe"]
    assert by_hook["filterhost_route"] == ["-"]
    # Asked of every installed plugin, inactive ones too, so that their tables are checked.
    installed = sorted(line.split()[0] for line in lines[: lines.index("hooks:")])
    assert by_hook["filterhost_add_config"] == " -> ".join(installed).split()
    assert {"clamav", "noexe"} <= set(installed)
    assert lines[-1] == "order: noexe"
