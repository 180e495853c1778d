"""Bad credentials, a wrong host key, an unknown bucket, an unreachable server: one clear line
from ``skyframe check`` and from ``skyframe run``, never a traceback, and nothing delivered.

The real CLI runs in a subprocess against the real servers.
"""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import servers
from helpers import (
    WriteConfig,
    gcs_sink,
    make_file,
    one_sink_config,
    s3_sink,
    sftp_sink,
    skyframe,
)


def write_project(write_config: WriteConfig, sink: dict[str, Any]) -> Path:
    retry = "{max_attempts: 1, initial: 0.1, max: 0.1}"
    config = write_config(one_sink_config(sink, pipeline="field", retry=retry, settle="0"))
    make_file(config.parent / "incoming", "a.jpg", b"A" * 100)
    return config


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def s3_wrong_secret(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    return s3_sink(request.getfixturevalue("s3_server"), secret="not-the-secret")


def s3_unknown_bucket(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    server: servers.S3Server = request.getfixturevalue("s3_server")
    sink = s3_sink(server, key=server.writer_key, secret=server.writer_secret)
    return {**sink, "url": "s3://no-such-bucket-here/drop"}


def sftp_wrong_host_key(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    server: servers.SFTPServer = request.getfixturevalue("sftp_server")
    wrong = server.wrong_known_hosts(tmp_path / "known_hosts")
    return sftp_sink(server, known_hosts=str(wrong))


def sftp_unauthorized_key(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    server: servers.SFTPServer = request.getfixturevalue("sftp_server")
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    return sftp_sink(server, key_file=str(other))


def gcs_unknown_bucket(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    sink = gcs_sink(request.getfixturevalue("gcs_server"))
    return {**sink, "url": "gcs://no-such-bucket-here/drop"}


CASES: dict[str, tuple[Callable[[pytest.FixtureRequest, Path], dict[str, Any]], str]] = {
    "s3-wrong-secret": (s3_wrong_secret, r"access denied \(SignatureDoesNotMatch\)"),
    "s3-unknown-bucket": (s3_unknown_bucket, r"bucket 'no-such-bucket-here' does not exist"),
    "sftp-wrong-host-key": (sftp_wrong_host_key, r"host key of .*@127\.0\.0\.1:\d+ is not trusted"),
    "sftp-unauthorized-key": (sftp_unauthorized_key, r"authentication failed for .*@127\.0\.0\.1"),
    "gcs-unknown-bucket": (gcs_unknown_bucket, r"bucket 'no-such-bucket-here' does not exist"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refusal_is_one_clear_line_from_check_and_run(
    case: str, request: pytest.FixtureRequest, tmp_path: Path, write_config: WriteConfig
) -> None:
    make_sink, pattern = CASES[case]
    config = write_project(write_config, make_sink(request, tmp_path))

    checked = skyframe(tmp_path, "check", str(config))
    assert checked.returncode == 1, checked.stderr
    [line] = checked.stdout.splitlines()
    assert line.startswith("FAIL  field -> "), line
    assert re.search(pattern, line), line
    assert "Traceback" not in checked.stderr

    ran = skyframe(tmp_path, "run", "--once", str(config))
    assert ran.returncode == 1, ran.stderr
    errors = [x for x in ran.stderr.splitlines() if x.startswith("skyframe: error:")]
    assert len(errors) == 1, ran.stderr
    assert re.search(pattern, errors[0]), errors[0]
    assert "Traceback" not in ran.stderr
    assert "not-the-secret" not in checked.stdout + ran.stderr  # secrets are never printed
    # The source is scanned while the sink is checked, and the refusal cuts the scan short:
    # the file waits in the queue if the scan had found it by then (the next run's scan finds
    # it otherwise), and never with an attempt counted against it.
    listed = skyframe(tmp_path, "queue", "list", "-c", str(config))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() in ([], ["pending\tfield\ta.jpg\tupload\t0\t\t"])


def test_unreachable_sink_fails_check_but_run_queues(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    sink = {
        "url": "s3://bucket/drop",
        "options": {
            "endpoint_url": f"http://127.0.0.1:{closed_port()}",
            "key": "k",
            "secret": "s",
            "timeout": "2s",
        },
    }
    config = write_project(write_config, sink)
    checked = skyframe(tmp_path, "check", str(config))
    assert checked.returncode == 1
    [line] = checked.stdout.splitlines()
    assert "cannot reach the server" in line, line
    # --once: a warning, then attempts that fail; the file waits in the dead-letter list.
    ran = skyframe(tmp_path, "run", "--once", str(config))
    assert ran.returncode == 1
    assert "files queue until it answers" in ran.stderr
    assert "Traceback" not in ran.stderr
    listed = skyframe(tmp_path, "queue", "list", "-c", str(config))
    assert "a.jpg" in listed.stdout


def test_host_key_check_off_connects_to_an_unknown_host_with_a_warning(
    sftp_server: servers.SFTPServer, tmp_path: Path, write_config: WriteConfig
) -> None:
    sink = sftp_sink(sftp_server, host_key_check=False)
    del sink["options"]["known_hosts"]  # nothing vouches for this server
    config = write_project(write_config, sink)
    checked = skyframe(tmp_path, "check", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith("ok    field -> sftp://")
    assert "host key checking is off" in checked.stderr
