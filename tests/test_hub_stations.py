"""Stations and a hub end to end: three station daemons and one hub, all real processes.

Files delivered at each station appear on the hub; the hub is killed for a while as the
stations deliver, and once it is back every event is there exactly once; a station killed
with events in its outbox sends them after its restart. The hub runs on SQLite and on
PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import servers
import sqlalchemy as sa
from helpers import make_file, wait_for

from skyframe.hub.db import open_database
from skyframe.hub.schema import events, stations
from skyframe.hublink import Outbox

STATIONS = ("laptop-1", "laptop-2", "laptop-3")
#: How long the hub stays away while the stations deliver.
OUTAGE = 30.0
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def start(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``skyframe ARGS`` in ``cwd``, its output appended to ``cwd/output.log``."""
    with open(cwd / "output.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "skyframe", *args],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


class HubProcess:
    """``skyframe hub hub.yaml`` as a process, started again on the same port."""

    def __init__(self, folder: Path, database: str) -> None:
        self.folder = folder
        self.port = servers.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = folder / "hub.yaml"
        self.config.write_text(f"listen: 127.0.0.1:{self.port}\ndatabase: {database}\n")
        self.process: subprocess.Popen[bytes] | None = None

    def token(self, station: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "skyframe", "hub", "token", "add", station, "-c", "hub.yaml"],
            cwd=self.folder,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip().splitlines()[-1]

    def start(self) -> None:
        self.process = start("hub", "hub.yaml", cwd=self.folder)
        process = self.process

        def answers() -> bool:
            if process.poll() is not None:
                output = (self.folder / "output.log").read_text(errors="replace")
                raise AssertionError(f"the hub exited: {output[-2000:]}")
            try:
                with OPENER.open(f"{self.url}/api/stations", timeout=2) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_for(answers, what="the hub to answer", timeout=60)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(30)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            finally:
                self.kill()


class Station:
    """One station's daemon (``skyframe run``), reporting to the hub."""

    def __init__(self, folder: Path, name: str, hub: HubProcess, token: str) -> None:
        self.folder = folder
        self.name = name
        self.env = {"HUB_TOKEN": token}
        folder.mkdir()
        (folder / "incoming").mkdir()
        (folder / "skyframe.yaml").write_text(
            "state_dir: state\n"
            "api: {listen: '127.0.0.1:0'}\n"
            f"hub: {{url: '{hub.url}', token: '${{HUB_TOKEN}}', station: {name}, interval: 0.5}}\n"
            "pipelines:\n"
            "  - name: survey\n"
            "    source: {path: incoming, settle: 0.2}\n"
            "    sinks: [{url: outbox}]\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = start(
            "run", "--no-watch-config", "skyframe.yaml", cwd=self.folder, env=self.env
        )

    def drop(self, *names: str) -> None:
        for name in names:
            make_file(self.folder / "incoming", name, f"{self.name} {name}")

    def delivered(self) -> set[str]:
        outbox = self.folder / "outbox"
        return {p.name for p in outbox.iterdir()} if outbox.is_dir() else set()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(30)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                assert self.process.wait(60) == 0
            finally:
                self.kill()


def delivered_at_hub(database: sa.Engine) -> dict[str, list[str]]:
    """Each station's delivered events at the hub: the files, with repeats."""
    query = (
        sa.select(stations.c.name, events.c.relpath)
        .join(stations, stations.c.id == events.c.station_id)
        .where(events.c.kind == "delivered")
    )
    with database.connect() as connection:
        rows = connection.execute(query).all()
    out: dict[str, list[str]] = {name: [] for name in STATIONS}
    for station, relpath in rows:
        out[station].append(relpath)
    return {name: sorted(files) for name, files in out.items()}


@pytest.fixture
def fleet(tmp_path: Path, hub_database: str) -> Iterator[tuple[HubProcess, list[Station]]]:
    hub = HubProcess(tmp_path, hub_database)
    fleet = [Station(tmp_path / name, name, hub, hub.token(name)) for name in STATIONS]
    try:
        yield hub, fleet
    finally:
        for station in fleet:
            station.kill()
        hub.kill()


def test_three_stations_report_through_a_hub_outage_and_a_station_crash(
    fleet: tuple[HubProcess, list[Station]], hub_database: str
) -> None:
    hub, stations_ = fleet
    database = open_database(hub_database)
    try:
        hub.start()
        for station in stations_:
            station.drop("a.jpg", "b.jpg", "c.jpg")
            station.start()
        first = ["a.jpg", "b.jpg", "c.jpg"]
        wait_for(
            lambda: delivered_at_hub(database) == dict.fromkeys(STATIONS, first),
            what="the first files of every station at the hub",
            timeout=60,
        )

        # The hub goes away; the stations go on delivering, and keep their events.
        hub.kill()
        outage_ends = time.monotonic() + OUTAGE
        for station in stations_:
            station.drop("d.jpg", "e.jpg", "f.jpg")
        wait_for(
            lambda: all(len(s.delivered()) == 6 for s in stations_),
            what="deliveries while the hub is away",
            timeout=OUTAGE,
        )
        time.sleep(max(outage_ends - time.monotonic(), 0.0))
        hub.start()
        every = sorted([*first, "d.jpg", "e.jpg", "f.jpg"])
        wait_for(
            lambda: delivered_at_hub(database) == dict.fromkeys(STATIONS, every),
            what="every event once at the hub after its outage",
            timeout=60,
        )

        # A station killed with events in its outbox sends them after its restart.
        hub.kill()
        crashed = stations_[0]
        crashed.drop("g.jpg", "h.jpg")
        wait_for(lambda: len(crashed.delivered()) == 8, what="two more files delivered")
        outbox = Outbox(crashed.folder / "state", 1000)
        try:
            wait_for(
                lambda: {e["relpath"] for _, _, e in outbox.oldest(100)} >= {"g.jpg", "h.jpg"},
                what="their events in the outbox",
            )
        finally:
            outbox.close()
        crashed.kill()
        hub.start()
        crashed.start()
        wait_for(
            lambda: delivered_at_hub(database)[crashed.name] == sorted([*every, "g.jpg", "h.jpg"]),
            what="the crashed station's events at the hub",
            timeout=60,
        )
        assert delivered_at_hub(database)[stations_[1].name] == every
        for station in stations_:
            station.stop()
        hub.stop()
    finally:
        database.dispose()
