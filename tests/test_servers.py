"""The loopback servers of tests/servers.py: start, use through fsspec, kill, restart, close."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest
import servers
from helpers import wait_for
from servers import (
    SEAWEED_GRPC_OFFSET,
    GCSServer,
    S3Server,
    SFTPServer,
    close_filesystem,
    free_ports,
    gcs_environment,
)

from skyframe.deps import import_asyncssh, import_sshfs


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


def _banner(port: int, timeout: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        return sock.makefile("rb").readline(256)


def _seaweed_strays(ports: list[int]) -> list[Path]:
    tmp = Path(tempfile.gettempdir())
    return [path for port in ports for path in tmp.glob(f"seaweedfs-*-{port}.sock")]


def test_parallel_test_processes_pick_random_ports_from_slices_of_their_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    slices = []
    for worker in ("gw0", "gw1", "gw2"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        slices.append(servers._this_workers_share(20000, 29999))
        ports = free_ports(5, offset=SEAWEED_GRPC_OFFSET)
        low, high = slices[-1]
        assert all(low <= port <= high for port in ports), (worker, ports)
    assert slices == [(20000, 23332), (23333, 26665), (26666, 29998)]
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert servers._this_workers_share(20000, 29999) == (20000, 29999)


def test_free_ports_leave_room_for_grpc() -> None:
    ports = free_ports(5, offset=SEAWEED_GRPC_OFFSET)
    assert len(set(ports)) == 5
    assert all(20000 <= port <= 29999 for port in ports)


def _reads(fs: object, path: str) -> bool:
    try:
        fs.cat_file(path)  # type: ignore[attr-defined]
    except OSError as exc:  # s3fs's error for the gateway's InternalError (errno EREMOTEIO)
        if "internal error" not in str(exc).lower():
            raise
        return False
    return True


def test_s3_server_survives_kill_and_restart(tmp_path: Path) -> None:
    import s3fs  # type: ignore[import-untyped, unused-ignore]

    server = S3Server(tmp_path)
    with server:
        server.make_bucket("bucket")
        options = {
            "endpoint_url": server.endpoint_url,
            "key": server.key,
            "secret": server.secret,
            "client_kwargs": {"region_name": "us-east-1"},
            "skip_instance_cache": True,
        }
        fs = s3fs.S3FileSystem(**options)
        try:
            fs.pipe_file("bucket/hello.txt", b"hello s3")
            assert fs.cat_file("bucket/hello.txt") == b"hello s3"
        finally:
            close_filesystem(fs)
        first_pid = server.pid
        assert first_pid is not None
        server.kill()
        assert not _alive(first_pid)
        server.restart()
        assert server.pid != first_pid
        fs = s3fs.S3FileSystem(**options)
        try:
            # The S3 gateway answers (the probe lists buckets) a moment before the volume
            # server has loaded its volumes again: a read meanwhile is an InternalError.
            wait_for(lambda: _reads(fs, "bucket/hello.txt"), timeout=60, what="the read")
            assert fs.cat_file("bucket/hello.txt") == b"hello s3"
        finally:
            close_filesystem(fs)
        assert "[sw]" in server.rclone_section("sw")
        pid = server.pid
        assert pid is not None
    assert not _alive(pid)
    assert not server.dir.exists()
    assert _seaweed_strays(server.ports) == []


def test_sftp_server_kill_drops_connections(tmp_path: Path) -> None:
    asyncssh = import_asyncssh()
    sshfs = import_sshfs()

    server = SFTPServer(tmp_path)
    with server:
        options = {
            "host": "127.0.0.1",
            "port": server.port,
            "username": server.username,
            "client_keys": [str(server.client_key)],
            "known_hosts": str(server.known_hosts),
            "skip_instance_cache": True,
        }
        path = f"{server.root}/hello.txt"
        fs = sshfs.SSHFileSystem(**options)
        try:
            fs.pipe_file(path, b"hello sftp")
            assert fs.cat_file(path) == b"hello sftp"
            assert server.pid is not None
            sessions = _children(server.pid)
            assert sessions  # sshd forked a process for this connection
            server.kill()
            assert not any(_alive(pid) for pid in sessions)
            # The connection itself is gone, not just the listener. Which error says so
            # depends on when asyncssh notices: before the request, or while it waits.
            gone = (asyncssh.SFTPNoConnection, asyncssh.SFTPConnectionLost)
            with pytest.raises((*gone, asyncssh.ConnectionLost)):
                fs.cat_file(path)
        finally:
            close_filesystem(fs)
        server.restart()
        fs = sshfs.SSHFileSystem(**options)
        try:
            assert fs.cat_file(path) == b"hello sftp"
        finally:
            close_filesystem(fs)
        pid = server.pid
        assert pid is not None
    assert not _alive(pid)
    assert not server.dir.exists()


def test_sftp_wrong_host_key_is_refused(tmp_path: Path) -> None:
    asyncssh = import_asyncssh()
    sshfs = import_sshfs()

    with SFTPServer(tmp_path / "server") as server:
        wrong = server.wrong_known_hosts(tmp_path / "known_hosts")
        assert wrong.read_text().startswith(f"[127.0.0.1]:{server.port} ssh-ed25519 ")
        assert server.host_public_key not in wrong.read_text()
        with pytest.raises(asyncssh.HostKeyNotVerifiable):
            sshfs.SSHFileSystem(
                host="127.0.0.1",
                port=server.port,
                username=server.username,
                client_keys=[str(server.client_key)],
                known_hosts=str(wrong),
                skip_instance_cache=True,
            )


def test_sftp_pause_and_resume(tmp_path: Path) -> None:
    with SFTPServer(tmp_path) as server:
        server.pause()
        with pytest.raises(TimeoutError):
            _banner(server.port, timeout=0.3)
        server.resume()
        assert _banner(server.port, timeout=5).startswith(b"SSH-")


def test_gcs_server_survives_kill_and_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = GCSServer(tmp_path)
    with server:
        for name, value in gcs_environment(server.endpoint_url).items():
            monkeypatch.setenv(name, value)
        import gcsfs  # type: ignore[import-untyped, unused-ignore]

        # gcsfs.GCSFileSystem is the plain class only when gcsfs was first imported with
        # GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false; gcsfs.core's is plain in any case.
        options = {
            "token": "anon",
            "project": "test-project",
            "endpoint_url": server.endpoint_url,
            "skip_instance_cache": True,
        }
        server.make_bucket("bucket")
        fs = gcsfs.core.GCSFileSystem(**options)
        try:
            fs.pipe_file("bucket/hello.txt", b"hello gcs")
            assert fs.cat_file("bucket/hello.txt") == b"hello gcs"
        finally:
            close_filesystem(fs)
        server.kill()
        server.restart()
        fs = gcsfs.core.GCSFileSystem(**options)
        try:
            assert fs.cat_file("bucket/hello.txt") == b"hello gcs"
        finally:
            close_filesystem(fs)
        pid = server.pid
        assert pid is not None
    assert not _alive(pid)
    assert not server.dir.exists()


def test_start_failure_reports_the_log(tmp_path: Path) -> None:
    server = GCSServer(tmp_path)
    server._command = lambda: ["sh", "-c", "echo boom-from-the-log; exit 3"]  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 3.*boom-from-the-log"):
        server.start()
    server.close()
