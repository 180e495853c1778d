"""The command's entry point: light to load, and a Ctrl-C while the rest loads ends it with one
line rather than a traceback."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

import skyframe


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_the_package_and_the_entry_point_load_without_the_libraries(tmp_path: Path) -> None:
    code = """if True:
        import sys
        import skyframe.launch
        heavy = ("pydantic", "fsspec", "click", "yaml", "skyframe.storage", "skyframe.cli")
        print(sorted(name for name in heavy if name in sys.modules))
    """
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_public_names_load_on_first_use() -> None:
    from skyframe.markers import hookimpl
    from skyframe.storage import Sink

    assert skyframe.hookimpl is hookimpl
    assert skyframe.Sink is Sink
    assert set(skyframe.__all__) <= set(dir(skyframe))
    assert sorted(skyframe._EXPORTS) == sorted(skyframe.__all__)  # one list, kept whole
    for name in skyframe.__all__:
        assert getattr(skyframe, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = skyframe.nothing_here


def test_ctrl_c_while_the_command_line_loads_ends_it_in_one_line(tmp_path: Path) -> None:
    # A real SIGINT, delivered while skyframe.cli is being imported (where a crew's Ctrl-C in
    # the first few tenths of a second lands): exit 130 and one line, no traceback.
    code = """if True:
        import builtins, os, signal, sys, time
        sys.argv = ["skyframe", "run", "skyframe.yaml"]
        real_import = builtins.__import__

        def importing(name, *args, **kwargs):
            if name == "skyframe.cli":
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the handler raises KeyboardInterrupt here
            return real_import(name, *args, **kwargs)

        builtins.__import__ = importing
        from skyframe.launch import main
        main()
    """
    done = run_python(code, tmp_path)
    assert done.returncode == 130
    assert done.stderr == "skyframe: interrupted while starting\n"
    assert done.stdout == ""


def test_ctrl_c_while_the_config_loads_ends_the_command_in_one_line(tmp_path: Path) -> None:
    # Past the start, before the run's own handling of SIGINT: the config being read, or the
    # sinks checked over a slow link. Click alone would print "Aborted!" and exit 1.
    code = """if True:
        import os, signal, sys, time
        import skyframe.pipeline
        sys.argv = ["skyframe", "run", "skyframe.yaml"]

        def load_project(path):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises KeyboardInterrupt here

        skyframe.pipeline.load_project = load_project
        from skyframe.launch import main
        main()
    """
    done = run_python(code, tmp_path)
    assert done.returncode == 130
    assert done.stderr == "skyframe: interrupted\n"
    assert done.stdout == ""


def test_the_skyframe_command_starts_at_the_light_entry_point() -> None:
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="skyframe")
    assert script.value == "skyframe.launch:main"
