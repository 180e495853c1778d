"""kill -9 at random moments while files are being written: nothing is lost or left half-done.

The real CLI runs as a subprocess and is killed with SIGKILL several times while a writer
lands ~500 files (written in chunks, some renamed into place, some that the rules reject).
After a last clean run, every accepted file must be in the sink with identical bytes, nothing
rejected may be there, no temporary file may be left, and the manifest must match.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import textwrap
import threading
import time
from pathlib import Path

import pytest
from helpers import outbox_files, spawn_daemon

from skyframe.state import Manifest
from skyframe.storage import TEMP_MARKER

pytestmark = pytest.mark.slow

CONFIG = """\
state_dir: .state
pipelines:
  - name: crash
    source: {path: incoming, settle: 0.3s}
    rules:
      - ignore: {patterns: ["*.skip"]}
    sinks:
      - url: outbox
"""


def write_files(
    root: Path, rng: random.Random, expected: dict[str, bytes], done: threading.Event
) -> None:
    incoming = root / "incoming"
    try:
        for i in range(500):
            folder = incoming / f"flight-{i % 7}"
            folder.mkdir(parents=True, exist_ok=True)
            kind = rng.random()
            data = rng.randbytes(rng.randint(0, 150_000))
            if kind < 0.08:
                name = f"rejected-{i}.skip"
            elif kind < 0.12:
                name = f"partial-{i}.tmp"
            else:
                name = f"IMG_{i:04}.JPG"
            path = folder / name
            if kind > 0.85:  # written elsewhere, then renamed into place
                temp = root / "staging" / name
                temp.parent.mkdir(exist_ok=True)
                temp.write_bytes(data)
                os.rename(temp, path)
            else:  # written in chunks, with pauses shorter than `settle`
                with path.open("wb") as f:
                    for start in range(0, len(data), 50_000):
                        f.write(data[start : start + 50_000])
                        f.flush()
                        time.sleep(rng.uniform(0, 0.02))
            if name.endswith(".JPG"):
                expected[path.relative_to(incoming).as_posix()] = data
            time.sleep(rng.uniform(0, 0.012))
    finally:
        done.set()


@pytest.mark.parametrize("seed", [11, 22, 33])
def test_kill_9_while_files_arrive_loses_nothing(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    (tmp_path / "skyframe.yaml").write_text(textwrap.dedent(CONFIG))
    (tmp_path / "incoming").mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    expected: dict[str, bytes] = {}
    done = threading.Event()
    writer = threading.Thread(target=write_files, args=(tmp_path, rng, expected, done))

    log = logs / "run-0.log"
    daemon = spawn_daemon(tmp_path, log)
    kills = 0
    try:
        writer.start()
        while not done.is_set() or kills < 3:
            time.sleep(rng.uniform(0.2, 1.2))
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(10)
            kills += 1
            log = logs / f"run-{kills}.log"
            daemon = spawn_daemon(tmp_path, log)
        writer.join()
        # Some runs were killed before they even started; wait until the last one is up.
        started = time.monotonic()
        while "watching" not in log.read_text(errors="replace"):
            assert daemon.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() - started < 30, "the last run did not start"
            time.sleep(0.05)

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and outbox_files(tmp_path) != expected:
            time.sleep(0.2)
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(15)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    output = log.read_text(errors="replace")
    assert code == 0, output[-3000:]
    assert kills >= 3

    assert_sink_matches(tmp_path, expected)


def assert_sink_matches(root: Path, expected: dict[str, bytes]) -> None:
    """Every accepted file delivered, byte for byte; nothing else; a manifest that agrees."""
    delivered = outbox_files(root)
    assert not [name for name in delivered if TEMP_MARKER in name], "temporary files left"
    assert sorted(delivered) == sorted(expected), "unexpected files in the sink"
    for relpath, data in expected.items():
        assert delivered[relpath] == data, f"{relpath} differs"
    assert len(expected) > 350

    manifest = Manifest(root / ".state" / "manifest")
    try:
        entries = {rel: entry for _, _, rel, entry in manifest.entries()}
    finally:
        manifest.close()
    assert sorted(entries) == sorted(expected)
    for relpath, entry in entries.items():
        st = (root / "incoming" / relpath).stat()
        assert (entry.size, entry.mtime_ns, entry.remote) == (st.st_size, st.st_mtime_ns, relpath)
        assert entry.sha256 == hashlib.sha256(expected[relpath]).hexdigest()
