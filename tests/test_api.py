"""The daemon's HTTP API against a real in-process daemon: auth, pause and resume (also across
a restart and in the middle of a transfer), dead-letter retry, metrics, history, the event
stream, and the CLI commands that talk to it."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import API_CONFIG, API_TOKEN, Daemon, WriteConfig, make_file, request, url_of, wait_for
from prometheus_client.parser import text_string_to_metric_families

from skyframe.cli import cli
from skyframe.queue import JobQueue


def test_api_file_points_at_the_daemon_and_goes_away(
    daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    d = daemon()
    api_file = tmp_path / ".state" / "api.json"
    found = json.loads(api_file.read_text())
    assert found == {"url": url_of(d), "pid": os.getpid()}
    status, body, _ = request(found["url"] + "/healthz")
    assert (status, body) == (200, {"status": "ok"})
    d.stop()
    assert not api_file.exists()


def test_status_document(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = daemon()
    make_file(tmp_path / "incoming", "a.jpg", b"x" * 1000)
    wait_for((tmp_path / "outbox" / "a.jpg").exists, what="delivery")

    def settled() -> bool:  # the delivery is counted a moment before its job lets go
        doc = request(url_of(d) + "/api/status")[1]
        return bool(doc["totals"]["delivered"] == 1 and doc["pipelines"][0]["queue"]["leased"] == 0)

    wait_for(settled, what="the delivery counted and its job done")
    status, doc, _ = request(url_of(d) + "/api/status")
    assert status == 200
    assert doc["pid"] == os.getpid()
    assert doc["paused"] is False
    survey = doc["pipelines"][0]
    assert survey["name"] == "survey"
    assert survey["source"] == str(tmp_path / "incoming")
    assert survey["queue"] == {"pending": 0, "leased": 0, "waiting": 0, "dead": 0}
    assert survey["sinks"][0] | {"last_error": None} == {
        "key": "outbox",
        "display": "outbox",
        "health": "ok",
        "last_error": None,
        "in_flight": 0,
        "delivered": 1,
        "bytes": 1000,
        "failed": 0,
    }
    assert doc["totals"] == {"delivered": 1, "bytes": 1000, "failed": 0, "dead_lettered": 0}
    assert doc["throughput"]["files_per_s"] > 0


def test_token_is_required_except_for_healthz_and_the_page(
    daemon: Callable[..., Daemon],
) -> None:
    url = url_of(daemon(token=True))
    for path in ("/api/status", "/metrics", "/readyz", "/api/jobs", "/api/history"):
        status, body, _ = request(url + path)
        assert status == 401, path
        assert "token" in body["error"]
    assert request(url + "/api/pause", "POST", {})[0] == 401
    assert request(url + "/api/status", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert request(url + "/healthz")[0] == 200
    assert request(url + "/")[0] == 200  # the page itself holds no data: it shows a sign-in
    good = {"Authorization": f"Bearer {API_TOKEN}"}
    assert request(url + "/api/status", headers=good)[0] == 200
    # The dashboard's sign-in: a wrong token is refused, the right one sets an HttpOnly cookie.
    assert request(url + "/api/login", "POST", {"token": "nope"})[0] == 401
    status, _, headers = request(url + "/api/login", "POST", {"token": API_TOKEN})
    cookie = headers["Set-Cookie"]
    assert status == 200
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    value = cookie.split(";", 1)[0]
    assert value.startswith(f"skyframe_session_{url.rsplit(':', 1)[-1]}=")
    assert API_TOKEN not in value
    assert request(url + "/api/status", headers={"Cookie": value})[0] == 200
    forged = value.split("=", 1)[0] + "=" + API_TOKEN
    assert request(url + "/api/status", headers={"Cookie": forged})[0] == 401


def test_requests_from_other_sites_are_refused(daemon: Callable[..., Daemon]) -> None:
    d = daemon()
    url = url_of(d)
    # DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1.
    status, body, _ = request(url + "/api/status", headers={"Host": "evil.example"})
    assert status == 403
    assert "Host" in body["error"]
    # A plain HTML form can only send form encodings: a POST must be JSON.
    req = urllib.request.Request(url + "/api/pause", data=b"x=1", method="POST")
    req.add_header("Content-Type", "application/x-www-form-urlencoded")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(req, timeout=10)
    caught.value.close()
    assert caught.value.code == 415
    origin = {"Origin": "http://evil.example"}
    assert request(url + "/api/pause", "POST", {}, headers=origin)[0] == 403
    assert d.engine.control.state()["paused"] is False
    assert request(url + "/api/pause", "POST", [1, 2])[0] == 400


def test_non_loopback_address_needs_a_token(tmp_path: Path, write_config: WriteConfig) -> None:
    text = API_CONFIG.replace("127.0.0.1:0", "0.0.0.0:0").replace("TOKEN", "")
    path = write_config(text.replace("BWLIMIT", ""))
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2
    assert "needs a token" in result.output
    assert "skyframe.yaml:4" in result.output


def test_port_in_use_logs_one_line_and_the_daemon_still_delivers(
    tmp_path: Path, write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "logs").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text = API_CONFIG.replace("127.0.0.1:0", f"127.0.0.1:{port}").replace("TOKEN", "")
        with Daemon(write_config(text.replace("BWLIMIT", ""))) as d:
            assert d.engine.api is None
            make_file(tmp_path / "incoming", "a.jpg", b"abc")
            wait_for((tmp_path / "outbox" / "a.jpg").exists, what="delivery")
    errors = [r for r in caplog.records if "cannot serve the API" in r.getMessage()]
    assert len(errors) == 1
    assert f"127.0.0.1:{port}" in errors[0].getMessage()
    assert not (tmp_path / ".state" / "api.json").exists()


def test_pause_holds_new_files_and_survives_a_restart(
    daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    d = daemon()
    url = url_of(d)
    status, state, _ = request(url + "/api/pause", "POST", {})
    assert status == 200
    assert state == {
        "paused": True,
        "pipelines": {"survey": False, "logs": False},
    }
    make_file(tmp_path / "incoming", "a.jpg", b"abc")
    wait_for(lambda: d.recorder.count("queued", "a.jpg") == 1, what="queued")
    time.sleep(1.0)
    assert not (tmp_path / "outbox" / "a.jpg").exists()
    assert request(url + "/api/status")[1]["pipelines"][0]["queue"]["pending"] == 1
    assert [e.kind for e in d.recorder.events if e.relpath == ""] == ["paused", "paused"]
    d.stop()

    again = daemon()
    url = url_of(again)
    assert request(url + "/api/status")[1]["paused"] is True
    time.sleep(1.0)
    assert not (tmp_path / "outbox" / "a.jpg").exists()
    status, state, _ = request(url + "/api/resume", "POST", {})
    assert state["paused"] is False
    wait_for((tmp_path / "outbox" / "a.jpg").exists, what="delivery after resume")
    assert json.loads((tmp_path / ".state" / "control.json").read_text())["paused"] is False


def test_pausing_one_pipeline_leaves_the_other_running(
    daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    d = daemon()
    url = url_of(d)
    _status, state, _ = request(url + "/api/pause", "POST", {"pipeline": "survey"})
    assert state == {"paused": False, "pipelines": {"survey": True, "logs": False}}
    assert request(url + "/api/pause", "POST", {"pipeline": "nope"})[0] == 404
    make_file(tmp_path / "incoming", "a.jpg", b"abc")
    make_file(tmp_path / "logs", "flight.log", b"log")
    wait_for((tmp_path / "logbox" / "flight.log").exists, what="the other pipeline")
    time.sleep(0.5)
    assert not (tmp_path / "outbox" / "a.jpg").exists()
    metrics = request(url + "/metrics")[1]
    assert 'skyframe_paused{pipeline="survey"} 1.0' in metrics
    assert 'skyframe_paused{pipeline="logs"} 0.0' in metrics
    request(url + "/api/resume", "POST", {"pipeline": "survey"})
    wait_for((tmp_path / "outbox" / "a.jpg").exists, what="delivery after resume")


def test_pause_halts_a_running_transfer_within_a_second(
    daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    d = daemon(bwlimit="4MB/s")
    url = url_of(d)
    make_file(tmp_path / "incoming", "video.mp4", os.urandom(24 * 1024 * 1024))

    def done() -> int:
        transfers = request(url + "/api/status")[1]["transfers"]
        return int(transfers[0]["bytes_done"]) if transfers else 0

    wait_for(lambda: done() > 0, what="the transfer to start", timeout=20)
    request(url + "/api/pause", "POST", {})
    time.sleep(1.0)  # a piece already on its way may still land
    held_at = done()
    time.sleep(2.0)  # at 4 MB/s, 8 MB more would go through if it were not held
    assert done() == held_at
    assert 0 < held_at < 24 * 1024 * 1024
    request(url + "/api/resume", "POST", {})
    wait_for((tmp_path / "outbox" / "video.mp4").exists, timeout=30, what="delivery")
    assert (tmp_path / "outbox" / "video.mp4").stat().st_size == 24 * 1024 * 1024


def test_dead_letters_are_listed_and_retried(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    (tmp_path / "outbox").write_text("a file where the sink folder should be")
    d = daemon()
    url = url_of(d)
    make_file(tmp_path / "incoming", "a.jpg", b"abc")
    wait_for(lambda: d.recorder.count("dead-lettered", "a.jpg") == 1, what="dead letter")
    status, body, _ = request(url + "/api/jobs?state=dead")
    assert status == 200
    assert body["total"] == 1
    job = body["jobs"][0]
    assert (job["pipeline"], job["relpath"], job["state"], job["attempts"]) == (
        "survey",
        "a.jpg",
        "dead",
        1,
    )
    assert job["errors"]
    errors = request(url + "/api/status")[1]["errors"]
    assert errors[0]["kind"] == "dead-lettered"
    assert errors[0]["sink"] == "outbox"
    assert errors[0]["error"]
    assert request(url + "/api/retry", "POST", {"pipeline": "survey", "path": "b.jpg"})[0] == 404
    assert request(url + "/api/retry", "POST", {})[0] == 400
    assert request(url + "/api/retry", "POST", {"all": True, "pipeline": "nope"})[0] == 404
    status, body, _ = request(url + "/api/nothing-here")
    assert status == 404
    assert "error" in body
    assert request(url + "/api/retry")[1] == {"error": "Method Not Allowed"}
    (tmp_path / "outbox").unlink()  # the cause is fixed
    status, body, _ = request(url + "/api/retry", "POST", {"pipeline": "survey", "path": "a.jpg"})
    assert (status, body) == (200, {"retried": 1})
    wait_for((tmp_path / "outbox" / "a.jpg").exists, what="delivery after retry")
    # The file is renamed into place a moment before the delivery is recorded and counted.
    wait_for(lambda: d.recorder.count("delivered", "a.jpg") == 1, what="delivery recorded")
    assert request(url + "/api/jobs?state=dead")[1]["total"] == 0
    metrics = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(request(url + "/metrics")[1])
        for sample in family.samples
    }
    failures = [
        (labels, value)
        for (name, labels), value in metrics.items()
        if name == "skyframe_failures_total"
    ]
    assert len(failures) == 1
    assert failures[0][1] == 1.0
    assert dict(failures[0][0])["sink"] == "outbox"
    delivered = ("skyframe_files_delivered_total", (("pipeline", "survey"), ("sink", "outbox")))
    assert metrics[delivered] == 1.0
    assert metrics[("skyframe_dead_letters_total", (("pipeline", "survey"),))] == 1.0
    assert request(url + "/api/jobs?state=nope")[0] == 400
    assert request(url + "/api/jobs?limit=0")[0] == 400


def test_readyz_reports_each_sink(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = daemon()
    url = url_of(d)
    status, body, _ = request(url + "/readyz")
    assert status == 200
    assert body["ready"] is True
    assert {(s["pipeline"], s["sink"]) for s in body["sinks"]} == {
        ("survey", "outbox"),
        ("logs", "logbox"),
    }
    for pipeline in d.engine.pipelines.values():
        for sink in pipeline.sinks:
            if sink.key == "outbox":
                sink.health.state = "offline"
    status, body, _ = request(url + "/readyz")
    assert status == 503
    assert body["ready"] is False


def test_history_and_event_stream(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = daemon()
    url = url_of(d)
    stream = urllib.request.urlopen(url + "/api/events", timeout=10)
    try:
        first = stream.readline(), stream.readline()
        assert first[0] == b"event: status\n"
        assert json.loads(first[1].removeprefix(b"data: "))["pipelines"][0]["name"] == "survey"
        make_file(tmp_path / "incoming", "a.jpg", b"abc")
        kinds = []
        deadline = time.monotonic() + 10
        while "delivered" not in kinds and time.monotonic() < deadline:
            line = stream.readline()
            if line == b"event: lifecycle\n":
                kinds.append(json.loads(stream.readline().removeprefix(b"data: "))["kind"])
        assert kinds[:3] == ["queued", "started", "delivered"]
    finally:
        stream.close()
    events = request(url + "/api/history?path=a.jpg")[1]["events"]
    assert [e["kind"] for e in events] == ["delivered", "started", "queued"]
    assert request(url + "/api/history?failed=1")[1]["events"] == []
    assert len(request(url + "/api/history?since=1h")[1]["events"]) == 3
    assert request(url + "/api/history?since=2100-01-01")[1]["events"] == []
    assert request(url + "/api/history?since=soon")[0] == 400


def test_cli_status_pause_resume_against_the_daemon(
    daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    d = daemon(token=True)
    config = str(tmp_path / "skyframe.yaml")
    make_file(tmp_path / "incoming", "a.jpg", b"abc")
    wait_for((tmp_path / "outbox" / "a.jpg").exists, what="delivery")
    runner = CliRunner()
    result = runner.invoke(cli, ["pause", config, "--pipeline", "logs"])
    assert result.exit_code == 0, result.output
    assert "paused logs; held now: logs" in result.output
    assert d.engine.control.held() == {"logs"}
    wait_for(lambda: d.engine.tracker.snapshot()["totals"]["delivered"] == 1)
    result = runner.invoke(cli, ["status", config])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("skyframe ")
    assert lines[0].endswith(": running")
    assert "logs (paused): " in result.output
    assert "-> outbox: ok, 0 in flight, 1 delivered (3 B), 0 failed" in result.output
    assert API_TOKEN not in result.output
    result = runner.invoke(cli, ["status", config, "--json"])
    assert json.loads(result.output)["pipelines"][1]["paused"] is True
    result = runner.invoke(cli, ["resume", config])
    assert result.exit_code == 0
    assert "held now: nothing" in result.output
    assert d.engine.control.held() == set()


def test_cli_status_reaches_the_daemon_past_a_proxy_the_environment_names(
    daemon: Callable[..., Daemon], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A company laptop's proxy: urllib would send the request for 127.0.0.1 to it.
    daemon()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    result = CliRunner().invoke(cli, ["status", str(tmp_path / "skyframe.yaml")])
    assert result.exit_code == 0, result.output
    assert ": running" in result.output.splitlines()[0]


def test_cli_status_with_a_wrong_token_says_so(
    daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon(token=True)
    config = tmp_path / "skyframe.yaml"
    config.write_text(config.read_text().replace(API_TOKEN, "wrong"))
    result = CliRunner().invoke(cli, ["status", str(config)])
    assert result.exit_code == 1
    assert "answered 401" in result.output
    assert "api.token" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_without_a_daemon(tmp_path: Path, write_config: WriteConfig) -> None:
    (tmp_path / "logs").mkdir()
    config = str(write_config(API_CONFIG.replace("TOKEN", "").replace("BWLIMIT", "")))
    runner = CliRunner()
    result = runner.invoke(cli, ["status", config])
    assert result.exit_code == 1
    assert result.output.startswith("skyframe: error: no daemon is running for ")
    assert len(result.output.strip().splitlines()) == 1
    # A stale api.json (the daemon was killed) is no daemon either.
    (tmp_path / ".state").mkdir()
    (tmp_path / ".state" / "api.json").write_text('{"url": "http://127.0.0.1:9", "pid": 999999}')
    result = runner.invoke(cli, ["status", config])
    assert result.exit_code == 1
    assert "has ended" in result.output
    # pause/resume without a daemon switch what the next start obeys.
    result = runner.invoke(cli, ["pause", config, "-p", "survey"])
    assert result.exit_code == 0
    assert "the next start is paused" in result.output
    saved = json.loads((tmp_path / ".state" / "control.json").read_text())
    assert saved == {"paused": False, "pipelines": {"survey": True}}
    result = runner.invoke(cli, ["pause", config, "-p", "nope"])
    assert result.exit_code == 2
    assert "no pipeline named 'nope'" in result.output
    # A --once run obeys it: the held file stays queued, and the run says so (exit 1).
    make_file(tmp_path / "incoming", "a.jpg", b"abc")
    make_file(tmp_path / "logs", "flight.log", b"log")
    result = runner.invoke(cli, ["run", config, "--once"])
    assert result.exit_code == 1, result.output
    assert "held in the queue, pipeline paused: 1" in result.output
    assert (tmp_path / "logbox" / "flight.log").exists()
    assert not (tmp_path / "outbox" / "a.jpg").exists()
    result = runner.invoke(cli, ["resume", config])
    assert "the next start is resumed" in result.output
    assert json.loads((tmp_path / ".state" / "control.json").read_text())["pipelines"] == {}
    result = runner.invoke(cli, ["run", config, "--once"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "outbox" / "a.jpg").read_bytes() == b"abc"


def test_a_paused_daemon_stops_at_once_and_its_transfer_goes_back_to_the_queue(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    (tmp_path / "logs").mkdir()
    text = API_CONFIG.replace("shutdown_grace: 1s", "shutdown_grace: 30s").replace("TOKEN", "")
    d = Daemon(write_config(text.replace("BWLIMIT", "bwlimit: 4MB/s")))
    with d:
        make_file(tmp_path / "incoming", "video.mp4", os.urandom(16 * 1024 * 1024))
        wait_for(lambda: d.recorder.count("started", "video.mp4") == 1, what="the upload")
        d.engine.set_paused(True)
        began = time.monotonic()
        d.stop()  # the held transfer cannot finish: no point waiting 30 s for it
        assert time.monotonic() - began < 5
    assert d.engine.abandoned == 0
    queue = JobQueue(tmp_path / ".state" / "queue")
    try:
        assert [r.state for r in queue.records()] == ["pending"]
    finally:
        queue.close()
    assert not (tmp_path / "outbox" / "video.mp4").exists()


def test_a_failing_monitoring_consumer_never_fails_a_transfer(
    daemon: Callable[..., Daemon], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = daemon()

    def broken(event: object) -> None:
        raise RuntimeError("history database gone")

    d.engine.history.record = broken  # type: ignore[method-assign]
    make_file(tmp_path / "incoming", "a.jpg", b"abc")
    wait_for((tmp_path / "outbox" / "a.jpg").exists, what="delivery")
    wait_for(lambda: d.recorder.count("delivered", "a.jpg") == 1, what="the event")
    assert d.recorder.count("failed") == 0
    assert "could not record a delivered event" in caplog.text


def test_cli_pause_with_a_daemon_that_runs_without_its_api(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    (tmp_path / "logs").mkdir()
    text = API_CONFIG.replace('api: {listen: "127.0.0.1:0"TOKEN}', "api: {enabled: false}")
    config = write_config(text.replace("BWLIMIT", ""))
    with Daemon(config) as d:
        assert d.engine.api is None
        result = CliRunner().invoke(cli, ["pause", str(config)])
        assert result.exit_code == 1
        assert "without an API that answers" in result.output
        assert d.engine.control.held() == set()
    assert not (tmp_path / ".state" / "control.json").exists()
