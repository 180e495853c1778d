"""The test tool `proxy.CountingProxy`: forwarding, counting, cuts, refusals, clean close."""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from fakes.proxy import CountingProxy

MB = 1024 * 1024
TIMEOUT = 5.0  # seconds any single wait in these tests may take before failing


def _wait_for(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def _payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass
class Received:
    """What a sink connection got: byte count, sha256, and how it ended."""

    count: int
    digest: str
    ended: str  # "eof" or "reset"


class Server:
    """A TCP server on 127.0.0.1 with one thread per connection.

    mode "echo" sends back what it receives; mode "sink" reads to the end, records a
    `Received` in `results`, and at EOF replies "<count> <sha256>".
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.results: queue.Queue[Received] = queue.Queue()
        self.accepted = 0
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
            self.accepted += 1
            thread = threading.Thread(target=self._handle, args=(conn,), name="test-server-conn")
            self._threads.append(thread)
            thread.start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        digest = hashlib.sha256()
        count = 0
        ended = "eof"
        with conn:
            try:
                while data := conn.recv(256 * 1024):
                    count += len(data)
                    if self.mode == "echo":
                        conn.sendall(data)
                    else:
                        digest.update(data)
            except OSError:
                ended = "reset"
            if self.mode == "sink":
                self.results.put(Received(count, digest.hexdigest(), ended))
            if ended == "eof":
                with contextlib.suppress(OSError):
                    if self.mode == "sink":
                        conn.sendall(f"{count} {digest.hexdigest()}".encode())
                    conn.shutdown(socket.SHUT_WR)

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


def _connect(proxy: CountingProxy) -> socket.socket:
    sock = socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(256 * 1024):
        chunks.append(data)
    return b"".join(chunks)


def _send_to_sink(proxy: CountingProxy, data: bytes) -> str:
    """Send `data` through the proxy to a sink, half-close, and return its reply."""
    with _connect(proxy) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return _recv_all(sock).decode()


def _echo_roundtrip(proxy: CountingProxy, data: bytes) -> bytes:
    """Send `data` through the proxy to an echo server while reading back; return the echo."""
    with _connect(proxy) as sock:

        def send() -> None:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            return _recv_all(sock)
        finally:
            sender.join(TIMEOUT)


def _closed_promptly(sock: socket.socket, within: float = 1.0) -> bool:
    """True when the peer closes or resets `sock` within `within` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, ConnectionAbortedError):
        return True
    except TimeoutError:
        return False
    return True


def _turned_away(proxy: CountingProxy) -> bool:
    """True when a new connection through the proxy is reset or closed at once."""
    try:
        sock = _connect(proxy)
    except ConnectionError:  # the reset can arrive before connect() returns
        return True
    with sock:
        return _closed_promptly(sock)


def _send_until_cut(sock: socket.socket, data: bytes) -> str:
    """Send `data`, half-close and read the reply: "cut" if the connection got reset."""
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        reply = _recv_all(sock)
    except ConnectionError:
        return "cut"
    return f"not cut, reply {reply!r}"


def test_address_and_free_port(echo: Server) -> None:
    with CountingProxy("127.0.0.1", echo.port) as proxy:
        assert proxy.host == "127.0.0.1"
        assert proxy.port not in (0, echo.port)
        assert proxy.address == f"127.0.0.1:{proxy.port}"


def test_forwards_both_ways_intact_and_counts_exactly(echo: Server) -> None:
    data = _payload(20 * MB)
    with CountingProxy("127.0.0.1", echo.port) as proxy:
        back = _echo_roundtrip(proxy, data)
        assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
        assert len(back) == len(data)
        # the count is updated just after the send that let the client read the last bytes
        assert _wait_for(lambda: proxy.bytes_down == len(data)), proxy.bytes_down
        assert proxy.bytes_up == len(data)
        assert proxy.connections == 1
        assert _wait_for(lambda: proxy.open_connections == 0)

        proxy.reset_counts()
        assert (proxy.bytes_up, proxy.bytes_down, proxy.connections) == (0, 0, 0)
        assert _echo_roundtrip(proxy, b"hello") == b"hello"
        assert _wait_for(lambda: proxy.bytes_down == 5)
        assert (proxy.bytes_up, proxy.connections) == (5, 1)


def test_half_close_reaches_the_server_and_its_reply_comes_back(sink: Server) -> None:
    data = _payload(3 * MB + 17, seed=1)
    with CountingProxy("127.0.0.1", sink.port) as proxy:
        reply = _send_to_sink(proxy, data)
        assert reply == f"{len(data)} {hashlib.sha256(data).hexdigest()}"
        assert sink.results.get(timeout=TIMEOUT) == Received(
            len(data), hashlib.sha256(data).hexdigest(), "eof"
        )
        assert proxy.bytes_up == len(data)
        assert _wait_for(lambda: proxy.bytes_down == len(reply))


