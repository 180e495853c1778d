"""The API against hostile or broken clients, and the CLI against a dead or hung daemon: token
guesses are slowed down, bad bodies and parameters get one-line 4xx answers (never a 500 or a
traceback), and `skyframe pause` still works after the daemon was killed with SIGKILL."""

from __future__ import annotations

import http.server
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fakes.clock import FakeClock
from helpers import (
    API_CONFIG,
    API_TOKEN,
    Daemon,
    WriteConfig,
    request,
    send,
    spawn_daemon,
    url_of,
)

from skyframe import api, client, httpguard
from skyframe.api import TokenThrottle
from skyframe.cli import cli
from skyframe.state import StateLock

GOOD = {"Authorization": f"Bearer {API_TOKEN}"}


def raw_http(url: str, data: bytes) -> bytes:
    """What the server answers to bytes sent as they are (the first 4 KiB)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        return sock.recv(4096)


def assert_one_line_error(status: int, body: Any, expected: int) -> str:
    """The answer is ``expected`` with ``{"error": "one short line"}``; returns the line."""
    assert status == expected, body
    assert isinstance(body, dict), body
    assert list(body) == ["error"]
    message: str = body["error"]
    assert "\n" not in message
    assert "Traceback" not in message
    assert len(message) < 200, message
    return message


def api_troubles(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Records of the API (and of aiohttp under it) that are errors or carry a traceback."""
    return [
        r
        for r in caplog.records
        if r.name.startswith(("skyframe.api", "aiohttp"))
        and (r.levelno >= logging.ERROR or r.exc_info)
    ]


# --- 1. token guesses --------------------------------------------------------------------------


def test_repeated_wrong_sign_ins_get_429_and_a_growing_wait(
    daemon: Callable[..., Daemon],
) -> None:
    url = url_of(daemon(token=True))
    _, _, headers = request(url + "/api/login", "POST", {"token": API_TOKEN})
    cookie = headers["Set-Cookie"].split(";", 1)[0]
    for _ in range(api.FREE_FAILURES):
        assert request(url + "/api/login", "POST", {"token": "guess"})[0] == 401
    status, body, headers = request(url + "/api/login", "POST", {"token": "guess"})
    message = assert_one_line_error(status, body, 429)
    assert "try again in 1 s" in message
    assert headers["Retry-After"] == "1"
    # While the address waits, even the right token is refused: a guess tells nothing then.
    assert request(url + "/api/login", "POST", {"token": API_TOKEN})[0] == 429
    assert request(url + "/api/status", headers=GOOD)[0] == 429
    # A signed-in dashboard goes on: its cookie is not something anyone guesses.
    assert request(url + "/api/status", headers={"Cookie": cookie})[0] == 200
    time.sleep(1.1)
    assert request(url + "/api/login", "POST", {"token": API_TOKEN})[0] == 200
    # Each further wrong token doubles the wait.
    assert request(url + "/api/login", "POST", {"token": "guess"})[0] == 401
    status, _, headers = request(url + "/api/login", "POST", {"token": "guess"})
    assert (status, headers["Retry-After"]) == (429, "2")
    time.sleep(1.1)
    assert request(url + "/api/login", "POST", {"token": API_TOKEN})[0] == 429
    time.sleep(1.0)
    assert request(url + "/api/login", "POST", {"token": API_TOKEN})[0] == 200


