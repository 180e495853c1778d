"""A test tool: a loopback TCP proxy that counts bytes and can cut connections.

`CountingProxy` listens on 127.0.0.1 (a free port chosen by the kernel) and forwards every
connection it accepts to a target (host, port). One background thread runs a `selectors` loop
over all sockets. The proxy counts the bytes it forwards each way, and simulates failures:

- `cut()` drops every open connection at once (RST both ways), like a link going down;
- `cut_after(n)` does the same from inside the proxy thread once exactly `n` more bytes went
  from clients to the server;
- `refuse(True)` accepts new connections and closes them at once, like an unreachable server.

Linux only (SO_LINGER 0 for resets, TIOCOUTQ to see a socket's unsent bytes). It does not
import skyframe.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import queue
import selectors
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self, TypeVar, cast

LOOPBACK = "127.0.0.1"
RECV_SIZE = 256 * 1024
CALL_TIMEOUT = 10.0  # seconds a caller waits for the proxy thread to run its request
JOIN_TIMEOUT = 10.0
# After `cut_after` fires, how long a server-side socket may take to hand its last bytes to
# the server's kernel before it is reset anyway (only a server that stopped reading waits).
DRAIN_TIMEOUT = 1.0
DRAIN_POLL = 0.001

_LINGER_RST = struct.pack("ii", 1, 0)
_WAKE = object()  # selector data of the wake-up socket
_T = TypeVar("_T")


def _abort(sock: socket.socket) -> None:
    """Close `sock` with SO_LINGER 0, so the peer gets a RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()


