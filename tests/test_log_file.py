"""``log_file``: the daemon's log also in a file of the state directory, rotated by size."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import skyframe

from skyframe.cli import _log_to_file
from skyframe.config import load_config

CONFIG = """\
state_dir: state
{log_file}
pipelines:
  - name: survey
    source: {{path: incoming, settle: 0}}
    sinks:
      - url: outbox
"""


def project(tmp_path: Path, log_file: str) -> Path:
    (tmp_path / "incoming").mkdir(exist_ok=True)
    (tmp_path / "incoming" / "a.jpg").write_bytes(b"a" * 100)
    config = tmp_path / "skyframe.yaml"
    config.write_text(CONFIG.format(log_file=log_file), encoding="utf-8")
    return config


@pytest.fixture
def root_handlers() -> Iterator[None]:
    """The handlers the test adds to the root logger are closed and removed after it."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in before:
            handler.close()
    root.handlers[:] = before
    root.setLevel(level)


def test_a_run_logs_to_the_state_directory(tmp_path: Path) -> None:
    config = project(tmp_path, "log_file: true")
    done = skyframe(tmp_path, "-q", "run", "--once", config.name)
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "state" / "skyframe.log").read_text(encoding="utf-8").splitlines()
    started = rf" INFO skyframe: skyframe \S+ \(pid \d+\): run --once of {re.escape(str(config))}"
    assert re.search(started + "$", lines[0]), lines[0]
    assert lines[-1].endswith(
        "INFO skyframe: skyframe stopped: delivered 1 file(s) (100 B), 0 unchanged, 0 failed, "
        "0 dead-lettered"
    )
    assert done.stderr == ""  # -q: the terminal shows none of it


def test_the_file_rotates_and_keeps_no_password(tmp_path: Path, root_handlers: None) -> None:
    config = project(tmp_path, "log_file: {path: logs/daemon.log, max_size: 20kB, count: 2}")
    _log_to_file(load_config(config))
    logger = logging.getLogger("skyframe.test-log-file")
    for n in range(1000):
        logger.info("line %04d: s3://field:hunter2@s3.example.org/bucket %s", n, "x" * 40)
    logger.debug("not kept at the info level")
    for handler in logging.getLogger().handlers:
        handler.flush()
    folder = tmp_path / "state" / "logs"
    assert sorted(p.name for p in folder.iterdir()) == [
        "daemon.log",
        "daemon.log.1",
        "daemon.log.2",
    ]
    text = "".join(p.read_text(encoding="utf-8") for p in folder.iterdir())
    assert all(p.stat().st_size <= 20_000 for p in folder.iterdir())
    assert "line 0999" in (folder / "daemon.log").read_text(encoding="utf-8")
    assert "hunter2" not in text
    assert "s3://field:***@s3.example.org/bucket" in text
    assert "not kept" not in text


def test_log_file_settings_and_errors(tmp_path: Path) -> None:
    assert load_config(project(tmp_path, "log_file: false")).log_file is None
    assert load_config(project(tmp_path, "")).log_file is None
    settings = load_config(project(tmp_path, "log_file: true")).log_file
    assert settings is not None
    assert (settings.path, settings.max_size, settings.count) == ("skyframe.log", 10 << 20, 5)
    project(tmp_path, "log_file: {count: 0}")
    bad = skyframe(tmp_path, "run", "--once", "skyframe.yaml")
    assert bad.returncode == 2
    assert bad.stderr.startswith("skyframe: error: skyframe.yaml:2:")
    assert "log_file.count" in bad.stderr
    (tmp_path / "state" / "taken").mkdir(parents=True)
    project(tmp_path, "log_file: {path: taken}")  # a folder where the file would be
    refused = skyframe(tmp_path, "run", "--once", "skyframe.yaml")
    assert refused.returncode == 1
    assert refused.stderr.startswith("skyframe: error: log_file: cannot write ")
    assert "Traceback" not in refused.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_log_file_that_cannot_be_written_is_said_once_without_a_traceback(
    tmp_path: Path,
) -> None:
    project(tmp_path, "log_file: {path: /dev/full}")  # every write: no space left on device
    done = skyframe(tmp_path, "run", "--once", "skyframe.yaml")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "skyframe: warning: log_file: cannot write /dev/full: No space left on device"
    ]
    assert (tmp_path / "outbox" / "a.jpg").exists()


def test_a_log_file_that_cannot_rotate_without_a_stderr_logs_on(
    tmp_path: Path, root_handlers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Windows service runs pythonw, which has no stderr: saying the problem there raised
    # AttributeError in whichever thread was logging. A rotation that fails (Windows: another
    # program holds the old file) is met outside the handler's own writing, where nothing
    # else catches that.
    config = project(tmp_path, "log_file: {path: daemon.log, max_size: 10kB, count: 1}")
    _log_to_file(load_config(config))
    (tmp_path / "state" / "daemon.log.1").mkdir()  # cannot be removed to make room
    monkeypatch.setattr("sys.stderr", None)
    log = logging.getLogger("skyframe.test-log-file")
    for i in range(200):  # no exception escapes logging
        log.warning("line %d of a log that outgrows its 10 kB", i)
    assert (tmp_path / "state" / "daemon.log.1").is_dir()  # the rotation did fail


def test_a_debug_log_keeps_no_line_per_exif_tag(tmp_path: Path) -> None:
    # geotag reads each photo with Pillow, which logs every EXIF tag it meets at debug level.
    config = project(tmp_path, "log_file: {level: debug}")
    photo = next((Path(__file__).parent / "data" / "drone").rglob("*.JPG"))
    (tmp_path / "incoming" / "a.jpg").write_bytes(photo.read_bytes())
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace("    sinks:", "    processes: [geotag]\n    sinks:"), "utf-8")
    done = skyframe(tmp_path, "-q", "run", "--once", config.name)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "state" / "skyframe.log").read_text(encoding="utf-8")
    assert " DEBUG skyframe" in text or " DEBUG fsspec" in text  # the debug lines are there
    assert " PIL." not in text
