"""Interrupted large uploads against the real servers: a link dropped mid-part, a file that
changed between two runs, and ``skyframe cleanup`` of the uploads left behind.

Every upload goes through a byte-counting proxy (see ``test_resume``), so each test can tell
how much went up again after the interruption, not only that the object ended up right.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import servers
from fakes.proxy import CountingProxy
from helpers import (
    Remote,
    finish,
    journal_entries,
    kill_midway,
    skyframe,
    start_skyframe,
    write_random,
    write_sink_config,
)

from skyframe.journal import JournalKey, UploadJournal

MB = 1_000_000
SIZE = 100 * MB  #: big enough for several S3 parts, GCS chunks and SFTP chunks in flight
HALF = int(SIZE * 0.5)
NAME = "survey.mp4"


def staged(tmp_path: Path, remote: Remote, seed: int) -> tuple[Path, Path, str]:
    """A config delivering incoming/NAME (SIZE random bytes) to the remote; returns the
    config, the file and its sha256."""
    path = tmp_path / "incoming" / NAME
    digest = write_random(path, SIZE, seed=seed)
    return write_sink_config(tmp_path, remote.sink), path, digest


def sink_key(remote: Remote) -> str:
    """The key skyframe records the remote's sink under (its URL, there is no password)."""
    url: str = remote.sink["url"]
    return url


def remote_path(remote: Remote) -> str:
    """The full remote path of NAME on the sink, as the journal and cleanup name it."""
    return f"{remote.root}/{NAME}"


