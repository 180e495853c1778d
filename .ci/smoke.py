"""A smoke test of an installed skyframe on any platform, with nothing but local folders.

    python .ci/smoke.py

In a temporary folder: ``validate`` and ``run --once`` of a pipeline with ``geotag`` (a real
drone photo from tests/data/drone), the photo delivered byte for byte; a daemon (``run``)
that holds the state directory, so that a second ``run --once`` is refused naming it and
``status`` answers; the daemon stopped, after which a run goes again; the service file of
this platform (``service install --print``). Exit 0 when every step passed, else 1 with the
step that failed. GitHub Actions runs it on Windows and macOS (.github/workflows/ci.yml); the
test suite runs it on Linux, also with the POSIX-only modules unavailable.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHOTO = REPO / "tests" / "data" / "drone" / "ebee-snowpeak"
CONFIG = """\
state_dir: state
api: {listen: "127.0.0.1:0"}
shutdown_grace: 5s
pipelines:
  - name: survey
    source: {path: incoming, settle: 0, recursive: true}
    processes: [geotag]
    sinks:
      - url: outbox
"""
TIMEOUT = 120.0


class Failed(Exception):
    """A step did not do what it should; the message says which and how."""


def skyframe(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "skyframe", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def expect(step: str, done: subprocess.CompletedProcess[str], code: int = 0) -> str:
    if done.returncode != code:
        raise Failed(f"{step}: exit {done.returncode}, expected {code}\n{done.stdout}{done.stderr}")
    print(f"ok: {step}")
    return done.stdout + done.stderr


def smoke(folder: Path) -> None:
    photo = sorted(PHOTO.glob("*.JPG"))[0]
    (folder / "incoming" / "flight 1").mkdir(parents=True)
    shutil.copyfile(photo, folder / "incoming" / "flight 1" / photo.name)
    (folder / "skyframe.yaml").write_text(CONFIG, encoding="utf-8")

    expect("validate", skyframe(folder, "validate", "skyframe.yaml"))
    expect("run --once", skyframe(folder, "run", "--once", "skyframe.yaml"))
    delivered = folder / "outbox" / "flight 1" / photo.name
    if not delivered.is_file() or delivered.read_bytes() != photo.read_bytes():
        raise Failed(f"run --once: {delivered} is not the photo")
    history = expect("history", skyframe(folder, "history", "-c", "skyframe.yaml"))
    if photo.name not in history:
        raise Failed(f"history does not name {photo.name}:\n{history}")

    log = folder / "daemon.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "skyframe", "run", "skyframe.yaml"],
            cwd=folder,
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (folder / "state" / "api.json").exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise Failed(f"the daemon did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.2)
        refused = expect(
            "a second process is refused", skyframe(folder, "run", "--once", "skyframe.yaml"), 1
        )
        if f"pid {daemon.pid}" not in refused or "Traceback" in refused:
            raise Failed(f"the refusal does not name the daemon (pid {daemon.pid}):\n{refused}")
        status = expect("status", skyframe(folder, "status", "skyframe.yaml"))
        if f"pid {daemon.pid}" not in status:
            raise Failed(f"status does not show the daemon:\n{status}")
    finally:
        daemon.terminate()  # SIGTERM, or TerminateProcess on Windows
        try:
            daemon.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    (folder / "incoming" / "flight 1" / "notes.txt").write_text("second run", encoding="utf-8")
    expect("run --once after the daemon", skyframe(folder, "run", "--once", "skyframe.yaml"))
    if not (folder / "outbox" / "flight 1" / "notes.txt").is_file():
        raise Failed("run --once after the daemon did not deliver notes.txt")
    shown = skyframe(folder, "service", "install", "--print", "skyframe.yaml")
    service = expect("service install --print", shown)
    if "skyframe" not in service or "run" not in service:
        raise Failed(f"the service file does not run skyframe:\n{service}")


def main() -> int:
    folder = Path(tempfile.mkdtemp(prefix="skyframe-smoke-"))
    try:
        smoke(folder)
    except (Failed, subprocess.TimeoutExpired) as exc:
        print(f"smoke: failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"smoke: passed on {sys.platform}, Python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
