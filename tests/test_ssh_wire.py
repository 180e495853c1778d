"""The SSH connection's gathered writes: one socket write per loop turn, nothing lost or
reordered, the disconnect message still sent on abort, and no gathering where the user's
OpenSSH configuration routes the host through a proxy."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import servers

from skyframe.deps import import_sshfs
from skyframe.protocols.sftp import backend as sftp_backend
from skyframe.protocols.sftp.ssh_wire import GatheringConnector, GatheringTransport, routed


class RecordingTransport(asyncio.Transport):
    """Stands in for the socket transport: records each call that would reach the socket."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, bytes]] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.calls.append(("write", bytes(data)))

    def writelines(self, list_of_data: Any) -> None:
        self.calls.append(("write", b"".join(list_of_data)))

    def abort(self) -> None:
        self.calls.append(("abort", b""))
        self.closing = True

    def close(self) -> None:
        self.calls.append(("close", b""))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 7


def test_writes_of_one_loop_turn_reach_the_socket_as_one() -> None:
    async def scenario() -> list[tuple[str, bytes]]:
        raw = RecordingTransport()
        gathered = GatheringTransport(raw, asyncio.get_running_loop())
        for piece in (b"a", b"bc", b"def"):
            gathered.write(piece)
        assert raw.calls == []  # nothing sent yet: the turn is not over
        assert gathered.get_write_buffer_size() == 7 + 6
        await asyncio.sleep(0)
        gathered.write(memoryview(b"gh"))
        await asyncio.sleep(0)
        return raw.calls

    assert asyncio.run(scenario()) == [("write", b"abcdef"), ("write", b"gh")]


@pytest.mark.parametrize("ending", ["abort", "close"])
def test_abort_and_close_send_what_is_pending_first(ending: str) -> None:
    async def scenario() -> list[tuple[str, bytes]]:
        raw = RecordingTransport()
        gathered = GatheringTransport(raw, asyncio.get_running_loop())
        gathered.write(b"disconnect")
        getattr(gathered, ending)()
        gathered.write(b"late")  # after the end: dropped, as asyncio drops it
        await asyncio.sleep(0)
        return raw.calls

    assert asyncio.run(scenario()) == [("write", b"disconnect"), (ending, b"")]


def write_ssh_config(home: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(text, encoding="utf-8")
    monkeypatch.setenv("HOME", str(home))


def test_routed_hosts_follow_the_users_ssh_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_ssh_config(
        tmp_path,
        "Host jumped\n  ProxyJump gateway.example\n"
        "Host proxied\n  ProxyCommand nc %h %p\n"
        "Host *.lan\n  User survey\n",
        monkeypatch,
    )
    assert routed("jumped", 22, "me")
    assert routed("proxied", 22, "me")
    assert not routed("storage.lan", 22, "me")
    assert not routed("127.0.0.1", 2222, "me")


def sftp_filesystem(server: servers.SFTPServer) -> tuple[Any, Any]:
    endpoint = sftp_backend.endpoint(
        f"sftp://{server.username}@127.0.0.1:{server.port}{server.root}",
        {"key_file": str(server.client_key), "known_hosts": str(server.known_hosts)},
        Path("."),
    )
    return endpoint, endpoint.connect()


def test_sftp_connection_gathers_its_writes(
    sftp_server: servers.SFTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no user ssh config
    opened: list[GatheringConnector] = []

    def connector() -> GatheringConnector:
        opened.append(GatheringConnector())
        return opened[-1]

    monkeypatch.setattr(sftp_backend, "GatheringConnector", connector)
    endpoint, fs = sftp_filesystem(sftp_server)
    payload = os.urandom(3 * 1024 * 1024 + 5)
    target = f"{sftp_server.root}/gathered-{os.getpid()}.bin"
    try:
        fs.pipe_file(target, payload)
        # Every byte arrived intact through the gathered connection.
        assert hashlib.sha256(fs.cat_file(target)).digest() == hashlib.sha256(payload).digest()
        assert len(opened) == 1
        assert isinstance(fs._client._transport, GatheringTransport)
        fs.rm(target)
    finally:
        endpoint.close(fs)


def test_sftp_connection_to_a_routed_host_is_not_gathered(
    sftp_server: servers.SFTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The user routes this host through a proxy: the tunnel option would override it.
    write_ssh_config(tmp_path, "Host 127.0.0.1\n  ProxyCommand nc %h %p\n", monkeypatch)
    captured: dict[str, Any] = {}

    class Capture(Exception):
        pass

    def fake_filesystem(host: str, **kwargs: Any) -> Any:
        captured.update(kwargs)
        raise Capture

    sshfs = import_sshfs()
    monkeypatch.setattr(sshfs, "SSHFileSystem", fake_filesystem)
    endpoint = sftp_backend.endpoint(
        f"sftp://{sftp_server.username}@127.0.0.1:{sftp_server.port}/x",
        {"key_file": str(sftp_server.client_key), "known_hosts": str(sftp_server.known_hosts)},
        Path("."),
    )
    with pytest.raises(Capture):
        endpoint.connect()
    assert "tunnel" not in captured
