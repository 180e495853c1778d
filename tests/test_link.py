"""The test tool `link.LinkEmulator`: rate, round trip, both at once, cuts, outages, counts."""

from __future__ import annotations

import contextlib
import socket
import statistics
import threading
import time
from collections.abc import Iterator

import pytest
from fakes.link import LinkEmulator, TokenBucket, mbit

TIMEOUT = 5.0  # seconds any single wait in these tests may take before failing
RATE = mbit(8)  # low, so that a busy machine still keeps up
#: The least share of RATE a test asks the link to carry. A busy machine delays the test's
#: own threads as well as the link's (the reader's read-ahead covers the link's lateness, not
#: theirs). An emulator that gave each connection a budget of its own, or half of one, is
#: still far outside [SLOWEST, 1.03].
SLOWEST = 0.9


class Server:
    """A TCP server on 127.0.0.1, one thread per connection: "echo" sends back what it gets;
    "sink" reads to the end, notes when each byte arrived, then replies "<count>"."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.lock = threading.Lock()
        self.arrivals: list[tuple[float, float]] = []  # per connection: first, last byte
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.02)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._accept_loop, name=f"test-{mode}-server")
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._handle, args=(conn,), name="test-server-conn")
            self._threads.append(thread)
            thread.start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        count, first, last = 0, 0.0, 0.0
        with conn:
            try:
                while data := conn.recv(256 * 1024):
                    last = time.monotonic()
                    first = first or last
                    count += len(data)
                    if self.mode == "echo":
                        conn.sendall(data)
                if self.mode == "sink":
                    with self.lock:
                        self.arrivals.append((first, last))
                    conn.sendall(str(count).encode())
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self._listener.close()
        for thread in self._threads:
            thread.join(TIMEOUT)


@pytest.fixture
def echo() -> Iterator[Server]:
    server = Server("echo")
    yield server
    server.close()


@pytest.fixture
def sink() -> Iterator[Server]:
    server = Server("sink")
    yield server
    server.close()


def _connect(link: LinkEmulator) -> socket.socket:
    sock = socket.create_connection((link.host, link.port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(256 * 1024):
        chunks.append(data)
    return b"".join(chunks)


def _send(link: LinkEmulator, size: int) -> float:
    """Send `size` bytes to the sink through the link; returns when the sending began."""
    with _connect(link) as sock:
        began = time.monotonic()
        sock.sendall(bytes(size))
        sock.shutdown(socket.SHUT_WR)
        assert _recv_all(sock) == str(size).encode()
    return began


def _ping(sock: socket.socket) -> float:
    began = time.monotonic()
    sock.sendall(b"p")
    assert sock.recv(16) == b"p"
    return time.monotonic() - began


def _ended(sock: socket.socket) -> bool:
    """Whether the peer reset or closed the connection (waits up to TIMEOUT)."""
    try:
        return sock.recv(16) == b""
    except ConnectionResetError:
        return True


def test_token_bucket_grants_in_order_at_the_rate() -> None:
    bucket = TokenBucket(1000.0, burst=100.0, now=0.0)
    assert bucket.reserve(100, 0.0) == 0.0  # the burst
    assert bucket.reserve(500, 0.0) == pytest.approx(0.5)
    assert bucket.reserve(500, 0.1) == pytest.approx(1.0)  # behind the first reservation
    assert bucket.reserve(10, 5.0) == 5.0  # idle long enough: credit again, up to the burst


def test_throughput_matches_the_rate(sink: Server) -> None:
    size = 1_000_000
    with LinkEmulator("127.0.0.1", sink.port, up_bps=RATE) as link:
        began = _send(link, size)
    _, last = sink.arrivals[0]
    rate = size * 8 / (last - began)
    assert SLOWEST * RATE <= rate <= 1.03 * RATE, f"{rate / 1e6:.2f} Mbit/s"
    assert link.bytes_up == size


def test_the_links_own_lateness_costs_it_no_capacity(sink: Server) -> None:
    """A busy machine wakes the link's loop late; a sender with more to send loses no time."""
    size = 1_000_000
    done = threading.Event()

    def stall_the_links_loop(link: LinkEmulator) -> None:
        while not done.is_set():
            link._call(lambda: time.sleep(0.02))  # the loop runs nothing else meanwhile
            time.sleep(0.01)

    with LinkEmulator("127.0.0.1", sink.port, up_bps=RATE) as link:
        staller = threading.Thread(target=stall_the_links_loop, args=(link,))
        staller.start()
        try:
            began = _send(link, size)
        finally:
            done.set()
            staller.join(TIMEOUT)
    _, last = sink.arrivals[0]
    rate = size * 8 / (last - began)
    # Waking 20 ms late at every stall, beyond the 5 ms burst, would cost half the rate.
    assert SLOWEST * RATE <= rate <= 1.03 * RATE, f"{rate / 1e6:.2f} Mbit/s"


