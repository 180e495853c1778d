"""A station's link to the hub (skyframe.hublink) against a hub stand-in on 127.0.0.1.

The stand-in keeps what the ingest contract of docs/hub.md asks of the hub: it checks the
token, counts an event id it already has as a duplicate, hands out commands until they are
confirmed, and can answer with chosen status codes or be stopped and started again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import servers
from aiohttp import web
from helpers import Daemon, WriteConfig, make_file, run_once, skyframe, wait_for

from skyframe.config import HubLinkConfig
from skyframe.errors import ConfigError
from skyframe.events import LifecycleEvent
from skyframe.hublink import HubLink, Outbox
from skyframe.state import Manifest

T = TypeVar("T")
TOKEN = "t0ken-for-tests-only-0123456789"


class FakeHub:
    """The ingest end of a hub, on a loop and thread of its own."""

    def __init__(self) -> None:
        self.port = servers.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bodies: list[dict[str, Any]] = []  #: every request's body, answered or not
        self.statuses: list[int] = []  #: answers to the next requests (200 when empty)
        self.events: dict[str, dict[str, Any]] = {}  #: by id: each event once
        self.duplicates = 0
        self.commands: list[dict[str, Any]] = []  #: handed out until confirmed
        self.acks: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-hub")
        self._thread.start()
        self._runner: web.AppRunner | None = None

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(5)

    async def _ingest(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self.lock:
            self.bodies.append(body)
            status = self.statuses.pop(0) if self.statuses else 200
            if request.headers.get("Authorization") != f"Bearer {TOKEN}":
                status = 401
            if status != 200:
                return web.Response(status=status, text="refused")
            for each in body["events"]:
                if each["id"] in self.events:
                    self.duplicates += 1
                else:
                    self.events[each["id"]] = each
            confirmed = {ack["id"] for ack in body["acks"]}
            self.acks += body["acks"]
            self.commands = [c for c in self.commands if c["id"] not in confirmed]
            return web.json_response(
                {"accepted": len(body["events"]), "duplicates": 0, "commands": self.commands}
            )

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/v1/ingest", self._ingest)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def start(self) -> None:
        self._call(self._start())

    def stop(self) -> None:
        self._call(self._stop())

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def relpaths(self) -> list[str]:
        with self.lock:
            ordered = sorted(self.events.values(), key=lambda e: e["seq"])
            return [e["event"]["relpath"] for e in ordered]


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    fake = FakeHub()
    fake.start()
    try:
        yield fake
    finally:
        fake.close()


def link_config(url: str, **extra: Any) -> HubLinkConfig:
    return HubLinkConfig(url=url, token=TOKEN, station="laptop-3", **{"interval": 0.2, **extra})


def delivered(i: int) -> LifecycleEvent:
    return LifecycleEvent("delivered", "survey", f"f{i:03d}.jpg", sink="s3://b", size=i)


def test_events_reach_the_hub_with_ids_and_a_heartbeat(hub: FakeHub, tmp_path: Path) -> None:
    link = HubLink(link_config(hub.url), tmp_path, status=lambda: {"pipelines": ["survey"]})
    link.start()
    try:
        for i in range(5):
            link.skyframe_event(delivered(i))
        link.skyframe_event(LifecycleEvent("queued", "survey", "x.jpg"))  # not for the hub
        link.skyframe_event(LifecycleEvent("progress", "survey", "x.jpg", bytes_done=1))
        wait_for(lambda: len(hub.relpaths()) == 5, what="five events at the hub")
        wait_for(lambda: link.pending == 0, what="an empty outbox")
    finally:
        link.close()
    assert hub.relpaths() == [f"f{i:03d}.jpg" for i in range(5)]
    first = hub.bodies[0]
    assert first["station"] == "laptop-3"
    assert first["status"]["pipelines"] == ["survey"]
    assert first["status"]["outbox"] >= 0
    assert len({e["id"] for e in hub.events.values()}) == 5


def test_the_outbox_keeps_events_across_a_restart_while_the_hub_is_away(
    hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hub.stop()
    link = HubLink(link_config(hub.url), tmp_path)
    link.start()
    for i in range(3):
        link.skyframe_event(delivered(i))
    wait_for(lambda: link.last_error != "", what="a failed exchange")
    assert "cannot reach" in caplog.text
    link.close(timeout=0.2)  # as a stop would: the events stay on disk
    assert len(Outbox(tmp_path, 1000)) == 3

    hub.start()
    again = HubLink(link_config(hub.url), tmp_path)
    again.start()
    try:
        wait_for(lambda: len(hub.relpaths()) == 3, what="the kept events at the hub")
    finally:
        again.close()
    assert hub.relpaths() == ["f000.jpg", "f001.jpg", "f002.jpg"]
    assert TOKEN not in caplog.text


def test_a_batch_sent_again_after_a_lost_answer_counts_nothing_twice(
    hub: FakeHub, tmp_path: Path
) -> None:
    link = HubLink(link_config(hub.url, interval=0.05), tmp_path)
    for i in range(4):
        link.skyframe_event(delivered(i))
    hub.statuses = [502]  # the hub may have stored them, the station cannot know
    original = hub._ingest

    async def store_then_fail(request: web.Request) -> web.Response:
        if hub.statuses:
            body = await request.json()
            hub.statuses.pop(0)
            with hub.lock:
                hub.bodies.append(body)
                for each in body["events"]:
                    hub.events[each["id"]] = each
            return web.Response(status=502)
        return await original(request)

    hub._ingest = store_then_fail  # type: ignore[method-assign]
    hub.stop()
    hub.start()
    link.start()
    try:
        wait_for(lambda: hub.duplicates == 4, what="the batch sent again")
        wait_for(lambda: link.pending == 0, what="an empty outbox")
    finally:
        link.close()
    assert len(hub.events) == 4


def test_commands_are_carried_out_once_and_confirmed(hub: FakeHub, tmp_path: Path) -> None:
    done: list[tuple[str, str | None]] = []

    def command(action: str, pipeline: str | None) -> str:
        done.append((action, pipeline))
        return f"{action}d {pipeline or 'the station'}"

    hub.commands = [
        {"id": "c1", "action": "pause", "pipeline": "survey"},
        {"id": "c2", "action": "explode", "pipeline": None},
    ]
    link = HubLink(link_config(hub.url), tmp_path, command=command)
    link.start()
    try:
        wait_for(lambda: not hub.commands, what="both commands confirmed")
    finally:
        link.close()
    assert done == [("pause", "survey")]
    acks = {ack["id"]: ack for ack in hub.acks}
    assert acks["c1"] == {"id": "c1", "ok": True, "detail": "paused survey"}
    assert acks["c2"]["ok"] is False
    assert "unknown action" in acks["c2"]["detail"]


def test_a_refused_token_is_said_and_retried_slowly(
    hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = HubLinkConfig(url=hub.url, token="wrong-token-0123456789", station="laptop-3")
    link = HubLink(config, tmp_path)
    link.skyframe_event(delivered(1))
    link.start()
    try:
        wait_for(lambda: link.last_error.startswith("HTTP 401"), what="a refusal")
        requests = len(hub.bodies)
        time.sleep(0.5)
        assert len(hub.bodies) == requests  # no hammering: the next try is a minute away
    finally:
        link.close(timeout=0.1)
    assert "HTTP 401" in caplog.text
    assert "wrong-token" not in caplog.text
    assert link.pending == 1


def test_a_refusal_that_names_no_event_keeps_the_events_and_is_retried_slowly(
    hub: FakeHub, tmp_path: Path
) -> None:
    # A hub that does not say which event it refuses (an older one): nothing is set aside.
    hub.statuses = [422, 422]
    link = HubLink(link_config(hub.url), tmp_path)
    link.skyframe_event(delivered(1))
    link.start()
    try:
        wait_for(lambda: link.last_error == "HTTP 422: refused", what="the refusal")
        requests = len(hub.bodies)
        time.sleep(0.5)
        assert len(hub.bodies) == requests  # the next try is a minute away
    finally:
        link.close(timeout=0.1)
    assert link.pending == 1
    assert link.outbox.refused == 0


def test_a_body_too_large_for_a_proxy_goes_in_halves_then_one_event_is_set_aside(
    hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A proxy in front of the hub may take less than the hub's 1 MiB: its 413 halves the
    # batch, the batch grows back once taken, and an event refused alone is set aside.
    caplog.set_level(logging.INFO, logger="skyframe.hublink")
    hub.statuses = [413, 200, 413, 413]
    link = HubLink(link_config(hub.url, batch_size=4), tmp_path)
    for i in range(5):
        link.skyframe_event(delivered(i))
    link.start()
    try:
        wait_for(lambda: link.pending == 0, what="the outbox emptied")
    finally:
        link.close(timeout=0.5)
    sent = [[e["event"]["relpath"] for e in body["events"]] for body in hub.bodies]
    assert [names for names in sent if names] == [
        ["f000.jpg", "f001.jpg", "f002.jpg", "f003.jpg"],  # 413: 2 at a time
        ["f000.jpg", "f001.jpg"],  # taken: 4 at a time again
        ["f002.jpg", "f003.jpg", "f004.jpg"],  # 413: 1 at a time
        ["f002.jpg"],  # 413 alone: set aside
        ["f003.jpg"],
        ["f004.jpg"],
    ]
    assert hub.relpaths() == ["f000.jpg", "f001.jpg", "f003.jpg", "f004.jpg"]
    assert link.outbox.refused == 1
    assert "sending 2 event(s) at a time" in caplog.text
    assert "the delivered event of survey:f002.jpg is set aside" in caplog.text


def test_a_full_outbox_drops_the_oldest(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, capacity=1000)
    threads = [
        threading.Thread(
            target=lambda k=k: [outbox.add({"relpath": f"{k}-{i}"}) for i in range(300)]
        )
        for k in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(outbox), outbox.dropped) == (1000, 200)
    oldest = outbox.oldest(1000)
    assert len(oldest) == 1000
    assert [seq for seq, _, _ in oldest] == sorted(seq for seq, _, _ in oldest)
    outbox.remove_through(oldest[499][0])
    assert len(outbox) == 500
    outbox.close()


@pytest.mark.parametrize(
    ("hub_entry", "expected"),
    [
        ("{url: 'http://hub.example.org', token: '${HUB_TOKEN}', station: a}", "use https://"),
        ("{url: 'https://hub.example.org', token: 'abc', station: a}", "from the environment"),
        ("{url: 'https://hub.example.org', token: '${HUB_TOKEN}', station: 'a b'}", "station"),
    ],
)
def test_hub_settings_that_would_leak_or_cannot_work_are_refused(
    tmp_path: Path, write_config: WriteConfig, hub_entry: str, expected: str
) -> None:
    config = write_config(
        f"hub: {hub_entry}\n"
        "pipelines:\n"
        "  - name: p\n"
        "    source: {path: incoming}\n"
        "    sinks: [{url: outbox}]\n"
    )
    (tmp_path / "incoming").mkdir(exist_ok=True)
    done = skyframe(tmp_path, "validate", str(config), env={"HUB_TOKEN": TOKEN})
    assert done.returncode == 2
    assert expected in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert TOKEN not in done.stderr


def test_the_token_from_the_environment_is_taken(tmp_path: Path) -> None:
    from skyframe.config import load_config

    path = tmp_path / "skyframe.yaml"
    path.write_text(
        "hub: {url: 'https://hub.example.org', token: '${HUB_TOKEN}', station: laptop-3}\n"
        "pipelines: [{name: p, source: {path: in}, sinks: [{url: out}]}]\n"
    )
    config = load_config(path, environ={"HUB_TOKEN": TOKEN})
    assert config.hub is not None
    assert config.hub.token == TOKEN
    with pytest.raises(ConfigError, match="HUB_TOKEN"):
        load_config(path, environ={})


# --- a station's engine and the hub ---------------------------------------------------------


def station_config(hub_url: str) -> str:
    return f"""
        state_dir: state
        hub: {{url: '{hub_url}', token: '${{HUB_TOKEN}}', station: laptop-3, interval: 0.2}}
        pipelines:
          - name: survey
            source: {{path: incoming, settle: 0}}
            sinks: [{{url: outbox}}]
        """


def test_a_run_reports_each_delivery_with_its_sha256(
    hub: FakeHub, tmp_path: Path, write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HUB_TOKEN", TOKEN)
    config = write_config(station_config(hub.url))
    for i in range(3):
        make_file(tmp_path / "incoming", f"f{i}.jpg", f"photo {i}")
    assert run_once(config).delivered == 3
    delivered = {
        e["event"]["relpath"]: e["event"]
        for e in hub.events.values()
        if e["event"]["kind"] == "delivered"
    }
    assert sorted(delivered) == ["f0.jpg", "f1.jpg", "f2.jpg"]
    manifest = Manifest(tmp_path / "state" / "manifest")
    try:
        for relpath, event in delivered.items():
            entry = manifest.get("survey", "outbox", relpath)
            assert entry is not None
            assert (
                event["sha256"]
                == entry.sha256
                == hashlib.sha256((tmp_path / "incoming" / relpath).read_bytes()).hexdigest()
            )
    finally:
        manifest.close()
    assert hub.bodies[-1]["status"] is not None  # a heartbeat with the station's status
    assert len(Outbox(tmp_path / "state", 1000)) == 0


def test_a_pause_from_the_hub_pauses_the_pipeline_and_is_confirmed(
    hub: FakeHub, tmp_path: Path, write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HUB_TOKEN", TOKEN)
    config = write_config(station_config(hub.url))
    hub.commands = [
        {"id": "c1", "action": "pause", "pipeline": "survey"},
        {"id": "c2", "action": "resume", "pipeline": "elsewhere"},
    ]
    with Daemon(config) as daemon:
        wait_for(lambda: not hub.commands, what="the commands confirmed")
        assert daemon.engine.control.held() == {"survey"}
        make_file(tmp_path / "incoming", "held.jpg", "waits")
        time.sleep(0.5)
        assert not (tmp_path / "outbox" / "held.jpg").exists()
    acks = {ack["id"]: ack for ack in hub.acks}
    assert acks["c1"] == {"id": "c1", "ok": True, "detail": "paused survey"}
    assert acks["c2"]["ok"] is False
    assert "elsewhere" in acks["c2"]["detail"]


def test_events_in_the_outbox_outlive_a_sigkill(
    hub: FakeHub, tmp_path: Path, write_config: WriteConfig
) -> None:
    hub.stop()  # away while the station delivers
    config = write_config(station_config(hub.url))
    env = {**os.environ, "HUB_TOKEN": TOKEN}
    for i in range(5):
        make_file(tmp_path / "incoming", f"f{i}.jpg", f"photo {i}")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "skyframe", "run", "--no-watch-config", str(config)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: len(list((tmp_path / "outbox").glob("*.jpg"))) == 5, what="delivery")
        outbox = Outbox(tmp_path / "state", 1000)
        wait_for(
            lambda: sum(e["kind"] == "delivered" for _, _, e in outbox.oldest(100)) == 5,
            what="five deliveries in the outbox",
        )
        outbox.close()
    finally:
        daemon.kill()
        daemon.wait(30)
    hub.start()
    again = subprocess.Popen(
        [sys.executable, "-m", "skyframe", "run", "--no-watch-config", str(config)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: (
                sorted(
                    e["event"]["relpath"]
                    for e in list(hub.events.values())
                    if e["event"]["kind"] == "delivered"
                )
                == [f"f{i}.jpg" for i in range(5)]
            ),
            what="the deliveries at the hub after the restart",
            timeout=30,
        )
    finally:
        again.terminate()
        assert again.wait(30) == 0
    assert hub.duplicates == 0
