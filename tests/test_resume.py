"""Resumable large uploads against the real servers, with a byte-counting proxy in between.

The upload runs as a real ``skyframe run --once`` subprocess, is killed with SIGKILL midway,
and is started again: the object must be byte-identical to the file, and the bytes that went
through the proxy after the restart must be well under the whole file.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import servers
from conftest import unique_name
from gcs_faithful import FaithfulGCS
from proxy import CountingProxy

from skyframe.builtin import transfer_gcs
from skyframe.config import SinkConfig
from skyframe.errors import DeliveryError
from skyframe.journal import UploadJournal
from skyframe.storage import Sink, TransferRequest, open_sink

MB = 1_000_000
BIG = 200 * MB  #: the kill-and-resume file
KILL_AT = 0.6  #: kill the first run once this share of the file went through the proxy


def write_random(path: Path, size: int, seed: int) -> str:
    """Write ``size`` pseudo-random bytes (deterministic per seed); return their sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    block = hashlib.sha256(str(seed).encode()).digest() * (1 << 15)  # 1 MiB pattern
    counter = 0
    with path.open("wb") as out:
        left = size
        while left:
            # Vary every block so no two parts are equal (an ETag must not match by chance).
            piece = counter.to_bytes(8, "big") + block[8 : min(len(block), left)]
            piece = piece[:left]
            out.write(piece)
            digest.update(piece)
            left -= len(piece)
            counter += 1
    return digest.hexdigest()


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("big") / "survey.mp4"
    return path, write_random(path, BIG, seed=1)


@dataclass
class Remote:
    """One protocol's server behind a proxy, and how to look at what landed."""

    kind: str
    proxy: CountingProxy
    sink: dict[str, Any]
    server: Any

    def sha256(self, name: str) -> str | None:
        """The sha256 of the object at ``name`` under the sink root (None if absent)."""
        fs = self.server.filesystem()
        try:
            path = f"{self.root}/{name}"
            fs.invalidate_cache()
            if not fs.exists(path):
                return None
            digest = hashlib.sha256()
            with fs.open(path, "rb", block_size=8 * 1024 * 1024) as handle:
                while chunk := handle.read(8 * 1024 * 1024):
                    digest.update(chunk)
            return digest.hexdigest()
        finally:
            servers.close_filesystem(fs)

    def metadata_sha256(self, name: str) -> str | None:
        """The sha256 the object carries as metadata (SFTP has none)."""
        if self.kind == "sftp":
            return None
        fs = self.server.filesystem()
        try:
            if self.kind == "s3":
                bucket, key = f"{self.root}/{name}".split("/", 1)
                head = fs.call_s3("head_object", Bucket=bucket, Key=key)
                found: str | None = head.get("Metadata", {}).get("sha256")
                return found
            info = fs.info(f"{self.root}/{name}")
            found = (info.get("metadata") or {}).get("sha256")
            return found
        finally:
            servers.close_filesystem(fs)

    def _uncommitted_blocks(self) -> list[str]:
        from azure.core.exceptions import ResourceNotFoundError

        container, prefix = self.root.split("/", 1)
        with self.server.service() as service:
            found = []
            blobs = service.get_container_client(container).list_blobs(
                name_starts_with=prefix, include=["uncommittedblobs"]
            )
            for blob in blobs:
                client = service.get_blob_client(container, blob.name)
                try:
                    committed, uncommitted = client.get_block_list("all")
                except ResourceNotFoundError:
                    continue
                # Azure discards the uncommitted blocks of a blob when a block list is
                # committed or the blob is put whole; Azurite keeps listing them, so only a
                # blob that was never published counts here.
                if not committed and blob.size == 0:
                    found += [f"{blob.name}:{block.id}" for block in uncommitted]
            return found

    @property
    def root(self) -> str:
        url: str = self.sink["url"]
        if self.kind == "sftp":
            return url.split(str(self.proxy.port), 1)[1]
        return url.split("://", 1)[1]

    def leftovers(self) -> list[str]:
        """Uploads still open on the server: S3 multipart uploads, SFTP temporary files."""
        fs = self.server.filesystem()
        try:
            if self.kind == "s3":
                bucket = self.root.split("/", 1)[0]
                page = fs.call_s3("list_multipart_uploads", Bucket=bucket)
                return [u["Key"] for u in page.get("Uploads", [])]
            if self.kind == "sftp":
                fs.invalidate_cache()
                try:
                    return [p for p in fs.find(self.root, withdirs=False) if ".skyframe-" in p]
                except FileNotFoundError:
                    return []
            if self.kind == "azure":  # blocks staged and never committed
                return self._uncommitted_blocks()
            return []
        finally:
            servers.close_filesystem(fs)


@pytest.fixture(scope="module")
def gcs_behind_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """fake-gcs-server whose session URIs point at a proxy (so chunks are counted)."""
    server = servers.GCSServer(tmp_path_factory.mktemp("gcs-proxied"))
    proxy = CountingProxy(servers.LOOPBACK, server.port)
    proxy.start()
    server.external_url = f"http://{proxy.address}"
    try:
        with server:
            yield server, proxy
    finally:
        proxy.close()


