"""The core without POSIX-only modules, as on Windows: imports, a delivery, the state lock.

The processes of these tests start with ``tests/fakes/windowsish`` on PYTHONPATH: ``fcntl``,
``termios``, ``resource``, ``pwd`` and ``grp`` cannot be imported there, and ``msvcrt`` offers
its ``locking()`` (on POSIX record locks), so skyframe takes the path it takes on Windows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, skyframe, wait_for

from skyframe import locks

WINDOWSISH = REPO / "tests" / "fakes" / "windowsish"
CONFIG = """\
state_dir: state
api: {listen: "127.0.0.1:0"}
pipelines:
  - name: survey
    source: {path: incoming, settle: 0}
    sinks:
      - url: outbox
"""


def windowsish() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(WINDOWSISH), str(REPO), path]))}


def project(tmp_path: Path) -> Path:
    (tmp_path / "incoming" / "f1").mkdir(parents=True)
    (tmp_path / "incoming" / "f1" / "DJI_0001.JPG").write_bytes(b"photo" * 1000)
    config = tmp_path / "skyframe.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    return config


def test_the_core_imports_without_posix_only_modules(tmp_path: Path) -> None:
    code = (
        "import importlib, sys\n"
        "for name in ('fcntl', 'termios', 'resource', 'pwd', 'grp'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    sys.exit(f'{name} is importable')\n"
        "import skyframe.cli, skyframe.engine, skyframe.api, skyframe.watcher, skyframe.hublink\n"
        "import skyframe.hub.server\n"
        "from skyframe import locks\n"
        "print(locks.backend())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, **windowsish()},
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "msvcrt"


def test_delivery_and_the_state_lock_without_fcntl(tmp_path: Path) -> None:
    config = project(tmp_path)
    env = windowsish()
    once = skyframe(tmp_path, "run", "--once", config.name, env=env)
    assert once.returncode == 0, once.stderr
    assert (tmp_path / "outbox" / "f1" / "DJI_0001.JPG").read_bytes() == b"photo" * 1000

    log = tmp_path / "daemon.log"
    with log.open("ab") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "skyframe", "run", config.name],
            cwd=tmp_path,
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
        )
    try:
        wait_for((tmp_path / "state" / "api.json").exists, timeout=60)
        # The lock is one byte far past the PID it guards: the holder can still be named.
        second = skyframe(tmp_path, "run", "--once", config.name, env=env)
        assert second.returncode != 0
        assert f"another skyframe process (pid {daemon.pid})" in second.stderr
        assert "Traceback" not in second.stderr
        status = skyframe(tmp_path, "status", config.name, env=env)
        assert status.returncode == 0, status.stderr
        assert f"pid {daemon.pid}" in status.stdout
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    assert daemon.returncode == 0, log.read_text(errors="replace")
    (tmp_path / "incoming" / "f1" / "DJI_0002.JPG").write_bytes(b"more")
    after = skyframe(tmp_path, "run", "--once", config.name, env=env)
    assert after.returncode == 0, after.stderr  # the lock went with the daemon
    assert (tmp_path / "outbox" / "f1" / "DJI_0002.JPG").read_bytes() == b"more"


def test_flock_excludes_and_a_shared_look_sees_the_holder(tmp_path: Path) -> None:
    assert locks.backend() == "flock"
    path = tmp_path / "lock"
    path.write_bytes(b"")
    holder, other = os.open(path, os.O_RDWR), os.open(path, os.O_RDWR)
    try:
        assert locks.try_lock(holder)
        assert not locks.try_lock(other)
        assert not locks.try_lock(other, shared=True)
        locks.replace_content(holder, b"1234\n")
        assert locks.read_at_start(other, 32) == b"1234\n"
        locks.unlock(holder)
        assert locks.try_lock(other, shared=True)
        locks.unlock(other)
        assert locks.try_lock(other)
    finally:
        os.close(holder)
        os.close(other)


def test_no_locking_at_all_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(locks, "_fcntl", None)
    monkeypatch.setattr(locks, "_msvcrt", None)
    with pytest.raises(locks.LockingUnavailable, match="file locking is not available"):
        locks.try_lock(0)


def test_the_ci_smoke_script_passes_here_as_on_windows() -> None:
    """.ci/smoke.py is what GitHub Actions runs on Windows and macOS: here, it must pass in
    the windowsish interpreter."""
    done = subprocess.run(
        [sys.executable, str(REPO / ".ci" / "smoke.py")],
        capture_output=True,
        text=True,
        env={**os.environ, **windowsish()},
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("smoke: passed on linux")