def _unsent(sock: socket.socket) -> int:
    """Bytes in `sock`'s kernel send queue the peer has not acknowledged yet (0 if unknown)."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    count: int = struct.unpack("i", raw)[0]
    return count


class _Pipe:
    """One direction of a proxied connection: bytes read from `src`, waiting to go to `dst`."""

    __slots__ = ("dst", "eof", "pending", "shut", "src", "up")

    def __init__(self, src: socket.socket, dst: socket.socket, *, up: bool) -> None:
        self.src = src
        self.dst = dst
        self.up = up  # client -> server
        self.pending: memoryview | None = None
        self.eof = False  # `src` sent its EOF
        self.shut = False  # the EOF was passed on to `dst`


class _Conn:
    """A proxied connection: the accepted client socket and the socket to the target."""

    __slots__ = ("client", "closed", "connected", "down", "masks", "server", "up")

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.connected = False
        self.closed = False
        self.up = _Pipe(client, server, up=True)
        self.down = _Pipe(server, client, up=False)
        self.masks: dict[socket.socket, int] = {client: 0, server: 0}  # 0: not registered


class CountingProxy:
    """Forward TCP connections from 127.0.0.1:`port` to (target_host, target_port), counting.

    `bytes_up` (client -> server), `bytes_down` (server -> client) count bytes handed to the
    receiving side's socket; `connections` counts accepted connections, refused ones included.
    They are plain ints updated by the proxy thread only.
    """

    host = LOOPBACK

    def __init__(self, target_host: str, target_port: int) -> None:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            target_host, target_port, type=socket.SOCK_STREAM
        )[0]
        self.target_host = target_host
        self.target_port = target_port
        self._family = family
        self._target = sockaddr
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self.cut_done = threading.Event()  # set when a `cut_after` trigger has fired
        self._refusing = False
        self._budget: int | None = None  # up bytes still allowed before an armed cut
        self._cutting = False  # budget spent: cut once the pending up bytes are sent
        self._draining: list[tuple[socket.socket, float]] = []
        self._conns: dict[_Conn, None] = {}
        self._calls: queue.SimpleQueue[
            tuple[Callable[[], object], concurrent.futures.Future[object]]
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._error: BaseException | None = None
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((LOOPBACK, 0))
            self._listener.listen(128)
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            raise
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)

    @property
    def address(self) -> str:
        """Where clients connect: "127.0.0.1:PORT"."""
        return f"{self.host}:{self.port}"

    @property
    def open_connections(self) -> int:
        """Proxied connections open right now."""
        return len(self._conns)

    # ----------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> Self:
        """Start the proxy thread; returns self."""
        if self._closed:
            raise RuntimeError("proxy is closed")
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        self._thread = threading.Thread(
            target=self._run, name=f"CountingProxy-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop: close the listener and every connection, join the thread. Idempotent.

        Raises RuntimeError if the proxy thread had failed.
        """
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        if self._thread is not None:
            self._wake()
            self._thread.join(JOIN_TIMEOUT)
            if self._thread.is_alive():
                raise RuntimeError(f"proxy thread {self._thread.name} did not stop")
        else:
            self._cleanup()
        if self._error is not None:
            raise RuntimeError("proxy thread failed") from self._error

    def __enter__(self) -> Self:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------
    # Controls (each runs inside the proxy thread; the caller waits for it)

    def reset_counts(self) -> None:
        """Zero `bytes_up`, `bytes_down` and `connections`."""

        def reset() -> None:
            self.bytes_up = self.bytes_down = self.connections = 0

        self._call(reset)

    def cut(self) -> int:
        """Reset every open proxied connection (both sides); returns how many were cut.

        New connections are still accepted.
        """
        return self._call(self._cut_all)

    def cut_after(self, n_bytes: int) -> None:
        """Arm a one-shot cut: once `bytes_up` has grown by `n_bytes`, cut every connection.

        Exactly `n_bytes` more are forwarded up; nothing beyond. `cut_done` is cleared now and
        set when the cut has happened. Arming again replaces the previous trigger.
        """
        if n_bytes < 0:
            raise ValueError(f"n_bytes must be >= 0, got {n_bytes}")
        self._call(lambda: self._arm(n_bytes))

    def refuse(self, on: bool) -> None:
        """While on, new connections are accepted and reset at once; open ones are unaffected."""
        self._refusing = on

    # ----------------------------------------------------------------------------------------
    # Proxy thread

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` in the proxy thread (directly when the thread is not running)."""
        if self._thread is None or not self._thread.is_alive():
            return fn()
        future: concurrent.futures.Future[object] = concurrent.futures.Future()
        self._calls.put((fn, future))
        self._wake()
        return cast(_T, future.result(CALL_TIMEOUT))

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full wake-up buffer already wakes the loop
            self._wake_w.send(b"\0")

    def _run_calls(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def _run(self) -> None:
        try:
            while not self._stopping:
                timeout = DRAIN_POLL if self._draining else None
                for key, mask in self._sel.select(timeout):
                    if key.data is None:
                        self._accept()
                    elif key.data is _WAKE:
                        self._run_calls()
                    else:
                        conn: _Conn = key.data
                        self._service(conn, cast(socket.socket, key.fileobj), mask)
                if self._cutting:
                    self._fire_if_flushed()
                if self._draining:
                    self._drain()
        except BaseException as exc:
            self._error = exc
        finally:
            self._cleanup()
            self._run_calls()  # callers that raced with close() get an answer

    def _cleanup(self) -> None:
        self._cut_all()
        self._budget = None
        self._cutting = False
        for sock in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            sock.close()
        self._sel.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. out of file descriptors: the next round tries again
                return
            self.connections += 1
            if self._refusing:
                _abort(client)
                continue
            client.setblocking(False)
            server = socket.socket(self._family, socket.SOCK_STREAM)
            server.setblocking(False)
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = server.connect_ex(self._target)
            if err not in (0, errno.EINPROGRESS):
                _abort(client)
                server.close()
                continue
            conn = _Conn(client, server)
            conn.connected = err == 0
            self._conns[conn] = None
            self._update(conn)

    def _service(self, conn: _Conn, sock: socket.socket, mask: int) -> None:
        if conn.closed:  # closed by an earlier event of the same round
            return
        if not conn.connected:  # the connect to the target finished, one way or the other
            if conn.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self._close(conn, abort=True)
                return
            conn.connected = True
            self._update(conn)
            return
        try:
            if mask & selectors.EVENT_WRITE:
                self._flush(conn.up if sock is conn.server else conn.down)
            if mask & selectors.EVENT_READ:
                self._pump(conn.up if sock is conn.client else conn.down)
            for pipe in (conn.up, conn.down):
                if pipe.eof and pipe.pending is None and not pipe.shut:
                    pipe.dst.shutdown(socket.SHUT_WR)
                    pipe.shut = True
        except OSError:
            self._close(conn, abort=True)
            return
        if conn.up.shut and conn.down.shut:
            self._close(conn, abort=False)
        else:
            self._update(conn)

    def _pump(self, pipe: _Pipe) -> None:
        """Read one chunk from `pipe.src` and try to send it on at once."""
        if pipe.pending is not None or pipe.eof:
            return
        size = RECV_SIZE
        if pipe.up and self._budget is not None:
            size = min(size, self._budget)
            if size == 0:
                return
        try:
            data = pipe.src.recv(size)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            pipe.eof = True
            return
        if pipe.up and self._budget is not None:
            self._budget -= len(data)
            if self._budget == 0:
                self._cutting = True
                for conn in list(self._conns):  # stop reading from every client
                    self._update(conn)
        pipe.pending = memoryview(data)
        self._flush(pipe)

    def _flush(self, pipe: _Pipe) -> None:
        """Send what `pipe` holds, as far as the receiving socket takes it."""
        if pipe.pending is None:
            return
        try:
            sent = pipe.dst.send(pipe.pending)
        except (BlockingIOError, InterruptedError):
            return
        if pipe.up:
            self.bytes_up += sent
        else:
            self.bytes_down += sent
        pipe.pending = None if sent == len(pipe.pending) else pipe.pending[sent:]

    def _update(self, conn: _Conn) -> None:
        """Register each socket of `conn` for the events its state calls for."""
        if conn.closed:
            return
        read, write = selectors.EVENT_READ, selectors.EVENT_WRITE
        if conn.connected:
            reading_up = (
                conn.up.pending is None
                and not conn.up.eof
                and not self._cutting
                and self._budget != 0
            )
            client = (read if reading_up else 0) | (write if conn.down.pending is not None else 0)
            reading_down = conn.down.pending is None and not conn.down.eof
            server = (read if reading_down else 0) | (write if conn.up.pending is not None else 0)
        else:
            client, server = 0, write
        for sock, want in ((conn.client, client), (conn.server, server)):
            have = conn.masks[sock]
            if want == have:
                continue
            if have == 0:
                self._sel.register(sock, want, conn)
            elif want == 0:
                self._sel.unregister(sock)
            else:
                self._sel.modify(sock, want, conn)
            conn.masks[sock] = want

    def _close(self, conn: _Conn, *, abort: bool, keep_server: bool = False) -> None:
        """Close `conn`'s sockets (with resets when `abort`); `keep_server` leaves the server
        socket open and unregistered, for the caller to finish."""
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn, None)
        for sock in (conn.client, conn.server):
            if conn.masks[sock]:
                self._sel.unregister(sock)
                conn.masks[sock] = 0
            if keep_server and sock is conn.server:
                continue
            if abort:
                _abort(sock)
            else:
                sock.close()

    def _cut_all(self) -> int:
        conns = list(self._conns)
        for conn in conns:
            self._close(conn, abort=True)
        self._finish_drain()
        return len(conns)

    def _arm(self, n_bytes: int) -> None:
        self._finish_drain()
        self.cut_done.clear()
        # Bytes already read from clients and not sent yet count against the budget.
        budget = n_bytes
        for conn in self._conns:
            pending = conn.up.pending
            if pending is not None:
                if len(pending) > budget:
                    pending = pending[:budget] if budget else None
                    conn.up.pending = pending
                budget -= len(pending) if pending is not None else 0
        self._budget = budget
        self._cutting = budget == 0
        for conn in list(self._conns):
            self._update(conn)

    def _fire_if_flushed(self) -> None:
        """Cut once every byte within the budget has been handed to the server sockets.

        Clients are reset at once; each server socket is reset once its kernel has delivered
        the bytes (or after DRAIN_TIMEOUT), so the server receives exactly the budget.
        """
        if any(conn.up.pending is not None for conn in self._conns):
            return
        self._cutting = False
        self._budget = None
        deadline = time.monotonic() + DRAIN_TIMEOUT
        for conn in list(self._conns):
            self._close(conn, abort=True, keep_server=True)
            self._draining.append((conn.server, deadline))
        if not self._draining:
            self.cut_done.set()

    def _drain(self) -> None:
        now = time.monotonic()
        left = []
        for sock, deadline in self._draining:
            if now < deadline and _unsent(sock) > 0:
                left.append((sock, deadline))
            else:
                _abort(sock)
        self._draining = left
        if not left:
            self.cut_done.set()

    def _finish_drain(self) -> None:
        """Reset the server sockets still draining after a fired `cut_after`."""
        if self._draining:
            for sock, _ in self._draining:
                _abort(sock)
            self._draining = []
            self.cut_done.set()
