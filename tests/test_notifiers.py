"""Notifiers run beside the transfers: a slow or failing one holds nothing up, each gets its
events in order, and the built-in webhook is wired from the config into a real run."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pluggy
import pytest
from aiohttp import web
from helpers import WriteConfig, make_file, run_once

from skyframe.events import LifecycleEvent
from skyframe.hookspecs import skyframe_event
from skyframe.markers import hookimpl
from skyframe.notifiers import Notifiers


class Slow:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.seen: list[str] = []

    @hookimpl
    def skyframe_event(self, event: LifecycleEvent) -> None:
        time.sleep(self.delay)
        self.seen.append(f"{event.kind}:{event.relpath}")


class Failing:
    calls = 0

    @hookimpl
    def skyframe_event(self, event: LifecycleEvent) -> None:
        Failing.calls += 1
        raise RuntimeError("notifier bug")


class Recorder:
    def __init__(self) -> None:
        self.seen: list[str] = []
        self.threads: set[str] = set()

    @hookimpl
    def skyframe_event(self, event: LifecycleEvent) -> None:
        self.threads.add(threading.current_thread().name)
        self.seen.append(f"{event.kind}:{event.relpath}")


def _pm(*plugins: object) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("skyframe")
    pm.add_hookspecs(type("Specs", (), {"skyframe_event": staticmethod(skyframe_event)}))
    for index, plugin in enumerate(plugins):
        pm.register(plugin, name=f"plugin-{index}")
    return pm


def test_a_slow_notifier_holds_up_neither_the_caller_nor_the_others() -> None:
    slow, fast = Slow(0.05), Recorder()
    notifiers = Notifiers(_pm(slow, fast))
    began = time.monotonic()
    for i in range(40):  # 2 s of work for the slow one
        notifiers.publish(LifecycleEvent("delivered", "p", f"f{i}"))
    assert time.monotonic() - began < 0.5
    deadline = time.monotonic() + 5
    while len(fast.seen) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fast.seen == [f"delivered:f{i}" for i in range(40)]
    assert len(slow.seen) < 40  # still busy: it did not hold the fast one back
    assert notifiers.close(timeout=10)  # the slow one catches up before its thread ends
    assert slow.seen == fast.seen  # in order, all of them
    assert fast.threads
    assert not fast.threads & {threading.current_thread().name}


def test_a_failing_notifier_is_logged_and_the_others_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    notifiers = Notifiers(_pm(Failing(), recorder))
    for i in range(3):
        notifiers.publish(LifecycleEvent("queued", "p", f"f{i}"))
    notifiers.close()
    assert recorder.seen == ["queued:f0", "queued:f1", "queued:f2"]
    failures = [r for r in caplog.records if "failed on a queued event" in r.getMessage()]
    assert len(failures) == 3
    assert failures[0].getMessage().startswith("notifier plugin-0 failed")


def test_a_notifier_that_falls_too_far_behind_loses_the_oldest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = threading.Event()

    class Stuck:
        def __init__(self) -> None:
            self.seen: list[str] = []

        @hookimpl
        def skyframe_event(self, event: LifecycleEvent) -> None:
            gate.wait(10)
            self.seen.append(event.relpath)

    stuck = Stuck()
    notifiers = Notifiers(_pm(stuck), capacity=5)
    notifiers.publish(LifecycleEvent("queued", "p", "first"))  # taken, then stuck
    time.sleep(0.1)
    for i in range(8):
        notifiers.publish(LifecycleEvent("queued", "p", f"f{i}"))
    assert notifiers.dropped == {"plugin-0": 3}
    assert any("falling behind" in r.getMessage() for r in caplog.records)
    gate.set()
    notifiers.close()
    assert stuck.seen == ["first", "f3", "f4", "f5", "f6", "f7"]


def test_every_event_reaches_the_notifiers_before_the_shutdown_hooks(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    config = write_config(
        """
        state_dir: .state
        pipelines:
          - name: survey
            source: {path: incoming, settle: 0}
            sinks: [{url: outbox}]
        """
    )
    for i in range(50):
        make_file(tmp_path / "incoming", f"f{i:02d}.jpg", b"x")

    class AtShutdown:
        def __init__(self) -> None:
            self.seen: list[str] = []
            self.at_shutdown = -1

        @hookimpl
        def skyframe_event(self, event: LifecycleEvent) -> None:
            time.sleep(0.002)
            self.seen.append(event.kind)

        @hookimpl
        def skyframe_shutdown(self) -> None:
            self.at_shutdown = len(self.seen)

    plugin = AtShutdown()
    summary = run_once(config, plugin)
    assert summary.delivered == 50
    assert plugin.seen.count("delivered") == 50
    assert plugin.at_shutdown == len(plugin.seen)


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A local aiohttp server that records the bodies POSTed to /hook."""
    import asyncio

    bodies: list[dict[str, Any]] = []
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def hook(request: web.Request) -> web.Response:
        body = await request.json()
        body["authorization"] = request.headers.get("Authorization")
        bodies.append(body)
        return web.json_response({})

    async def setup() -> None:
        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        holder["runner"] = runner
        holder["port"] = runner.addresses[0][1]

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(setup())
        started.set()
        loop.run_forever()
        loop.run_until_complete(holder["runner"].cleanup())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    yield f"http://127.0.0.1:{holder['port']}/hook", bodies
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_a_configured_webhook_receives_the_run(
    tmp_path: Path,
    write_config: WriteConfig,
    receiver: tuple[str, list[dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, bodies = receiver
    monkeypatch.setenv("HOOK_TOKEN", "hook-secret")
    config = write_config(
        f"""
        state_dir: .state
        notify:
          - webhook:
              url: {url}
              headers: {{Authorization: "Bearer ${{HOOK_TOKEN}}"}}
              events: [delivered]
              flush_interval: 100ms
        pipelines:
          - name: survey
            source: {{path: incoming, settle: 0}}
            sinks: [{{url: outbox}}]
        """
    )
    for i in range(3):
        make_file(tmp_path / "incoming", f"f{i}.jpg", b"x")
    caplog.set_level(logging.DEBUG)
    run_once(config)
    events = [e for body in bodies for e in body["events"]]
    assert sorted(e["relpath"] for e in events) == ["f0.jpg", "f1.jpg", "f2.jpg"]
    assert {e["kind"] for e in events} == {"delivered"}
    assert {body["authorization"] for body in bodies} == {"Bearer hook-secret"}
    assert "hook-secret" not in caplog.text
    assert json.dumps(events)  # the documented JSON shape


def test_unknown_event_kinds_are_a_config_error(write_config: WriteConfig) -> None:
    from skyframe.config import load_config
    from skyframe.errors import ConfigError

    config = write_config(
        """
        notify:
          - webhook: {url: "http://127.0.0.1:9/hook", events: [delivered, deliverd]}
        pipelines:
          - name: survey
            source: {path: incoming}
            sinks: [{url: outbox}]
        """
    )
    with pytest.raises(ConfigError, match=r"unknown event kind\(s\) 'deliverd'") as caught:
        load_config(config)
    assert "skyframe.yaml:2" in str(caught.value)