def cleanup(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return skyframe(config.parent, "cleanup", str(config), *args)


# --- 1. a link dropped mid-part ----------------------------------------------------------


def test_link_drop_midway_resends_only_what_was_in_flight(remote: Remote, tmp_path: Path) -> None:
    config, _, digest = staged(tmp_path, remote, seed=11)
    remote.proxy.reset_counts()
    remote.proxy.cut_after(HALF)  # every connection is reset once half the file went up

    out = finish(start_skyframe(config, "-v", "run", "--once"))
    sent = remote.proxy.bytes_up

    assert remote.proxy.cut_done.is_set(), f"the link was never cut ({sent} bytes up)\n{out}"
    assert remote.sha256(NAME) == digest
    # The parts, chunks or writes the server had confirmed were not sent again: only what
    # was in flight when the link dropped (S3 3 x 8 MiB, SFTP 2 x 4 MiB, GCS 16 MiB).
    assert sent < SIZE * 1.35, (sent, out)
    if remote.kind == "sftp":
        # An SSH connection does not survive the cut: the attempt failed and the next one
        # went on from the journaled offset. (botocore and gcsfs retry the request in flight
        # on a new connection by themselves: see the outage test below for S3.)
        resumed = re.search(r"resuming \S+ at byte (\d+)", out)
        assert resumed is not None, out
        assert int(resumed.group(1)) > 0, out
    assert journal_entries(tmp_path) == []
    assert remote.leftovers() == []


def run_through_outage(config: Path, proxy: CountingProxy, at: int) -> tuple[int, str]:
    """Run ``skyframe -v run --once``; once ``at`` bytes went up, cut the link and refuse
    new connections until skyframe gives the attempt up (the client library's own retries
    are spent by then), then let it through. Returns the exit code and the output."""
    process = start_skyframe(config, "-v", "run", "--once")
    lines: list[str] = []
    gave_up = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace")
            lines.append(line)
            if "attempt 1 failed" in line:
                gave_up.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while proxy.bytes_up < at:
            if process.poll() is not None:
                reader.join(10)
                pytest.fail("the run ended before the link was cut:\n" + "".join(lines))
            assert time.monotonic() < deadline, f"only {proxy.bytes_up} bytes went up in 120 s"
            time.sleep(0.005)
        proxy.refuse(True)  # first, so that no retry gets through the cut
        proxy.cut_after(0)
        assert proxy.cut_done.wait(10), "the link was not cut"
        assert gave_up.wait(90), "skyframe never gave the attempt up:\n" + "".join(lines)
    finally:
        proxy.refuse(False)
        try:
            process.wait(180)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
            reader.join(10)
            if process.stdout is not None:
                process.stdout.close()
    return process.returncode, "".join(lines)


@pytest.mark.parametrize("remote", ["s3"], indirect=True)
def test_s3_link_down_longer_than_client_retries_resumes_from_the_journal(
    remote: Remote, tmp_path: Path
) -> None:
    config, _, digest = staged(tmp_path, remote, seed=12)
    remote.proxy.reset_counts()

    code, out = run_through_outage(config, remote.proxy, HALF)
    sent = remote.proxy.bytes_up

    assert code == 0, out
    # The next attempt asked the server for its parts (list_parts) and kept them.
    resumed = re.search(r"resuming \S+: (\d+) of (\d+) part\(s\) on the server", out)
    assert resumed is not None, out
    held, total = int(resumed.group(1)), int(resumed.group(2))
    assert 0 < held < total, out
    assert remote.sha256(NAME) == digest
    assert remote.metadata_sha256(NAME) == digest
    assert sent < SIZE * 1.35, (sent, out)
    assert journal_entries(tmp_path) == []
    assert remote.leftovers() == []  # the first upload was completed, not left beside


# --- 2. the file changed between two runs --------------------------------------------------


def test_file_changed_after_a_kill_is_uploaded_afresh(remote: Remote, tmp_path: Path) -> None:
    config, path, _ = staged(tmp_path, remote, seed=21)
    kill_midway(start_skyframe(config, "-q", "run", "--once"), remote.proxy, HALF)
    assert journal_entries(tmp_path), "nothing was journaled before the kill"
    if remote.kind != "gcs":  # fake-gcs-server's sessions cannot be listed
        assert remote.leftovers() != [], "the killed upload left nothing to resume"

    # Same size, other bytes, a later mtime: the journal record no longer matches.
    before = path.stat()
    new_digest = write_random(path, SIZE, seed=22)
    later = before.st_mtime + 10
    os.utime(path, (later, later))
    assert path.stat().st_size == before.st_size

    remote.proxy.reset_counts()
    out = finish(start_skyframe(config, "-q", "run", "--once"))
    sent = remote.proxy.bytes_up

    assert remote.sha256(NAME) == new_digest, out
    # S3 and GCS objects carry the digest of the new content, not the journaled one.
    assert remote.metadata_sha256(NAME) == (None if remote.kind == "sftp" else new_digest)
    # Nothing of the stale upload was kept: the whole new file went up.
    assert sent >= SIZE, (sent, out)
    assert journal_entries(tmp_path) == []
    # S3: the stale multipart upload was aborted; SFTP: no temporary file is left.
    assert remote.leftovers() == []


def test_file_shrunk_after_a_kill_cancels_the_stale_upload(remote: Remote, tmp_path: Path) -> None:
    config, path, _ = staged(tmp_path, remote, seed=23)
    kill_midway(start_skyframe(config, "-q", "run", "--once"), remote.proxy, HALF)
    assert journal_entries(tmp_path), "nothing was journaled before the kill"

    # Now small enough for one request: the journaled upload can never be resumed.
    later = path.stat().st_mtime + 10
    new_digest = write_random(path, 1 * MB, seed=24)
    os.utime(path, (later, later))
    out = finish(start_skyframe(config, "-q", "run", "--once"))

    assert remote.sha256(NAME) == new_digest, out
    assert journal_entries(tmp_path) == []
    assert remote.leftovers() == []  # S3: the multipart upload was aborted


# --- 3. skyframe cleanup ------------------------------------------------------------------


@pytest.mark.parametrize("remote", ["s3", "sftp"], indirect=True)
def test_cleanup_cancels_only_what_is_idle_long_enough(remote: Remote, tmp_path: Path) -> None:
    config, _, _ = staged(tmp_path, remote, seed=31)
    kill_midway(start_skyframe(config, "-q", "run", "--once"), remote.proxy, HALF)
    ((key, record),) = journal_entries(tmp_path)
    assert key == JournalKey(sink_key(remote), remote_path(remote))
    assert record["protocol"] == remote.kind
    left = remote.leftovers()
    assert len(left) == 1, left
    what = "S3 multipart upload" if remote.kind == "s3" else "SFTP temporary file"

    # Progress stopped seconds ago: not idle for an hour.
    done = cleanup(config, "--older-than", "1h")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "nothing idle for 1h00m (1 upload(s) journaled)", done.stdout
    assert remote.leftovers() == left
    assert len(journal_entries(tmp_path)) == 1

    # A dry run names it and changes nothing.
    done = cleanup(config, "--dry-run", "--older-than", "0s")
    assert done.returncode == 0, done.stdout + done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith(f"ok    {sink_key(remote)} -> {remote_path(remote)}: {what}"), line
    assert "would cancel" in line, line
    assert remote.leftovers() == left
    assert len(journal_entries(tmp_path)) == 1

    # For real: cancelled on the server and forgotten.
    done = cleanup(config, "--older-than", "0s")
    assert done.returncode == 0, done.stdout + done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith(f"ok    {sink_key(remote)} -> {remote_path(remote)}: {what}"), line
    assert "; cancelled (idle " in line, line
    assert remote.leftovers() == []
    assert journal_entries(tmp_path) == []

    # Nothing left to do the next time.
    done = cleanup(config, "--older-than", "0s")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "nothing idle for 0s (0 upload(s) journaled)", done.stdout


def test_cleanup_reports_an_upload_of_a_sink_no_longer_configured(tmp_path: Path) -> None:
    sink: dict[str, Any] = {"url": str(tmp_path / "out")}
    config = write_sink_config(tmp_path, sink)
    (tmp_path / "incoming").mkdir()
    record = {
        "protocol": "s3",
        "bucket": "x",
        "key": "y",
        "size": SIZE,
        "mtime_ns": 0,
        "upload_id": "stale-upload-id",
        "parts": {"1": {"etag": '"0"', "size": 8 * 1024 * 1024}},
    }
    journal = UploadJournal(tmp_path / "state" / "uploads")
    try:
        journal.start(JournalKey("gone-sink", "x/y"), record)
    finally:
        journal.close()

    done = cleanup(config, "--older-than", "0s")
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith(
        "FAIL  gone-sink -> x/y: S3 multipart upload, 1 part(s) sent; sink not in the config"
    ), line
    # It cannot be cancelled without the sink: the record is kept for a later cleanup.
    ((key, kept),) = journal_entries(tmp_path)
    assert key == JournalKey("gone-sink", "x/y")
    assert kept["upload_id"] == "stale-upload-id"


def test_cleanup_keeps_what_it_could_not_cancel(tmp_path: Path) -> None:
    closed = servers.free_port()  # nothing listens there
    sink = {
        "url": "gcs://bkt/drop",
        "options": {"endpoint_url": f"http://127.0.0.1:{closed}", "token": "anon"},
    }
    config = write_sink_config(tmp_path, sink)
    (tmp_path / "incoming").mkdir()
    session = (
        f"http://127.0.0.1:{closed}/upload/storage/v1/b/bkt/o?uploadType=resumable&upload_id=u"
    )
    journal = UploadJournal(tmp_path / "state" / "uploads")
    try:
        journal.start(
            JournalKey("gcs://bkt/drop", "bkt/drop/a.bin"),
            {"protocol": "gcs", "session": session, "offset": 5, "size": SIZE, "mtime_ns": 0},
        )
    finally:
        journal.close()

    done = cleanup(config, "--older-than", "0s")
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith("FAIL  gcs://bkt/drop -> bkt/drop/a.bin: GCS resumable session"), line
    assert "not cancelled" in line, line
    assert len(journal_entries(tmp_path)) == 1  # kept for the next cleanup