def test_cut_resets_open_connections_and_new_ones_work(echo: Server) -> None:
    with CountingProxy("127.0.0.1", echo.port) as proxy:
        assert proxy.cut() == 0
        with _connect(proxy) as first, _connect(proxy) as second:
            for sock in (first, second):
                sock.sendall(b"ping")
                assert sock.recv(16) == b"ping"
            started = time.monotonic()
            assert proxy.cut() == 2
            assert _closed_promptly(first)
            assert _closed_promptly(second)
            assert time.monotonic() - started < 1.0
            assert proxy.open_connections == 0
            assert _echo_roundtrip(proxy, b"after the cut") == b"after the cut"
        assert proxy.connections == 3


@pytest.mark.parametrize("n_bytes", [1, 256 * 1024, 3 * MB + 12345])
def test_cut_after_forwards_exactly_n_bytes_then_cuts(sink: Server, n_bytes: int) -> None:
    with CountingProxy("127.0.0.1", sink.port) as proxy:
        # traffic before the call does not count against n_bytes
        assert _send_to_sink(proxy, b"x" * 1000).startswith("1000 ")
        before = proxy.bytes_up
        sink.results.get(timeout=TIMEOUT)

        proxy.cut_after(n_bytes)
        assert not proxy.cut_done.is_set()
        data = _payload(n_bytes + 8 * MB, seed=2)
        with _connect(proxy) as sock:
            assert _send_until_cut(sock, data) == "cut"
        assert proxy.cut_done.wait(TIMEOUT)
        assert proxy.bytes_up - before == n_bytes
        got = sink.results.get(timeout=TIMEOUT)
        assert got.count == n_bytes
        assert got.digest == hashlib.sha256(data[:n_bytes]).hexdigest()
        assert got.ended == "reset"

        # one-shot: the next connection goes through whole
        assert _send_to_sink(proxy, data[:MB]) == f"{MB} {hashlib.sha256(data[:MB]).hexdigest()}"


def test_refuse_closes_new_connections_and_leaves_open_ones(echo: Server) -> None:
    with CountingProxy("127.0.0.1", echo.port) as proxy:
        with _connect(proxy) as kept:
            kept.sendall(b"before")
            assert kept.recv(16) == b"before"
            proxy.refuse(True)
            for _ in range(3):
                assert _turned_away(proxy)
            assert echo.accepted == 1
            kept.sendall(b"still open")
            assert kept.recv(16) == b"still open"
            proxy.refuse(False)
            assert _echo_roundtrip(proxy, b"back") == b"back"
        assert proxy.connections == 5


def test_target_refusing_closes_the_client_and_the_proxy_goes_on() -> None:
    with socket.socket() as unused:  # bound, not listening: connections are refused
        unused.bind(("127.0.0.1", 0))
        with CountingProxy("127.0.0.1", unused.getsockname()[1]) as proxy:
            for _ in range(3):
                assert _turned_away(proxy)
            assert proxy.connections == 3
            assert _wait_for(lambda: proxy.open_connections == 0)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_close_leaves_no_thread_and_no_socket(echo: Server) -> None:
    fds = _open_fds()
    proxy = CountingProxy("127.0.0.1", echo.port).start()
    name = f"CountingProxy-{proxy.port}"
    assert any(t.name == name for t in threading.enumerate())
    with _connect(proxy) as sock:
        sock.sendall(b"open")
        assert sock.recv(16) == b"open"
        proxy.cut_after(10)
        proxy.close()
        assert _closed_promptly(sock)
    proxy.close()  # idempotent
    assert not any(t.name == name for t in threading.enumerate())
    assert _wait_for(lambda: _open_fds() == fds), (_open_fds(), fds)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT).close()
    assert proxy.cut() == 0  # harmless after close

    never_started = CountingProxy("127.0.0.1", echo.port)
    never_started.close()
    never_started.close()
    assert _open_fds() == fds


def test_throughput(sink: Server) -> None:
    chunk = _payload(MB, seed=3)
    total = 100 * MB
    with CountingProxy("127.0.0.1", sink.port) as proxy, _connect(proxy) as sock:
        started = time.monotonic()
        for _ in range(total // MB):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        count, _ = _recv_all(sock).decode().split()
        elapsed = time.monotonic() - started
    assert int(count) == total
    assert elapsed < 10.0, f"100 MB took {elapsed:.1f} s"
