"""Decorators, the plugin manager's load order and the registry of rules and processes."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import WriteConfig, write_plugin

from skyframe import FileEvent, Job, process, rule
from skyframe.errors import ConfigError, PluginError
from skyframe.markers import options_check
from skyframe.pipeline import load_project
from skyframe.plugin_manager import get_plugin_manager, private_module_name
from skyframe.registry import Registry


def test_decorators_only_mark() -> None:
    def rule_small(event: FileEvent) -> bool:
        return True

    assert rule(rule_small) is rule_small
    assert rule_small._skyframe_kind == "rule"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("decorator", "name"),
    [(rule, "small"), (rule, "process_small"), (rule, "rule_"), (process, "rule_small")],
)
def test_decorators_enforce_prefix(decorator: object, name: str) -> None:
    def func(x: object) -> None: ...

    func.__name__ = name
    with pytest.raises(TypeError, match="must be named"):
        decorator(func)  # type: ignore[operator]


def test_builtins_are_registered_like_plugins() -> None:
    registry = Registry.from_plugin_manager(get_plugin_manager(load_entry_points=False))
    assert set(registry.rules) == {"ignore", "include", "type", "size", "age", "inside"}
    assert set(registry.processes) == {"checksum", "rename", "sidecar", "geotag", "thumbnail"}
    assert registry.rules["size"].origin == "skyframe.builtin.rules"
    with pytest.raises(TypeError):
        registry.rules["x"] = registry.rules["size"]  # type: ignore[index]


def test_project_files_load_under_private_names(tmp_path: Path) -> None:
    write_plugin(
        tmp_path,
        "rules.py",
        """
        from skyframe import rule

        @rule
        def rule_even(event):
            return event.size % 2 == 0 or "odd size"
    """,
    )
    write_plugin(
        tmp_path,
        "processes.py",
        """
        from skyframe import process

        @process
        def process_tag(job, key: str = "tag"):
            job.meta[key] = True
    """,
    )
    registry = Registry.from_plugin_manager(get_plugin_manager(project_dir=tmp_path))
    assert "even" in registry.rules
    assert "tag" in registry.processes
    assert "rules" not in sys.modules or not hasattr(sys.modules["rules"], "rule_even")
    assert private_module_name(tmp_path / "rules.py").startswith("_skyframe_user.")


def test_plugins_folder_and_imported_functions_not_duplicated(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins",
        "extra.py",
        """
        from skyframe import rule
        from skyframe.builtin.rules import rule_size  # re-exported, not redefined

        @rule
        def rule_never(event):
            \"\"\"Reject everything.\"\"\"
            return False
    """,
    )
    write_plugin(tmp_path / "plugins", "_private.py", "raise RuntimeError('never loaded')\n")
    registry = Registry.from_plugin_manager(get_plugin_manager([tmp_path / "plugins"]))
    assert registry.rules["never"].summary == "Reject everything."
    assert registry.rules["size"].origin == "skyframe.builtin.rules"


def test_duplicate_names_name_both_modules(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins",
        "a.py",
        """
        from skyframe import rule

        @rule
        def rule_size(event):
            return True
    """,
    )
    with pytest.raises(PluginError) as info:
        Registry.from_plugin_manager(get_plugin_manager([tmp_path / "plugins"]))
    message = str(info.value)
    assert "two rules are named 'size'" in message
    assert "skyframe.builtin.rules:rule_size" in message
    assert "a.py:rule_size" in message


def test_hand_written_registration_hook(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins",
        "manual.py",
        """
        from skyframe import hookimpl

        def resize(job, width: int = 100):
            job.meta["width"] = width

        @hookimpl
        def skyframe_register_processes(register):
            register(resize, name="preview")
    """,
    )
    registry = Registry.from_plugin_manager(get_plugin_manager([tmp_path / "plugins"]))
    assert registry.processes["preview"].describe_options() == ["width: int = 100"]


def test_unprefixed_registration_without_name_fails() -> None:
    registry = Registry()

    def tidy(job: Job) -> None: ...

    with pytest.raises(PluginError, match="must be named 'process_<name>'"):
        registry.add("process", tidy)


def test_misspelled_hook_is_caught_by_check_pending(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins",
        "typo.py",
        """
        from skyframe import hookimpl

        @hookimpl
        def skyframe_evnet(event):
            pass
    """,
    )
    with pytest.raises(PluginError, match="skyframe_evnet"):
        get_plugin_manager([tmp_path / "plugins"])


def test_plugin_with_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write_plugin(tmp_path / "plugins", "bad.py", "x = 1\ndef broken(:\n")
    with pytest.raises(PluginError, match=r"bad\.py:2: syntax error"):
        get_plugin_manager([path])


def test_plugin_that_raises_on_import_names_file(tmp_path: Path) -> None:
    path = write_plugin(
        tmp_path / "plugins", "boom.py", "import os\nraise RuntimeError('no camera')\n"
    )
    with pytest.raises(PluginError, match=r"boom\.py:2: cannot load: RuntimeError: no camera"):
        get_plugin_manager([path])


def test_plugin_with_a_nul_byte_names_file_without_a_line(tmp_path: Path) -> None:
    path = write_plugin(tmp_path / "plugins", "nul.py", "x = 1\n\0\n")
    with pytest.raises(PluginError) as info:
        get_plugin_manager([path])
    assert str(info.value) == f"{path}: syntax error: source code string cannot contain null bytes"


def test_a_fifo_among_the_plugins_is_refused_not_waited_on(tmp_path: Path) -> None:
    folder = tmp_path / "plugins"
    folder.mkdir()
    os.mkfifo(folder / "fifo.py")  # importing it would wait for a writer forever
    with pytest.raises(PluginError, match=r"fifo\.py: not a regular file"):
        get_plugin_manager([folder])
    with pytest.raises(PluginError, match="neither a file nor a folder"):
        get_plugin_manager([folder / "fifo.py"])


def test_missing_plugin_path(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="plugin path not found"):
        get_plugin_manager([tmp_path / "nope"])


def install_distribution(site: Path, name: str, entry_points: str) -> None:
    dist = site / f"{name}-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(entry_points).lstrip())


def test_broken_entry_point_is_reported_and_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    site = tmp_path / "site"
    write_plugin(
        site,
        "skyframe_good_plugin.py",
        """
        from skyframe import rule

        @rule
        def rule_from_entry_point(event):
            return True
    """,
    )
    write_plugin(site, "skyframe_bad_plugin.py", "import a_module_that_does_not_exist\n")
    install_distribution(
        site,
        "skyframe_good_plugin",
        """
        [skyframe]
        good = skyframe_good_plugin
    """,
    )
    install_distribution(
        site,
        "skyframe_bad_plugin",
        """
        [skyframe]
        bad = skyframe_bad_plugin
    """,
    )
    monkeypatch.syspath_prepend(str(site))
    pm = get_plugin_manager()
    registry = Registry.from_plugin_manager(pm)
    assert "from_entry_point" in registry.rules
    assert [b.name for b in pm.broken] == ["bad"]
    assert "ModuleNotFoundError" in pm.broken[0].error
    assert "skipping plugin 'bad'" in caplog.text


def test_option_defaults_are_parsed_like_options(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins",
        "defaults.py",
        """
        from skyframe import Size, rule

        @rule
        def rule_big(event, min: Size = "1MB"):
            return event.size >= min
    """,
    )
    registry = Registry.from_plugin_manager(get_plugin_manager([tmp_path / "plugins"]))
    assert registry.rules["big"].validate_options({}) == {"min": 1_000_000}


def test_a_file_listed_twice_is_loaded_once(tmp_path: Path) -> None:
    path = write_plugin(
        tmp_path / "plugins",
        "counted.py",
        """
        import builtins
        builtins.skyframe_test_loads = getattr(builtins, "skyframe_test_loads", 0) + 1
    """,
    )
    import builtins

    builtins.skyframe_test_loads = 0  # type: ignore[attr-defined]
    try:
        get_plugin_manager([path, tmp_path / "plugins"])
        assert builtins.skyframe_test_loads == 1  # type: ignore[attr-defined]
    finally:
        del builtins.skyframe_test_loads  # type: ignore[attr-defined]


def test_a_default_that_does_not_fit_its_type_is_a_plugin_error(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins",
        "bad_default.py",
        """
        from skyframe import rule

        @rule
        def rule_limit(event, count: int = None):
            return True
    """,
    )
    with pytest.raises(
        PluginError, match=r"the default of option 'count' \(None\) does not fit its type int"
    ):
        Registry.from_plugin_manager(get_plugin_manager([tmp_path / "plugins"]))


def test_a_process_name_taken_twice_is_named_in_plain_words() -> None:
    registry = Registry()

    def process_tidy(job: Job) -> None: ...

    registry.add("process", process_tidy)
    with pytest.raises(PluginError, match="two processes are named 'tidy'"):
        registry.add("process", process_tidy)


def test_a_step_checks_its_options_together_when_the_config_loads(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    (tmp_path / "rules.py").write_text(
        textwrap.dedent(
            """
            from skyframe import rule

            def _window(options):
                if options["first"] > options["last"]:
                    raise ValueError("first is after last: no file would pass")
                if options["first"] == 13:
                    raise RuntimeError("a bug in the check")

            @rule(check=_window)
            def rule_window(event, first: int = 0, last: int = 10):
                return True
            """
        )
    )

    def config(first: int, last: int) -> Path:
        return write_config(
            "pipelines:\n"
            "  - name: survey\n"
            "    source: {path: incoming}\n"
            f"    rules: [{{window: {{first: {first}, last: {last}}}}}]\n"
            "    sinks: [{url: outbox}]\n"
        )

    with pytest.raises(ConfigError) as info:
        load_project(config(5, 1))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'skyframe.yaml'}:4:14: pipelines[0].rules[0].window: ")
    assert message.endswith(":rule_window): first is after last: no file would pass")
    with pytest.raises(PluginError, match=r"its options check failed: RuntimeError: a bug in the"):
        load_project(config(13, 20))
    project = load_project(config(1, 2))
    (step,) = [r for r in project.pipelines[0].rules if r.spec.name == "window"]
    assert dict(step.options) == {"first": 1, "last": 2}


def test_the_decorators_take_a_check(tmp_path: Path) -> None:
    def check(options: object) -> None: ...

    @process(check=check)
    def process_noop(job: Job) -> None: ...

    @rule()
    def rule_any(event: FileEvent) -> bool:
        return True

    assert process_noop._skyframe_kind == "process"  # type: ignore[attr-defined]
    assert options_check(process_noop) is check
    assert rule_any._skyframe_kind == "rule"  # type: ignore[attr-defined]
    assert options_check(rule_any) is None
