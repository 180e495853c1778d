"""The server goes away while the daemon delivers; files keep arriving; it comes back.

Each test has a server of its own (it is killed or frozen), and a retry policy that would
dead-letter files within a second if an unreachable sink counted as a failed attempt.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
import servers
from helpers import (
    Daemon,
    WriteConfig,
    azure_sink,
    gcs_sink,
    make_file,
    one_sink_config,
    s3_sink,
    sftp_sink,
    wait_for,
)

OUTAGE = 4.0  #: seconds the server stays away: many retry intervals of the policy below


def remote_files(fs: Any, root: str) -> dict[str, bytes]:
    """What the server holds under ``root`` now. A file it cannot give yet counts as missing:
    right after a restart SeaweedFS answers InternalError until its volume server is back."""
    fs.invalidate_cache()
    try:
        found = fs.find(root)
    except OSError:  # FileNotFoundError, or the server still starting
        return {}
    files = {}
    for path in found:
        try:
            files[path.removeprefix(root.rstrip("/") + "/")] = fs.cat_file(path)
        except OSError:
            continue
    return files


def start_server(kind: str, base: Path) -> tuple[Any, dict[str, Any], str]:
    """A server of the kind, a sink on it with short timeouts, and the sink root path."""
    if kind == "s3":
        s3 = servers.S3Server(base).start()
        sink = s3_sink(s3, timeout="3s")
        return s3, sink, sink["url"].removeprefix("s3://")
    if kind == "sftp":
        sftp = servers.SFTPServer(base).start()
        sink = sftp_sink(sftp, timeout="3s", keepalive="1s")
        return sftp, sink, sink["url"].split(str(sftp.port), 1)[1]
    if kind == "azure":
        azurite = servers.AzuriteServer(base).start()
        sink = azure_sink(azurite, timeout="3s")
        return azurite, sink, sink["url"].removeprefix("az://")
    gcs = servers.GCSServer(base).start()
    sink = gcs_sink(gcs, timeout="3s")
    return gcs, sink, sink["url"].removeprefix("gcs://")


@pytest.mark.parametrize("kind", ["s3", "sftp", "gcs", "azure"])
def test_daemon_delivers_everything_across_a_server_outage(
    kind: str,
    tmp_path: Path,
    write_config: WriteConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, sink, root = start_server(kind, tmp_path / "server")
    retry = "{max_attempts: 2, initial: 0.2, max: 1}"
    config = write_config(one_sink_config(sink, pipeline="field", retry=retry))
    expected: dict[str, bytes] = {}

    def add(name: str) -> None:
        expected[name] = os.urandom(20_000)
        make_file(tmp_path / "incoming", name, expected[name])

    caplog.set_level(logging.WARNING, logger="skyframe")
    check = server.filesystem()
    try:
        with Daemon(config) as running:
            for n in range(5):
                add(f"before/{n}.jpg")
            wait_for(lambda: remote_files(check, root) == expected, what="first files", timeout=20)
            servers.close_filesystem(check)
            # GCS: frozen (connections hang until the request timeout); others: gone
            # (connections refused, open ones dead).
            if kind == "gcs":
                server.pause()
            elif kind == "azure":
                server.stop()  # Azurite keeps what it holds across a clean stop only
            else:
                server.kill()
            began = time.monotonic()
            n = 0
            while time.monotonic() - began < OUTAGE:
                add(f"during/{n}.jpg")
                n += 1
                time.sleep(0.25)
            if kind == "gcs":
                server.resume()
            else:
                server.restart()
            check = server.filesystem()
            wait_for(
                lambda: remote_files(check, root) == expected,
                what="every file after the outage",
                timeout=90,
            )
            assert running.engine.queue.counts()["dead"] == 0
    finally:
        servers.close_filesystem(check)
        server.close()
    messages = [r.getMessage() for r in caplog.records]
    if kind != "gcs":  # gcsfs rides out a short freeze with its own retries
        assert any("files wait until it is back" in m for m in messages), messages
        assert any("reachable again" in m for m in messages), messages
    assert not any("giving up" in m for m in messages), messages
