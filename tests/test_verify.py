"""``skyframe verify``: what the manifest says was delivered is checked on the real sinks.

Against a local folder, SeaweedFS (S3), fake-gcs-server (GCS) and OpenSSH (SFTP): an object
deleted and one replaced by another writer behind skyframe's back are both found, an object
nothing accounts for is listed, and ``--repair`` has the next run send them again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import servers
from helpers import WriteConfig, gcs_sink, make_file, run_once, s3_sink, sftp_sink, skyframe

from skyframe.pipeline import load_project
from skyframe.verify import verify

KINDS = ["local", "s3", "gcs", "sftp"]


def sink_for(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if kind == "local":
        return {"url": str(tmp_path / "outbox")}
    if kind == "s3":
        return s3_sink(request.getfixturevalue("s3_server"))
    if kind == "gcs":
        server: servers.GCSServer = request.getfixturevalue("gcs_server")
        return gcs_sink(server)
    return sftp_sink(request.getfixturevalue("sftp_server"))


def config_for(sink: dict[str, Any]) -> str:
    return (
        "state_dir: .state\n"
        "retry: {max_attempts: 1, initial: 10ms, max: 10ms}\n"
        "pipelines:\n"
        "  - name: survey\n"
        "    source: {path: incoming, recursive: true, settle: 0}\n"
        "    sinks:\n"
        f"      - {json.dumps(sink)}\n"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_verify_finds_what_changed_behind_skyframes_back_and_repairs_it(
    kind: str, tmp_path: Path, write_config: WriteConfig, request: pytest.FixtureRequest
) -> None:
    for name in ("a.jpg", "b.jpg", "c/d.jpg"):
        make_file(tmp_path / "incoming", name, f"photo {name}".encode() * 100)
    config = write_config(config_for(sink_for(kind, request, tmp_path)))
    assert run_once(config).delivered == 3
    project = load_project(config)
    (sink,) = project.pipelines[0].sinks
    state = project.config.state_path
    clean = verify(project.pipelines, state, deep=True)
    assert (clean.checked, clean.hashed, clean.findings) == (3, 3, [])
    fs = sink.fs
    fs.rm(sink.remote_path("a.jpg"))  # deleted behind skyframe's back
    size = fs.info(sink.remote_path("c/d.jpg"))["size"]
    fs.pipe_file(sink.remote_path("c/d.jpg"), b"x" * size)  # same size, other bytes
    fs.pipe_file(sink.remote_path("stray.txt"), b"not ours")

    # Without --deep: S3 and GCS tell by the sha256 they keep, SFTP by the server's
    # sha256sum; a folder by size only.
    quick = verify(project.pipelines, state)
    expected = {("missing", "a.jpg"), ("extra", "stray.txt")}
    if kind != "local":
        expected.add(("different", "c/d.jpg"))
    assert {(f.kind, f.relpath or f.remote) for f in quick.findings} == expected
    # Hashed: b.jpg, and on SFTP c/d.jpg (on S3 and GCS the replaced object has no sha256).
    assert quick.hashed == {"local": 0, "s3": 1, "gcs": 1, "sftp": 2}[kind]
    deep = verify(project.pipelines, state, deep=True)
    assert {(f.kind, f.relpath or f.remote) for f in deep.findings} == {
        ("missing", "a.jpg"),
        ("different", "c/d.jpg"),
        ("extra", "stray.txt"),
    }

    done = skyframe(tmp_path, "verify", "--deep", "--repair")
    assert done.returncode == 1
    lines = sorted(done.stdout.splitlines())
    assert lines[0].startswith("different\tsurvey\t")
    assert lines[0].endswith("\tqueued again")
    assert "missing\tsurvey" in lines[2]
    assert done.stderr.strip().endswith("1 missing, 1 different, 1 extra")
    assert run_once(config).delivered == 2  # the repaired two, sent again
    assert fs.cat_file(sink.remote_path("c/d.jpg")) == b"photo c/d.jpg" * 100
    after = verify(project.pipelines, state, deep=True)
    assert [(f.kind, f.remote) for f in after.findings] == [("extra", "stray.txt")]
    for each in project.pipelines[0].sinks:
        each.close()


def test_verify_with_nothing_delivered_yet_says_so(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    write_config(config_for({"url": "outbox"}))
    done = skyframe(tmp_path, "verify")
    assert done.returncode == 0
    assert done.stderr.strip() == "verify: 0 recorded object(s) checked, 0 by sha256: all in place"
    assert not (tmp_path / ".state").exists()


class FakeDone:
    def __init__(self, exit_status: int, stdout: str) -> None:
        self.exit_status, self.stdout = exit_status, stdout


class FakeSSH:
    """An sshfs-like filesystem whose server answers ``execute`` as told."""

    def __init__(self, answer: FakeDone | BaseException) -> None:
        self.answer = answer
        self.commands: list[str] = []

    def execute(self, command: str, **kwargs: Any) -> FakeDone:
        self.commands.append(command)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def test_sftp_hashes_on_the_server_and_copes_with_one_that_cannot() -> None:
    import asyncssh

    from skyframe.protocols.sftp.transfer import remote_sha256

    digest = "ab" * 32
    fs = FakeSSH(FakeDone(0, f"\\{digest}  /drop/it\\nis.jpg\n"))
    assert remote_sha256(fs, "/drop/it\nis.jpg") == digest
    assert fs.commands == ["sha256sum -- '/drop/it\nis.jpg'"]  # quoted for the shell
    with pytest.raises(FileNotFoundError):
        remote_sha256(FakeSSH(FakeDone(1, "")), "/drop/gone.jpg")
    # An SFTP-only account (the session is refused) or no sha256sum there: sizes only, and
    # that server is not asked again.
    for answer in (
        asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "no shells"),
        FakeDone(127, ""),
        FakeDone(0, "This service allows sftp connections only.\n"),
    ):
        fs = FakeSSH(answer)
        assert remote_sha256(fs, "/drop/a.jpg") is None
        assert remote_sha256(fs, "/drop/b.jpg") is None
        assert len(fs.commands) == 1
    with pytest.raises(OSError, match="the SSH connection failed"):
        remote_sha256(FakeSSH(asyncssh.ConnectionLost("reset")), "/drop/a.jpg")
