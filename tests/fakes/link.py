"""A test and benchmark tool: a field link (bandwidth, round trip, cuts, outages) on loopback.

`LinkEmulator` listens on 127.0.0.1 (a free port chosen by the kernel) and forwards every
connection to a target (host, port), the way a slow, far, flaky uplink would carry it:

- **Bandwidth**: one token bucket per direction, shared by every connection, so that four
  parallel uploads share 40 Mbit/s as they would share a 4G uplink. Upstream (client ->
  server) is limited by `up_bps`; downstream by `down_bps` (None: unlimited). A sender with
  more to send reads up to `READ_AHEAD` ahead of the link, as into a bottleneck's queue.
- **Round trip**: each chunk is released to the other side half the round trip (`rtt / 2`)
  after it passed the bucket, in order. Reading goes on meanwhile, so a pipe of bandwidth x
  delay is in flight, as on a real link. Opening a connection costs one round trip (the TCP
  handshake): the server is dialled `rtt` after the client connected.
- **Cuts**: `cut()` resets every open connection (RST both ways); `cut_every` does it on a
  timer from `start()`.
- **Outages**: `outage(seconds)` (or `outages=[(at, seconds), ...]` from `start()`) cuts
  every open connection and, for the duration, resets each new one at once
  (`outage_mode="refuse"`) or holds it without forwarding anything until the link is back
  (`"stall"`, as a client's SYNs that are answered only once the link returns).
- **Counts**: `bytes_up`, `bytes_down` (bytes handed to the receiving side), `connections`
  (accepted), `cut_connections` (reset by a cut or an outage), `refused`.

What it does not emulate: loss and TCP's own reaction to it (slow start, window limits over a
long round trip): both sides talk TCP to the proxy over loopback. One asyncio loop in a
background thread runs everything; `close()` stops it and closes every socket. Linux only
(SO_LINGER 0 for resets). It does not import skyframe.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Literal, Self, TypeVar

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 10.0
CALL_TIMEOUT = 10.0
JOIN_TIMEOUT = 10.0
MIN_CHUNK = 4 * 1024
MAX_CHUNK = 64 * 1024
CHUNK_SECONDS = 0.005  # a chunk takes at most about this long to pass a limited link
QUEUE_BYTES = 4 * 1024 * 1024  # least room for chunks in flight, per direction and connection
#: How far ahead of the link a backlogged reader may run (a bottleneck's queue): the emulator's
#: own lateness on a busy machine, up to this, costs the link no capacity.
READ_AHEAD = 0.05

_LINGER_RST = struct.pack("ii", 1, 0)
_T = TypeVar("_T")
OutageMode = Literal["refuse", "stall"]


def mbit(value: float) -> float:
    """Bits per second in `value` Mbit/s (1 Mbit = 10**6 bits)."""
    return value * 1_000_000


class TokenBucket:
    """A shared budget of bytes per second: `reserve(n)` says when n bytes have passed.

    Tokens may go negative: a reservation beyond the tokens at hand is granted at once and
    the debt makes later reservations wait, so callers pass in the order they reserved (a FIFO
    link). `burst` bytes of credit accumulate while the link is idle.
    """

    def __init__(self, bytes_per_second: float, burst: float, now: float) -> None:
        if bytes_per_second <= 0:
            raise ValueError(f"rate must be > 0, got {bytes_per_second}")
        self.rate = bytes_per_second
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def reserve(self, size: int, now: float) -> float:
        """Take `size` bytes; returns the time at which they have passed the link."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= size
        return now if self.tokens >= 0 else now - self.tokens / self.rate


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0, so the peer gets a RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