def test_wrong_bearer_tokens_are_slowed_down_and_the_cli_says_so(
    daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    url = url_of(daemon(token=True))
    wrong = {"Authorization": "Bearer guess"}
    for _ in range(api.FREE_FAILURES):
        status, body, _ = request(url + "/api/pause", "POST", {}, headers=wrong)
        assert "wrong API token" in assert_one_line_error(status, body, 401)
    status, body, headers = request(url + "/api/status", headers=wrong)
    assert_one_line_error(status, body, 429)
    assert int(headers["Retry-After"]) >= 1
    result = CliRunner().invoke(cli, ["status", str(tmp_path / "skyframe.yaml")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert "answered 429: too many wrong tokens" in result.output
    # Requests without any token are no guesses: they are neither counted nor slowed down.
    for _ in range(3 * api.FREE_FAILURES):
        assert request(url + "/metrics")[0] == 401
    assert request(url + "/healthz")[0] == 200


def test_wrong_tokens_are_logged_once_with_a_count(
    daemon: Callable[..., Daemon], caplog: pytest.LogCaptureFixture
) -> None:
    url = url_of(daemon(token=True))
    caplog.set_level(logging.INFO, logger="skyframe.api")
    attempts = 4 * api.FREE_FAILURES
    for i in range(attempts):
        if i % 2:
            request(url + "/api/login", "POST", {"token": f"guess-{i}"})
        else:
            request(url + "/api/jobs", headers={"Authorization": f"Bearer guess-{i}"})
    records = [r for r in caplog.records if r.name == "skyframe.api"]
    lines = [r.getMessage() for r in records]
    # One line when the guessing starts, a warning when the address is made to wait; the
    # refused attempts after it are not logged one by one.
    assert [r.levelno for r in records] == [logging.INFO, logging.WARNING], lines
    assert "wrong token from 127.0.0.1" in lines[0]
    assert f"{api.FREE_FAILURES - 1} more wrong token(s) from 127.0.0.1" in lines[1]
    assert f"{api.FREE_FAILURES} since" in lines[1]
    assert "waits 1 s per try" in lines[1]
    assert not any("guess" in line for line in lines)  # what was tried is not written down


def test_throttle_forgets_an_address_and_caps_its_wait() -> None:
    clock = FakeClock()
    throttle = TokenThrottle(clock=clock)
    for _ in range(api.FREE_FAILURES - 1):
        throttle.failed("10.0.0.1", "test")
    assert throttle.wait("10.0.0.1") == 0
    throttle.failed("10.0.0.1", "test")
    assert throttle.wait("10.0.0.1") == api.FIRST_WAIT
    assert throttle.wait("10.0.0.2") == 0  # per address
    for _ in range(40):
        throttle.failed("10.0.0.1", "test")
    assert throttle.wait("10.0.0.1") == api.LONGEST_WAIT
    clock.advance(api.FORGET_AFTER + 1)
    throttle.failed("10.0.0.1", "test")  # long after the last one: a fresh start
    assert throttle.wait("10.0.0.1") == 0


def test_throttle_remembers_a_bounded_number_of_addresses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(api, "TRACKED", 50)
    clock = FakeClock(0.0)
    throttle = TokenThrottle(clock=clock)
    for i in range(200):
        clock.advance(0.01)
        for _ in range(api.FREE_FAILURES):
            throttle.failed(f"10.0.{i // 256}.{i % 256}", "test")
    assert len(throttle._by_address) <= 50
    assert throttle.wait("10.0.0.199") > 0  # the latest are kept


# --- 2. bodies ---------------------------------------------------------------------------------


def test_a_deeply_nested_body_is_a_400_without_a_traceback(
    daemon: Callable[..., Daemon], caplog: pytest.LogCaptureFixture
) -> None:
    url = url_of(daemon(token=True))
    for nested in (b"[" * 60_000, b'{"a":' * 12_000):
        for path in ("/api/pause", "/api/retry", "/api/login"):
            status, body, _ = send(url + path, nested, GOOD)
            message = assert_one_line_error(status, body, 400)
            assert "nested too deep" in message
    assert api_troubles(caplog) == []


def test_malformed_bodies_are_400s(
    daemon: Callable[..., Daemon], caplog: pytest.LogCaptureFixture
) -> None:
    d = daemon(token=True)
    url = url_of(d)
    for raw in (b"{", b"", b"\xff\xfe\x00", b"[1, 2]", b"null", b'"text"', b"{'a': 1}"):
        status, body, _ = send(url + "/api/pause", raw, GOOD)
        assert_one_line_error(status, body, 400)
    # A charset Python does not know: JSON is UTF-8 whatever the header says.
    status, body, _ = send(
        url + "/api/pause", b"{}", {**GOOD, "Content-Type": "application/json; charset=nope"}
    )
    assert status == 200, body
    assert d.engine.control.state()["paused"] is True
    assert api_troubles(caplog) == []


def test_numbers_json_has_not_are_400s(
    daemon: Callable[..., Daemon], caplog: pytest.LogCaptureFixture
) -> None:
    url = url_of(daemon(token=True))
    for raw, detail in (
        (b'{"pipeline": NaN}', "NaN is not a JSON number"),
        (b'{"pipeline": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"pipeline": ' + b"9" * 5000 + b"}", "a number with too many digits"),
    ):
        status, body, _ = send(url + "/api/pause", raw, GOOD)
        message = assert_one_line_error(status, body, 400)
        assert message == f"the body is not valid JSON: {detail}"
    assert api_troubles(caplog) == []


def test_a_static_path_the_file_system_refuses_is_a_404(
    daemon: Callable[..., Daemon], caplog: pytest.LogCaptureFixture
) -> None:
    url = url_of(daemon(token=True))
    for path in ("/static/" + "a" * 300, "/static/" + "a/" * 2100 + "x"):
        status, body, _ = request(url + path)
        assert (status, body) == (404, {"error": "Not Found"})
    assert api_troubles(caplog) == []


def test_a_large_body_is_refused_before_it_is_read(
    daemon: Callable[..., Daemon], caplog: pytest.LogCaptureFixture
) -> None:
    url = url_of(daemon(token=True))
    big = b'{"pipeline": "' + b"a" * (2 * api.MAX_BODY) + b'"}'
    status, body, _ = send(url + "/api/pause", big, GOOD)
    assert "larger than 64 KiB" in assert_one_line_error(status, body, 413)
    # Sent in chunks, without a Content-Length: cut off at the bound all the same.
    chunk = b"a" * 8192
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(20)) + b"0\r\n\r\n"
    host = url.removeprefix("http://")
    answer = raw_http(
        url,
        f"POST /api/pause HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_TOKEN}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + chunked,
    )
    assert answer.startswith(b"HTTP/1.1 413 ")
    # A Content-Length far too large is refused at once, without waiting for the body.
    began = time.monotonic()
    answer = raw_http(
        url,
        f"POST /api/pause HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_TOKEN}\r\n"
        "Content-Type: application/json\r\nContent-Length: 99999999999\r\n\r\n{".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert time.monotonic() - began < 2
    assert api_troubles(caplog) == []


def test_a_body_that_never_comes_gets_a_408(
    daemon: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(httpguard, "BODY_TIMEOUT", 0.5)
    url = url_of(daemon())
    host = url.removeprefix("http://")
    began = time.monotonic()
    answer = raw_http(
        url,
        f"POST /api/pause HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100\r\n\r\n{".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - began < 5


def test_a_client_that_leaves_in_the_middle_of_its_body_leaves_no_traceback(
    daemon: Callable[..., Daemon], caplog: pytest.LogCaptureFixture
) -> None:
    d = daemon()
    url = url_of(d)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST /api/pause HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode()
        )
        time.sleep(0.3)
    time.sleep(0.5)
    assert request(url + "/healthz")[0] == 200
    assert d.engine.control.state()["paused"] is False
    assert api_troubles(caplog) == []


def test_malformed_http_is_a_400_without_a_traceback(
    daemon: Callable[..., Daemon], caplog: pytest.LogCaptureFixture
) -> None:
    url = url_of(daemon())
    host = url.removeprefix("http://")
    long_header = f"GET /api/status HTTP/1.1\r\nHost: {host}\r\nX: {'a' * 20_000}\r\n\r\n"
    assert raw_http(url, long_header.encode()).startswith(b"HTTP/1.0 400 ")
    bad_chunk = (
        f"POST /api/pause HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\nZZ\r\n"
    )
    assert raw_http(url, bad_chunk.encode()).startswith(b"HTTP/1.0 400 ")
    assert api_troubles(caplog) == []


# --- 4. parameters and values ------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "/api/jobs?limit=abc",
        "/api/jobs?limit=%C2%B2",  # "²" is a digit to str.isdigit(), not to int()
        "/api/jobs?limit=%D9%A3",  # an Arabic-Indic 3
        "/api/jobs?limit=" + "9" * 5000,  # more digits than int() reads
        "/api/jobs?limit=0",
        "/api/jobs?limit=5001",
        "/api/jobs?limit=-1",
        "/api/jobs?limit=1e3",
        "/api/jobs?state=" + "x" * 5000,
        "/api/history?limit=12.5",
        "/api/history?since=" + "y" * 5000,
        "/api/history?since=nan",
    ],
)
def test_bad_query_parameters_are_one_line_400s(
    daemon: Callable[..., Daemon], caplog: pytest.LogCaptureFixture, query: str
) -> None:
    url = url_of(daemon())
    status, body, _ = request(url + query)
    assert_one_line_error(status, body, 400)
    assert api_troubles(caplog) == []


def test_good_limits_still_work(daemon: Callable[..., Daemon]) -> None:
    url = url_of(daemon())
    for limit in ("1", "5000", "0007"):
        status, body, _ = request(url + f"/api/jobs?limit={limit}")
        assert (status, body) == (200, {"jobs": [], "total": 0})
    assert request(url + "/api/history?limit=20&since=2h")[0] == 200


def test_bad_values_in_bodies_are_4xx(
    daemon: Callable[..., Daemon], caplog: pytest.LogCaptureFixture
) -> None:
    d = daemon(token=True)
    url = url_of(d)
    huge_name = "p" * 60_000
    cases: list[tuple[str, bytes, int]] = [
        ("/api/pause", json.dumps({"pipeline": huge_name}).encode(), 404),
        ("/api/resume", b'{"pipeline": "\\ud800"}', 404),
        ("/api/pause", b'{"pipeline": 1e999}', 400),
        ("/api/pause", b'{"pipeline": ["survey"]}', 400),
        ("/api/retry", json.dumps({"all": True, "pipeline": huge_name}).encode(), 404),
        ("/api/retry", b'{"pipeline": "survey", "path": "\\u0000"}', 404),
        ("/api/retry", b'{"all": "yes"}', 400),
    ]
    for path, raw, expected in cases:
        status, body, _ = send(url + path, raw, GOOD)
        assert_one_line_error(status, body, expected)
    assert d.engine.control.state()["paused"] is False
    # Tokens that cannot even be encoded are wrong tokens, not server errors.
    status, body, _ = send(url + "/api/login", b'{"token": "\\udcff\\ud800"}')
    assert_one_line_error(status, body, 401)
    host = url.removeprefix("http://")
    answer = raw_http(
        url,
        f"GET /api/status HTTP/1.1\r\nHost: {host}\r\n".encode()
        + b"Authorization: Bearer \xff\xfe\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert api_troubles(caplog) == []


# --- 3. a dead or hung daemon ------------------------------------------------------------------


@pytest.fixture
def spawn(
    tmp_path: Path, write_config: WriteConfig
) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start ``skyframe run`` in a process of its own; each is killed and reaped at the end."""
    (tmp_path / "logs").mkdir(exist_ok=True)
    write_config(API_CONFIG.replace("TOKEN", "").replace("BWLIMIT", ""))
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        api_file = tmp_path / ".state" / "api.json"
        api_file.unlink(missing_ok=True)
        process = spawn_daemon(tmp_path, tmp_path / "daemon.log")
        processes.append(process)
        deadline = time.monotonic() + 30
        while not api_file.exists():
            assert process.poll() is None, (tmp_path / "daemon.log").read_text()
            assert time.monotonic() < deadline, "the daemon did not write api.json"
            time.sleep(0.05)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            os.kill(process.pid, signal.SIGKILL)
        process.wait(10)


def test_pause_after_kill_9_switches_the_saved_state(
    spawn: Callable[[], subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    process = spawn()
    config = str(tmp_path / "skyframe.yaml")
    os.kill(process.pid, signal.SIGKILL)
    # Dead, but not reaped yet: its PID still answers kill(pid, 0), as a zombie does.
    os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
    assert (tmp_path / ".state" / "api.json").exists()
    runner = CliRunner()
    result = runner.invoke(cli, ["pause", config])
    assert result.exit_code == 0, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "no daemon is running" in result.output
    assert "the next start is paused" in result.output
    saved = json.loads((tmp_path / ".state" / "control.json").read_text())
    assert saved == {"paused": True, "pipelines": {}}
    result = runner.invoke(cli, ["status", config])
    assert result.exit_code == 1
    assert result.output.startswith("skyframe: error: no daemon is running for ")
    assert len(result.output.strip().splitlines()) == 1
    process.wait(10)
    # The next start obeys it.
    with Daemon(tmp_path / "skyframe.yaml") as again:
        assert again.engine.control.state()["paused"] is True
        result = runner.invoke(cli, ["resume", config])
        assert result.exit_code == 0, result.output
        assert "held now: nothing" in result.output


def test_stale_api_file_whose_pid_was_taken_by_another_process(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    (tmp_path / "logs").mkdir()
    config = str(write_config(API_CONFIG.replace("TOKEN", "").replace("BWLIMIT", "")))
    with socket.socket() as closed:  # an address nothing listens on any more
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    (tmp_path / ".state").mkdir()
    (tmp_path / ".state" / "api.json").write_text(
        json.dumps({"url": f"http://127.0.0.1:{port}", "pid": os.getpid()})  # a live PID
    )
    runner = CliRunner()
    result = runner.invoke(cli, ["status", config])
    assert result.exit_code == 1
    assert result.output.startswith("skyframe: error: no daemon is running for ")
    result = runner.invoke(cli, ["pause", config, "-p", "logs"])
    assert result.exit_code == 0, result.output
    assert "no daemon is running" in result.output
    assert json.loads((tmp_path / ".state" / "control.json").read_text())["pipelines"] == {
        "logs": True
    }
    result = runner.invoke(cli, ["resume", config])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / ".state" / "control.json").read_text())["pipelines"] == {}


def test_a_hung_daemon_gets_a_bounded_wait_and_a_clear_message(
    spawn: Callable[[], subprocess.Popen[bytes]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client, "TIMEOUT", 1.0)
    process = spawn()
    config = str(tmp_path / "skyframe.yaml")
    runner = CliRunner()
    assert runner.invoke(cli, ["pause", config, "-p", "logs"]).exit_code == 0
    saved = (tmp_path / ".state" / "control.json").read_text()
    os.kill(process.pid, signal.SIGSTOP)  # it holds its lock and port, and answers nothing
    try:
        for command in (["status", config], ["pause", config], ["resume", config]):
            began = time.monotonic()
            result = runner.invoke(cli, command)
            assert time.monotonic() - began < 5, command
            assert result.exit_code == 1, result.output
            assert len(result.output.strip().splitlines()) == 1
            assert "did not answer" in result.output
            assert "within 1 s: it may be hung" in result.output
        assert (tmp_path / ".state" / "control.json").read_text() == saved
    finally:
        os.kill(process.pid, signal.SIGCONT)
    result = runner.invoke(cli, ["status", config])
    assert result.exit_code == 0, result.output
    assert "logs (paused)" in result.output


def test_a_locked_state_dir_whose_api_refuses_is_not_switched(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    (tmp_path / "logs").mkdir()
    config = str(write_config(API_CONFIG.replace("TOKEN", "").replace("BWLIMIT", "")))
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    (tmp_path / ".state").mkdir()
    (tmp_path / ".state" / "api.json").write_text(
        json.dumps({"url": f"http://127.0.0.1:{port}", "pid": os.getpid()})
    )
    with StateLock(tmp_path / ".state"):  # a daemon still starting, say
        result = CliRunner().invoke(cli, ["pause", config])
    assert result.exit_code == 1
    assert "its API does not answer" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / ".state" / "control.json").exists()


def test_status_of_a_daemon_without_its_api_says_so(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    (tmp_path / "logs").mkdir()
    text = API_CONFIG.replace('api: {listen: "127.0.0.1:0"TOKEN}', "api: {enabled: false}")
    config = write_config(text.replace("BWLIMIT", ""))
    with Daemon(config):
        result = CliRunner().invoke(cli, ["status", str(config)])
    assert result.exit_code == 1
    assert f"a skyframe process (pid {os.getpid()}) is using" in result.output
    assert "without an API that answers" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_another_program_at_the_daemons_address_is_one_line(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    (tmp_path / "logs").mkdir()
    config = str(write_config(API_CONFIG.replace("TOKEN", "").replace("BWLIMIT", "")))

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>a printer's status page</html>")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        (tmp_path / ".state").mkdir()
        (tmp_path / ".state" / "api.json").write_text(
            json.dumps({"url": f"http://127.0.0.1:{server.server_port}", "pid": os.getpid()})
        )
        try:
            with StateLock(tmp_path / ".state"):  # as if its daemon ran
                result = CliRunner().invoke(cli, ["status", config])
        finally:
            server.shutdown()
            thread.join(5)
    assert result.exit_code == 1
    assert "is not the API of skyframe" in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_answers_and_refusals_carry_the_security_headers(daemon: Callable[..., Daemon]) -> None:
    url = url_of(daemon())
    host = url.removeprefix("http://")
    for target, status in (("/api/status", b"200"), ("/api/nothing-here", b"404")):
        answer = raw_http(url, f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 " + status)
        for header in (
            b"cache-control: no-store",
            b"x-content-type-options: nosniff",
            b"x-frame-options: deny",
            b"referrer-policy: no-referrer",
        ):
            assert header in head, (target, header)
