"""The TCP connection under an SSH session, with the writes of one event-loop turn sent together.

asyncssh hands every SSH packet to the transport on its own: a channel's data goes out in
packets of at most the server's maximum (32 KB for OpenSSH's sessions), each preceded by an
``SSH_MSG_IGNORE``, and asyncio sends each write at once when its buffer is empty. A gigabyte
uploaded over SFTP is then some 65,000 ``send`` system calls, each also running the loopback
or network stack, on the one thread that also encrypts and frames the packets: that thread is
what limits an upload's speed. Gathering the packets written during one turn of the loop into
one ``send`` cuts the calls by an order of magnitude without changing a byte on the wire.

asyncssh accepts, as its ``tunnel`` option, any object that opens the connection it runs over
(:class:`GatheringConnector`); the connection is plain TCP, as it would have opened itself.
It is not used when the user's OpenSSH configuration routes connections to the host through a
proxy (``ProxyJump`` or ``ProxyCommand``), which the ``tunnel`` option would override.
"""

from __future__ import annotations

import asyncio
from typing import Any

from skyframe.deps import import_asyncssh, internal, missed


def routed(host: str, port: int, username: str) -> bool:
    """Whether the user's OpenSSH configuration (``~/.ssh/config`` and what it includes, read
    as asyncssh reads it when it connects) sends connections to this host through a proxy."""
    asyncssh = import_asyncssh()
    options = asyncssh.SSHClientConnectionOptions(
        config=(),  # (): the user's file, as asyncssh.connect's default
        host=host,
        port=port,
        username=username,
        known_hosts=None,
        client_keys=None,
        agent_path=None,
    )
    if not (hasattr(options, "tunnel") and hasattr(options, "proxy_command")):
        # Another asyncssh: assume a proxy, and leave the connection to asyncssh.
        missed("asyncssh", "SSHClientConnectionOptions.tunnel", "assuming a proxy")
        return True
    return bool(options.tunnel or options.proxy_command)


def gathering_supported() -> bool:
    """Whether asyncssh's ``tunnel`` option takes an object that opens the connection (its
    ``_TunnelConnectorProtocol``); where it does not, asyncssh connects by itself."""
    import_asyncssh()
    from asyncssh import connection

    protocol = internal(
        connection, "_TunnelConnectorProtocol", "asyncssh", "connecting without gathered writes"
    )
    return protocol is not None and hasattr(protocol, "create_connection")


class GatheringTransport(asyncio.Transport):
    """A write transport that sends what was written during one loop turn in one call."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._pending.append(bytes(data))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.writelines(pending)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        # asyncssh sends its disconnect message and aborts at once: the message must still
        # reach the socket, as it would have without the gathering.
        self._flush()
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def can_write_eof(self) -> bool:
        return False


class _Relay(asyncio.Protocol):
    """Hands the socket's events to the SSH connection, which writes through the gathering."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.transport: GatheringTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = GatheringTransport(transport, asyncio.get_running_loop())
        self.inner.connection_made(self.transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return bool(self.inner.eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class GatheringConnector:
    """asyncssh's ``tunnel``: opens the TCP connection to the server with gathered writes."""

    async def create_connection(self, session_factory: Any, host: str, port: int) -> Any:
        loop = asyncio.get_running_loop()
        _, relay = await loop.create_connection(lambda: _Relay(session_factory()), host, port)
        assert isinstance(relay, _Relay)
        assert relay.transport is not None
        return relay.transport, relay.inner

    def close(self) -> None:
        """Nothing to close: the connection belongs to the SSH session."""

    async def wait_closed(self) -> None:
        """Nothing to wait for (see :meth:`close`)."""

    def __repr__(self) -> str:
        return "GatheringConnector()"