def test_connections_share_one_budget(sink: Server) -> None:
    size = 400_000
    with LinkEmulator("127.0.0.1", sink.port, up_bps=RATE) as link:
        starts: list[float] = []
        threads = [
            threading.Thread(target=lambda: starts.append(_send(link, size))) for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
    began = min(starts)
    ends = [last for _, last in sink.arrivals]
    rate = 2 * size * 8 / (max(ends) - began)
    # One budget, not one each (2 x RATE), and used whole.
    assert SLOWEST * RATE <= rate <= 1.03 * RATE, f"{rate / 1e6:.2f} Mbit/s together"
    # Each got about half: both finished near the end, not one after the other.
    assert min(ends) - began > 0.85 * (max(ends) - began)


def test_round_trip_is_added_and_the_handshake_costs_one(echo: Server) -> None:
    rtt = 0.1
    with LinkEmulator("127.0.0.1", echo.port, rtt=rtt) as link, _connect(link) as sock:
        first = _ping(sock)  # the connection's round trip, then the ping's
        pings = [_ping(sock) for _ in range(5)]
    assert 2 * rtt - 0.005 <= first <= 2 * rtt + 0.04
    assert rtt - 0.002 <= statistics.median(pings) <= rtt + 0.015, pings


def test_bandwidth_and_delay_overlap(sink: Server) -> None:
    """A bandwidth x delay pipe is in flight: the delay is paid once, not per chunk."""
    size, rtt = 400_000, 0.4
    with LinkEmulator("127.0.0.1", sink.port, up_bps=RATE, rtt=rtt) as link:
        began = _send(link, size)
    _, last = sink.arrivals[0]
    expected = rtt + size * 8 / RATE + rtt / 2  # handshake, serialisation, one way
    # Paying the delay per chunk would add a second or more; a busy machine's event loop adds
    # its lateness (a fresh-clone CI run: 0.13 s).
    assert expected - 0.03 <= last - began <= expected + 0.25


def test_downstream_rate_is_optional_and_separate(echo: Server) -> None:
    size = 300_000
    with LinkEmulator("127.0.0.1", echo.port, down_bps=RATE) as link, _connect(link) as sock:
        sock.sendall(bytes(size))
        sock.shutdown(socket.SHUT_WR)
        # Timed from the first byte back: the echo's start (threads of this process, on a
        # busy machine) is no part of the downstream rate.
        first = len(sock.recv(256 * 1024))
        began = time.monotonic()
        rest = len(_recv_all(sock))
        elapsed = time.monotonic() - began
    assert first + rest == size
    rate = rest * 8 / elapsed
    assert SLOWEST * RATE <= rate <= 1.03 * RATE, f"{rate / 1e6:.2f} Mbit/s"
    assert link.bytes_up == link.bytes_down == size


def test_cut_every_resets_open_connections(echo: Server) -> None:
    with LinkEmulator("127.0.0.1", echo.port, cut_every=0.3) as link, _connect(link) as sock:
        assert _ping(sock) < 0.2
        began = time.monotonic()
        assert _ended(sock)
        # Cut by the first period's end, not the second's: a busy machine's loop runs late.
        assert time.monotonic() - began < 0.55
        assert link.cut_connections == 1
        with _connect(link) as again:  # new connections still work
            assert _ping(again) < 0.2
            assert link.cut() == 1
            assert _ended(again)
        assert link.connections == 2


def test_outage_refuses_new_connections_for_its_duration(echo: Server) -> None:
    with LinkEmulator("127.0.0.1", echo.port) as link, _connect(link) as before:
        assert _ping(before) < 0.2
        called = time.monotonic()
        assert link.outage(0.5) == 1
        returned = time.monotonic()  # the link is back between called + 0.5 and returned + 0.5
        assert _ended(before)
        refusals: list[float] = []  # when each refused attempt started
        back = None
        while back is None and time.monotonic() - called < TIMEOUT:
            started = time.monotonic()
            try:
                with _connect(link) as sock:
                    _ping(sock)
            except (ConnectionError, AssertionError):  # reset while connecting, or after
                refusals.append(started)
                time.sleep(0.02)
            else:
                back = time.monotonic()
        assert back is not None
        # Bounds from the link's own clock, not the test's pace: a busy machine may answer an
        # attempt late, but no attempt succeeds before the outage ends, and none begun after
        # it ends is refused.
        assert back >= called + 0.5
        assert max(refusals) < returned + 0.5
        assert len(refusals) >= 3
        assert link.refused == len(refusals)


def test_scheduled_outage_stalls_new_connections_until_the_link_returns(echo: Server) -> None:
    with LinkEmulator("127.0.0.1", echo.port, outages=[(0.1, 0.4)], outage_mode="stall") as link:
        began = time.monotonic()  # the schedule starts as the link does, just before
        # Polled, not slept: a busy machine's loop marks the link down late.
        while not link.link_down and time.monotonic() - began < 0.45:
            time.sleep(0.005)
        assert link.link_down
        with _connect(link) as sock:
            waited = _ping(sock)
        assert waited <= 0.45
        assert time.monotonic() - began >= 0.5 - 0.01  # held until the link came back
        assert link.refused == 0
        assert link.cuts == 1


def test_bytes_are_counted_each_way(echo: Server) -> None:
    payload = bytes(range(256)) * 400
    with LinkEmulator("127.0.0.1", echo.port, rtt=0.02) as link:
        with _connect(link) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            assert _recv_all(sock) == payload
        assert link.bytes_up == link.bytes_down == len(payload)
        assert link.connections == 1
        link.reset_counts()
        assert link.bytes_up == link.bytes_down == link.connections == 0


def test_close_stops_everything(echo: Server) -> None:
    threads = set(threading.enumerate())
    link = LinkEmulator("127.0.0.1", echo.port, cut_every=10.0, rtt=0.01).start()
    port = link.port
    sock = _connect(link)
    with sock:
        assert _ping(sock) < 0.2
        link.close()
        link.close()  # idempotent
        assert _ended(sock)
    # The link's own threads (its event loop's, and that loop's executor's) are gone; others
    # may come and go meanwhile (a library's session thread left by an earlier test).
    left = [
        t
        for t in set(threading.enumerate()) - threads
        if t.name == "LinkEmulator" or t.name.startswith("asyncio_")
    ]
    assert left == []
    with pytest.raises(ConnectionRefusedError), contextlib.closing(socket.socket()) as probe:
        probe.connect(("127.0.0.1", port))
    with pytest.raises(RuntimeError):
        link.cut()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="up_bps"):
        LinkEmulator("127.0.0.1", 1, up_bps=0)
    with pytest.raises(ValueError, match="rtt"):
        LinkEmulator("127.0.0.1", 1, rtt=-1.0)
    with pytest.raises(ValueError, match="cut_every"):
        LinkEmulator("127.0.0.1", 1, cut_every=0.0)