class _Conn:
    """One proxied connection: its two sides and the tasks that pump it."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.server: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False
        self.ended = 0  # directions whose EOF was passed on

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        for side in (self.client, self.server):
            if side is not None:
                _abort(side)
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


class LinkEmulator:
    """Forward TCP connections from 127.0.0.1:`port` to (target_host, target_port) through an
    emulated link. Rates are in bits per second (`mbit(40)`), times in seconds."""

    host = LOOPBACK

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        up_bps: float | None = None,
        down_bps: float | None = None,
        rtt: float = 0.0,
        cut_every: float | None = None,
        outages: Sequence[tuple[float, float]] = (),
        outage_mode: OutageMode = "refuse",
    ) -> None:
        for name, rate in (("up_bps", up_bps), ("down_bps", down_bps)):
            if rate is not None and rate <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {rate}")
        if rtt < 0:
            raise ValueError(f"rtt must be >= 0, got {rtt}")
        if cut_every is not None and cut_every <= 0:
            raise ValueError(f"cut_every must be > 0 or None, got {cut_every}")
        if outage_mode not in ("refuse", "stall"):
            raise ValueError(f"outage_mode must be 'refuse' or 'stall', got {outage_mode!r}")
        self.target_host = target_host
        self.target_port = target_port
        self.up_bps = up_bps
        self.down_bps = down_bps
        self.rtt = rtt
        self.cut_every = cut_every
        self.outage_mode: OutageMode = outage_mode
        self._outages = list(outages)
        self.port = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self.cut_connections = 0
        self.refused = 0
        self.cuts = 0  # cuts and outages that happened, whether or not a connection was open
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._timers: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()  # handlers and pumps, until they end
        self._down_until = 0.0
        self._buckets: dict[bool, TokenBucket | None] = {}
        self._closed = False

    @property
    def address(self) -> str:
        """Where clients connect: "127.0.0.1:PORT"."""
        return f"{self.host}:{self.port}"

    @property
    def open_connections(self) -> int:
        """Proxied connections open right now."""
        return len(self._conns)

    @property
    def link_down(self) -> bool:
        """Whether an outage is under way."""
        loop = self._loop
        return loop is not None and loop.time() < self._down_until

    # ----------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> Self:
        """Listen on a free port and start the link's thread; returns self."""
        if self._closed:
            raise RuntimeError("link is closed")
        if self._thread is not None:
            raise RuntimeError("link already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        ready: asyncio.Future[None] = loop.create_future()

        def run() -> None:
            asyncio.set_event_loop(loop)
            opening = loop.create_task(self._open(ready))
            loop.run_forever()
            del opening

        self._thread = threading.Thread(target=run, name="LinkEmulator", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(_wait(ready), loop).result(START_TIMEOUT)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop: close the listener and every connection, join the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(CALL_TIMEOUT)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(JOIN_TIMEOUT)
            if thread.is_alive():
                raise RuntimeError("link thread did not stop")
        loop.close()

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
    # Controls (each runs in the link's thread; the caller waits for it)

    def cut(self) -> int:
        """Reset every open connection (both sides); returns how many were cut."""
        return self._call(self._cut_all)

    def outage(self, seconds: float) -> int:
        """Drop the link now for `seconds`: cut every open connection, and refuse or stall new
        ones until then (see `outage_mode`). Returns how many connections were cut."""
        return self._call(lambda: self._go_down(seconds))

    def reset_counts(self) -> None:
        """Zero the byte and connection counts."""

        def reset() -> None:
            self.bytes_up = self.bytes_down = self.connections = 0
            self.cut_connections = self.refused = self.cuts = 0

        self._call(reset)

    def _call(self, fn: Callable[[], _T]) -> _T:
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            raise RuntimeError("link is not running")

        async def call() -> _T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), loop).result(CALL_TIMEOUT)

    # ----------------------------------------------------------------------------------------
    # The link's thread

    async def _open(self, ready: asyncio.Future[None]) -> None:
        try:
            loop = asyncio.get_running_loop()
            now = loop.time()
            for up, rate in ((True, self.up_bps), (False, self.down_bps)):
                self._buckets[up] = (
                    None if rate is None else TokenBucket(rate / 8, self._chunk(rate), now)
                )
            self._server = await asyncio.start_server(self._accept, LOOPBACK, 0)
            self.port = self._server.sockets[0].getsockname()[1]
            if self.cut_every is not None:
                self._timers.append(loop.create_task(self._cut_on_timer(self.cut_every)))
            for at, seconds in self._outages:
                self._timers.append(loop.create_task(self._scheduled_outage(at, seconds)))
        except BaseException as exc:
            ready.set_exception(exc)
        else:
            ready.set_result(None)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for timer in self._timers:
            timer.cancel()
        self._cut_all(count=False)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._timers, *self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _cut_on_timer(self, every: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + every
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            self._cut_all()
            due += every

    async def _scheduled_outage(self, at: float, seconds: float) -> None:
        await asyncio.sleep(at)
        self._go_down(seconds)

    def _go_down(self, seconds: float) -> int:
        assert self._loop is not None
        self._down_until = max(self._down_until, self._loop.time() + seconds)
        return self._cut_all()

    def _cut_all(self, *, count: bool = True) -> int:
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        self._conns.clear()
        if count:
            self.cuts += 1
            self.cut_connections += len(conns)
        return len(conns)

    @staticmethod
    def _chunk(rate_bps: float | None) -> int:
        """Read size: small enough that a chunk passes a limited link in a few milliseconds."""
        if rate_bps is None:
            return MAX_CHUNK
        return int(min(MAX_CHUNK, max(MIN_CHUNK, rate_bps / 8 * CHUNK_SECONDS)))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._track(task)
        await self._connect(reader, writer)

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        self.connections += 1
        conn = _Conn(writer)
        try:
            if loop.time() < self._down_until and self.outage_mode == "refuse":
                self.refused += 1
                conn.abort()
                return
            while loop.time() < self._down_until:  # stalled: wait for the link to return
                await asyncio.sleep(self._down_until - loop.time())
            self._conns.add(conn)
            await asyncio.sleep(self.rtt)  # the handshake's round trip
            if conn not in self._conns:  # cut meanwhile
                return
            server_reader, server = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except (OSError, asyncio.CancelledError) as exc:
            self._conns.discard(conn)
            conn.abort()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        conn.server = server
        if conn not in self._conns:  # cut while dialling
            _abort(server)
            return
        for sock in (writer.get_extra_info("socket"), server.get_extra_info("socket")):
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for up, src, dst in ((True, reader, server), (False, server_reader, writer)):
            rate = self.up_bps if up else self.down_bps
            room = max(QUEUE_BYTES, int((rate or 0) / 8 * self.rtt * 2))
            chunk = self._chunk(rate)
            pipe = _Pipe(room)
            for pump in (
                self._read(conn, src, pipe, up, chunk),
                self._write(conn, dst, pipe, up),
            ):
                task = loop.create_task(pump)
                conn.tasks.append(task)
                self._track(task)

    async def _read(
        self, conn: _Conn, src: asyncio.StreamReader, pipe: _Pipe, up: bool, chunk: int
    ) -> None:
        """Read chunks, let each pass the direction's bucket, queue it with its release time."""
        loop = asyncio.get_running_loop()
        delay = self.rtt / 2
        bucket = self._buckets[up]
        try:
            while True:
                data = await src.read(chunk)
                now = loop.time()
                if not data:
                    await pipe.put(now + delay, b"")
                    return
                passed = now if bucket is None else bucket.reserve(len(data), now)
                # The bucket's debt keeps the schedule while the reader is ahead: waking late
                # (by less than READ_AHEAD) leaves no gap in which the link sat idle.
                if passed - READ_AHEAD > now:
                    await asyncio.sleep(passed - READ_AHEAD - now)
                await pipe.put(passed + delay, data)
        except OSError:
            self._drop(conn)

    async def _write(self, conn: _Conn, dst: asyncio.StreamWriter, pipe: _Pipe, up: bool) -> None:
        """Hand each chunk to the other side at its release time; pass the EOF on."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                release, data = await pipe.get()
                wait = release - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if dst.can_write_eof():
                        dst.write_eof()
                    break
                dst.write(data)
                await dst.drain()
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
        except OSError:
            self._drop(conn)
            return
        conn.ended += 1
        if conn.ended == 2:  # both sides sent their EOF: close quietly
            self._conns.discard(conn)
            conn.closed = True
            for side in (conn.client, conn.server):
                if side is not None:
                    side.close()

    def _drop(self, conn: _Conn) -> None:
        """A side failed (reset by its peer): reset the other one too."""
        self._conns.discard(conn)
        conn.abort()


class _Pipe:
    """Chunks in flight one way, with their release times; `put` waits while `room` bytes
    are queued (the link's buffer is full, so the sender is held back)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.size = 0
        self.items: collections.deque[tuple[float, bytes]] = collections.deque()
        self.changed = asyncio.Event()

    async def put(self, release: float, data: bytes) -> None:
        while self.size >= self.room:
            self.changed.clear()
            await self.changed.wait()
        self.items.append((release, data))
        self.size += len(data)
        self.changed.set()

    async def get(self) -> tuple[float, bytes]:
        while not self.items:
            self.changed.clear()
            await self.changed.wait()
        release, data = self.items.popleft()
        self.size -= len(data)
        self.changed.set()
        return release, data


async def _wait(future: asyncio.Future[None]) -> None:
    await future
