"""Resumable large uploads against the real servers, with a byte-counting proxy in between.

The upload runs as a real ``skyframe run --once`` subprocess, is killed with SIGKILL midway,
and is started again: the object must be byte-identical to the file, and the bytes that went
through the proxy after the restart must be well under the whole file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import servers
from fakes.gcs_faithful import FaithfulGCS
from helpers import (
    Remote,
    file_request,
    finish,
    journal_entries,
    kill_midway,
    start_skyframe,
    unique_name,
    write_random,
    write_sink_config,
)

from skyframe.config import SinkConfig
from skyframe.errors import DeliveryError
from skyframe.journal import UploadJournal
from skyframe.protocols.gcs import plugin as gcs_plugin
from skyframe.storage import Sink, TransferRequest, open_sink

MB = 1_000_000
BIG = 200 * MB  #: the kill-and-resume file
KILL_AT = 0.6  #: kill the first run once this share of the file went through the proxy


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("big") / "survey.mp4"
    return path, write_random(path, BIG, seed=1)


def test_killed_upload_resumes_with_only_the_missing_bytes(
    remote: Remote, big_file: tuple[Path, str], tmp_path: Path
) -> None:
    source, digest = big_file
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    os.link(source, incoming / source.name)
    config = write_sink_config(tmp_path, remote.sink)

    kill_midway(start_skyframe(config, "-q", "run", "--once"), remote.proxy, int(BIG * KILL_AT))
    first = remote.proxy.bytes_up
    assert remote.sha256(source.name) is None, "a partial object became visible"
    assert journal_entries(tmp_path), "nothing was journaled before the kill"

    remote.proxy.reset_counts()
    text = finish(start_skyframe(config, "run", "--once"))  # with its warnings
    second = remote.proxy.bytes_up

    assert remote.sha256(source.name) == digest
    assert remote.metadata_sha256(source.name) == (None if remote.kind == "sftp" else digest)
    # Only what was missing went up again: the rest of the file plus what was in flight.
    bound = BIG * (1 - KILL_AT) + 40 * MB
    if remote.kind == "gcs" and "assembled" in text:
        # The kill fell between fake-gcs-server's answer to a chunk and the journal's update,
        # and the emulator appended the chunk sent again: the object of the wrong size was
        # caught and removed, and the file sent again whole.
        bound += BIG
    assert second < bound, (first, second, text)
    assert journal_entries(tmp_path) == []
    assert remote.leftovers() == []


# --- GCS: the status query, against a protocol-faithful server of our own ------------------
# fake-gcs-server publishes the object on a status query, so the resume path that asks the
# server how much it holds is tested here, and the journal-only path above.

QUANTUM = 256 * 1024


class Stop(Exception):
    """Raised from a progress callback: the process "dies" at that point."""


def die_after(request: TransferRequest, done: int) -> None:
    """Run the transfer until ``done`` bytes are confirmed, then "die" there; the request is
    left ready for the next attempt."""

    def stop_there(sent: int) -> None:
        if sent >= done:
            raise Stop

    request.progress = stop_there
    with pytest.raises(Stop):
        gcs_plugin.skyframe_transfer(request)
    request.progress = lambda sent: None


def gcs_request(
    server: FaithfulGCS | servers.GCSServer,
    tmp_path: Path,
    local: Path,
    journal: UploadJournal,
    bucket: str = "field",
    **options: Any,
) -> tuple[Sink, TransferRequest]:
    config = SinkConfig(
        url=f"gcs://{bucket}/drop",
        options={
            "endpoint_url": server.endpoint_url,
            "token": "anon",
            "chunk_size": QUANTUM,
            **options,
        },
    )
    sink = open_sink(config, tmp_path)
    return sink, file_request(sink, local, journal)


@pytest.mark.parametrize("status_query", [True, False])
def test_gcs_resume_goes_on_from_what_the_server_holds(tmp_path: Path, status_query: bool) -> None:
    local = tmp_path / "ortho.tif"
    digest = write_random(local, 10 * QUANTUM + 1000, seed=2)
    size = local.stat().st_size
    journal = UploadJournal(tmp_path / "uploads")
    with FaithfulGCS() as server:
        server.create_bucket("field")
        sink, request = gcs_request(server, tmp_path, local, journal, status_query=status_query)
        try:
            die_after(request, 4 * QUANTUM)
            (session,) = server.sessions()
            assert server.persisted(session) == 4 * QUANTUM
            # The process died after the server confirmed the 4th chunk and before the
            # journal noted it: the journal is one chunk behind the server.
            journal.update(request.journal_key, offset=3 * QUANTUM)
            assert server.object_bytes("field", "drop/ortho.tif") is None

            before = server.bytes_received
            result = gcs_plugin.skyframe_transfer(request)
            sent = server.bytes_received - before
        finally:
            sink.close()
        assert result is not None
        assert result.sha256 == digest
        assert (
            hashlib.sha256(server.object_bytes("field", "drop/ortho.tif") or b"").hexdigest()
            == digest
        )
        resource = server.object_resource("field", "drop/ortho.tif") or {}
        assert resource["metadata"]["sha256"] == digest
        assert server.sessions() == [session]  # the same session went on
        # Asking sends only what the server lacks; trusting the journal resends one chunk.
        assert sent == size - (4 if status_query else 3) * QUANTUM
    assert journal.entries() == []
    journal.close()


def test_gcs_expired_session_starts_anew(tmp_path: Path) -> None:
    local = tmp_path / "ortho.tif"
    digest = write_random(local, 6 * QUANTUM, seed=3)
    journal = UploadJournal(tmp_path / "uploads")
    with FaithfulGCS() as server:
        server.create_bucket("field")
        sink, request = gcs_request(server, tmp_path, local, journal)
        try:
            die_after(request, 2 * QUANTUM)
            server.expire("all")
            gcs_plugin.skyframe_transfer(request)
        finally:
            sink.close()
        assert len(server.sessions()) == 2
        data = server.object_bytes("field", "drop/ortho.tif") or b""
        assert hashlib.sha256(data).hexdigest() == digest
    journal.close()


def test_gcs_object_of_the_wrong_size_is_removed_and_sent_again(
    gcs_server: servers.GCSServer, tmp_path: Path
) -> None:
    # fake-gcs-server appends a chunk sent twice: trusting a journal one chunk behind the
    # server (a kill between the server's answer and the journal's update) assembles an
    # object too large. It must not be taken for the file.
    local = tmp_path / "ortho.tif"
    digest = write_random(local, 6 * QUANTUM + 100, seed=4)
    bucket = unique_name("b")
    gcs_server.make_bucket(bucket)
    journal = UploadJournal(tmp_path / "uploads")
    sink, request = gcs_request(gcs_server, tmp_path, local, journal, bucket, status_query=False)

    def remote_bytes() -> bytes | None:
        remote = gcs_server.filesystem()
        try:
            remote.invalidate_cache()
            found = remote.exists(request.remote_path)
            return bytes(remote.cat_file(request.remote_path)) if found else None
        finally:
            servers.close_filesystem(remote)

    try:
        die_after(request, 3 * QUANTUM)
        journal.update(request.journal_key, offset=2 * QUANTUM)  # one chunk behind
        with pytest.raises(DeliveryError, match=r"assembled \d+ bytes of"):
            gcs_plugin.skyframe_transfer(request)
        assert journal.entries() == []  # the spent session is forgotten
        assert remote_bytes() is None  # the wrong object is gone

        result = gcs_plugin.skyframe_transfer(request)  # the next attempt, afresh
        assert result is not None
        assert result.sha256 == digest
        assert hashlib.sha256(remote_bytes() or b"").hexdigest() == digest
    finally:
        sink.close()
        journal.close()