@pytest.fixture(params=["s3", "sftp", "gcs", "azure"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Remote]:
    kind = request.param
    if kind == "gcs":
        server, proxy = request.getfixturevalue("gcs_behind_proxy")
        bucket = unique_name("b")
        server.make_bucket(bucket)
        sink = {
            "url": f"gcs://{bucket}/drop",
            # fake-gcs-server publishes the object on a status query: trust the journal.
            "options": {"endpoint_url": f"http://{proxy.address}", "status_query": False},
        }
        proxy.reset_counts()
        yield Remote(kind, proxy, sink, server)
        return
    if kind == "azure":
        server = request.getfixturevalue("azurite_server")
        proxy = CountingProxy(servers.LOOPBACK, server.port)
        container = unique_name("c")
        server.make_container(container)
        through_proxy = server.connection_string.replace(f":{server.port}/", f":{proxy.port}/")
        sink = {"url": f"az://{container}/drop", "options": {"connection_string": through_proxy}}
    elif kind == "s3":
        server = request.getfixturevalue("s3_server")
        proxy = CountingProxy(servers.LOOPBACK, server.port)
        bucket = unique_name("b")
        server.make_bucket(bucket)
        options = {"endpoint_url": f"http://{proxy.address}", "key": server.key}
        sink = {"url": f"s3://{bucket}/drop", "options": {**options, "secret": server.secret}}
    else:
        server = request.getfixturevalue("sftp_server")
        proxy = CountingProxy(servers.LOOPBACK, server.port)
        known_hosts = tmp_path / "known_hosts"
        # The same host key, vouched for at the proxy's address.
        known_hosts.write_text(
            f"[{servers.LOOPBACK}]:{proxy.port} {server.host_public_key}\n", encoding="utf-8"
        )
        folder = server.root / unique_name("f")
        sink = {
            "url": f"sftp://{server.username}@{servers.LOOPBACK}:{proxy.port}{folder}",
            "options": {"key_file": str(server.client_key), "known_hosts": str(known_hosts)},
        }
    proxy.start()
    try:
        yield Remote(kind, proxy, sink, server)
    finally:
        proxy.close()


def write_config(tmp_path: Path, sink: dict[str, Any], **top: Any) -> Path:
    config = {
        "state_dir": "state",
        "retry": {"max_attempts": 5, "initial": 0.2, "max": 1},
        "pipelines": [
            {"name": "survey", "source": {"path": "incoming", "settle": 0}, "sinks": [sink]}
        ],
        **top,
    }
    path = tmp_path / "skyframe.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path


def skyframe(config: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "skyframe", *args, str(config)],
        cwd=config.parent,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def finish(process: subprocess.Popen[bytes], timeout: float = 180) -> str:
    out, _ = process.communicate(timeout=timeout)
    text = out.decode(errors="replace")
    assert process.returncode == 0, text
    return text


def kill_midway(process: subprocess.Popen[bytes], proxy: CountingProxy, at: int) -> None:
    """SIGKILL the run once ``at`` bytes went up through the proxy."""
    deadline = time.monotonic() + 120
    while proxy.bytes_up < at:
        if process.poll() is not None:
            out = process.stdout.read().decode(errors="replace") if process.stdout else ""
            pytest.fail(f"the run ended before it could be killed midway:\n{out}")
        assert time.monotonic() < deadline, f"only {proxy.bytes_up} bytes went up in 120 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    if process.stdout:
        process.stdout.close()


def journal_entries(tmp_path: Path) -> list[Any]:
    journal = UploadJournal(tmp_path / "state" / "uploads")
    try:
        return journal.entries()
    finally:
        journal.close()


def test_killed_upload_resumes_with_only_the_missing_bytes(
    remote: Remote, big_file: tuple[Path, str], tmp_path: Path
) -> None:
    source, digest = big_file
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    os.link(source, incoming / source.name)
    config = write_config(tmp_path, remote.sink)

    kill_midway(skyframe(config, "-q", "run", "--once"), remote.proxy, int(BIG * KILL_AT))
    first = remote.proxy.bytes_up
    assert remote.sha256(source.name) is None, "a partial object became visible"
    assert journal_entries(tmp_path), "nothing was journaled before the kill"

    remote.proxy.reset_counts()
    text = finish(skyframe(config, "run", "--once"))  # with its warnings
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
        transfer_gcs.skyframe_transfer(request)
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
    st = local.stat()
    request = TransferRequest(
        sink=sink,
        local_path=local,
        remote_path=sink.remote_path(local.name),
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        journal=journal,
    )
    return sink, request


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
            result = transfer_gcs.skyframe_transfer(request)
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
            transfer_gcs.skyframe_transfer(request)
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
            transfer_gcs.skyframe_transfer(request)
        assert journal.entries() == []  # the spent session is forgotten
        assert remote_bytes() is None  # the wrong object is gone

        result = transfer_gcs.skyframe_transfer(request)  # the next attempt, afresh
        assert result is not None
        assert result.sha256 == digest
        assert hashlib.sha256(remote_bytes() or b"").hexdigest() == digest
    finally:
        sink.close()
        journal.close()
