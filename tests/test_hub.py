"""The hub (docs/hub.md), on SQLite and on PostgreSQL: migrations, station tokens, the ingest
contract, where a file is, flights, commands to stations, alerts, the operators' defences.

Each test gets a hub of its own (in this process, on a free loopback port) over a new
database: ``hub_database`` (tests/conftest.py) runs it once on a SQLite file and once on a
database of the session's PostgreSQL server.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import re
import signal
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from click.testing import CliRunner
from helpers import REPO, wait_for

from skyframe.cli import cli
from skyframe.hub import alerts
from skyframe.hub.commands import create_command
from skyframe.hub.config import load_hub_config
from skyframe.hub.db import open_database
from skyframe.hub.ingest import Arrival, parse_batch, store_batches
from skyframe.hub.schema import events, files, metadata, stations
from skyframe.hub.server import HubServer
from skyframe.hub.tokens import add_station, revoke_station, token_hash
from skyframe.hub.writer import IngestWriter

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
OPERATOR_TOKEN = "operator-token-for-tests-0123456789"
SHA_A = "a" * 64
SHA_B = "b" * 64
T0 = 1_764_430_000.0  # 2025-11-29 15:26:40 UTC
DAY = "2025-11-29"


# --- a hub in this process -------------------------------------------------------------------


class Hub:
    """A HubServer on its own event loop thread, with a client for its API."""

    def __init__(self, config_file: Path) -> None:
        self.loaded = load_hub_config(config_file)
        self.engine = open_database(self.loaded.database_url())
        self.server = HubServer(self.loaded, self.engine)
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="test-hub", daemon=True)
        self._ready = threading.Event()
        self._failure: list[BaseException] = []

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            self.url = loop.run_until_complete(self.server.start())
        except BaseException as exc:
            self._failure.append(exc)
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self.server.close())
        loop.run_until_complete(loop.shutdown_default_executor())

    def start(self) -> Hub:
        self._thread.start()
        self._ready.wait(10)
        if self._failure:
            raise self._failure[0]
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()
        self.engine.dispose()

    def add_station(self, name: str) -> str:
        return add_station(self.engine, name)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(self.url + path, data=data, headers=sent, method=method)
        try:
            with OPENER.open(request, timeout=30) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read() or b"null")

    def get(self, path: str, **kwargs: Any) -> Any:
        status, body = self.call("GET", path, **kwargs)
        assert status == 200, (status, body)
        return body

    def ingest(self, token: str, batch: dict[str, Any]) -> tuple[int, Any]:
        return self.call("POST", "/api/v1/ingest", batch, token=token)

    def count(self, table: sa.Table) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(sa.select(sa.func.count()).select_from(table)).scalar())


def announced_only(hub: Hub, token: str, size: int) -> tuple[int, Any]:
    """POST to the ingest headers that announce ``size`` bytes of JSON, none of them sent,
    and read the answer."""
    parts = urllib.parse.urlsplit(hub.url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        connection.putrequest("POST", "/api/v1/ingest")
        connection.putheader("Authorization", f"Bearer {token}")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(size))
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def write_hub_yaml(folder: Path, database: str, extra: str = "") -> Path:
    path = folder / "hub.yaml"
    path.write_text(f"listen: 127.0.0.1:0\ndatabase: {database}\n{extra}", encoding="utf-8")
    return path


@pytest.fixture
def start_hub(tmp_path: Path, hub_database: str) -> Iterator[Any]:
    """start(extra_yaml=""): a hub on the test's database; stopped at the end of the test."""
    started: list[Hub] = []

    def start(extra: str = "") -> Hub:
        hub = Hub(write_hub_yaml(tmp_path, hub_database, extra))
        started.append(hub)
        return hub.start()

    yield start
    for hub in started:
        hub.stop()


@pytest.fixture
def hub(start_hub: Any) -> Hub:
    return start_hub()  # type: ignore[no-any-return]


def test_stopping_the_hub_waits_for_a_query_under_way(hub: Hub) -> None:
    # A request's query on a database thread holds a pooled connection; stopping must let it
    # end and give the connection back before the engine is disposed of (a connection left
    # to the garbage collector is never closed: PostgreSQL's warns as it goes).
    started, ended = threading.Event(), threading.Event()

    def slow_query() -> None:
        with hub.engine.connect():
            started.set()
            time.sleep(1)
        ended.set()

    asyncio.run_coroutine_threadsafe(hub.server._run(slow_query), hub._loop)
    assert started.wait(10)
    hub.stop()
    assert ended.is_set()
    assert hub.engine.pool.checkedout() == 0


def event(
    kind: str = "delivered",
    relpath: str = "f1/DJI_0001.JPG",
    *,
    at: float = T0,
    **fields: Any,
) -> dict[str, Any]:
    """A LifecycleEvent.to_json() as a station sends it."""
    defaults: dict[str, Any] = {"pipeline": "survey"}
    if kind == "delivered":
        defaults.update(sink="s3", remote=f"2025/{relpath}", size=1000)
    return {"kind": kind, "relpath": relpath, "time": at, **defaults, **fields}


def batch(station: str, *items: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An ingest body: the events numbered in order (id e-<seq>)."""
    numbered = [{"id": f"e-{n}", "seq": n, "event": e} for n, e in enumerate(items, 1)]
    return {
        "station": station,
        "sent_at": time.time(),
        "events": numbered,
        "status": None,
        "acks": [],
        **extra,
    }


def status(*, dead: int = 0, health: str = "ok") -> dict[str, Any]:
    """A station daemon's GET /api/status, cut down."""
    return {
        "version": "0.9.0",
        "paused": False,
        "pipelines": [
            {
                "name": "survey",
                "paused": False,
                "queue": {"pending": 3, "leased": 1, "waiting": 0, "dead": dead},
                "sinks": [{"key": "s3", "display": "s3://b/x", "health": health}],
            }
        ],
        "throughput": {"bytes_per_s": 2_000_000.0, "files_per_s": 1.5},
        "totals": {"delivered": 10},
        "errors": [],
    }


# --- migrations and tokens --------------------------------------------------------------------


def test_migrations_run_on_start_and_again(hub_database: str) -> None:
    for _ in range(2):  # the second start finds the schema at its newest: nothing to do
        engine = open_database(hub_database)
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT version_num FROM alembic_version")).all() == [
                ("0001",)
            ]
            # The migrations build exactly the tables the code uses.
            assert compare_metadata(MigrationContext.configure(connection), metadata) == []
        engine.dispose()


def test_concurrent_starts_migrate_once(hub_database: str) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            open_database(hub_database).dispose()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors


def test_a_start_waits_for_another_hub_that_writes_a_new_sqlite_file(tmp_path: Path) -> None:
    # Another hub's migrations hold the write lock of a file that is not yet in WAL mode:
    # SQLite refuses the switch at once, without its busy handler. The start waits instead.
    path = tmp_path / "hub.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE being_migrated (x)")
    release = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    release.start()
    try:
        began = time.monotonic()
        engine = open_database(f"sqlite:///{path}")
        assert time.monotonic() - began >= 0.4
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        engine.dispose()
    finally:
        release.join()
        other.close()


def test_token_add_list_revoke_through_the_cli(tmp_path: Path, hub_database: str) -> None:
    config = write_hub_yaml(tmp_path, hub_database)
    runner = CliRunner()
    added = runner.invoke(cli, ["hub", "token", "add", "field-laptop-3", "-c", str(config)])
    assert added.exit_code == 0, added.output
    lines = added.output.splitlines()
    token = lines[-1]
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token), lines  # 32 random bytes, alone
    assert sum(token in line for line in lines) == 1  # printed once

    engine = open_database(hub_database)
    with engine.connect() as connection:
        rows = connection.execute(sa.select(stations.c.name, stations.c.token_hash)).all()
    engine.dispose()
    assert rows == [("field-laptop-3", hashlib.sha256(token.encode()).hexdigest())]

    again = runner.invoke(cli, ["hub", "token", "add", "field-laptop-3", "-c", str(config)])
    assert again.exit_code == 1
    assert "already has a token" in again.output
    assert token not in again.output

    listed = runner.invoke(cli, ["hub", "token", "list", "-c", str(config)])
    assert listed.exit_code == 0, listed.output
    assert "field-laptop-3" in listed.output
    assert "last seen never" in listed.output
    assert "active" in listed.output
    assert token not in listed.output
    assert token_hash(token) not in listed.output

    revoked = runner.invoke(cli, ["hub", "token", "revoke", "field-laptop-3", "-c", str(config)])
    assert revoked.exit_code == 0, revoked.output
    listed = runner.invoke(cli, ["hub", "token", "list", "-c", str(config)])
    assert "revoked" in listed.output

    unknown = runner.invoke(cli, ["hub", "token", "revoke", "nobody", "-c", str(config)])
    assert unknown.exit_code == 1
    assert "no station named 'nobody'" in unknown.output

    bad = runner.invoke(cli, ["hub", "token", "add", "../x", "-c", str(config)])
    assert bad.exit_code == 1
    assert "invalid station name" in bad.output

    # A revoked station can be given a new token; the old one stays refused.
    renewed = runner.invoke(cli, ["hub", "token", "add", "field-laptop-3", "-c", str(config)])
    assert renewed.exit_code == 0
    assert renewed.output.splitlines()[-1] != token


def test_a_revoked_token_is_refused(hub: Hub) -> None:
    token = hub.add_station("field-1")
    assert hub.ingest(token, batch("field-1"))[0] == 200
    runner = CliRunner()
    result = runner.invoke(
        cli,
        ["hub", "token", "revoke", "field-1", "-c", str(hub.loaded.file)],
    )
    assert result.exit_code == 0, result.output
    assert hub.ingest(token, batch("field-1")) == (
        401,
        {"error": "unknown or revoked station token"},
    )


# --- ingest -----------------------------------------------------------------------------------


def test_ingest_is_idempotent(hub: Hub) -> None:
    token = hub.add_station("field-1")
    body = batch(
        "field-1",
        event("queued", "f1/DJI_0001.JPG"),
        event("delivered", "f1/DJI_0001.JPG", sha256=SHA_A),
        event("delivered", "f1/DJI_0002.JPG", at=T0 + 1),
        status=status(),
    )
    assert hub.ingest(token, body) == (200, {"accepted": 3, "duplicates": 0, "commands": []})
    assert hub.ingest(token, body) == (200, {"accepted": 0, "duplicates": 3, "commands": []})
    assert hub.count(events) == 3
    assert hub.count(files) == 2
    # A batch of new and old events: only the new ones count.
    body["events"].append({"id": "e-4", "seq": 4, "event": event("failed", "f1/x.JPG")})
    assert hub.ingest(token, body)[1] == {"accepted": 1, "duplicates": 3, "commands": []}
    assert hub.count(events) == 4

    station = hub.get("/api/stations")["stations"][0]
    assert station["name"] == "field-1"
    assert station["online"] is True
    assert station["state"] == "online"
    assert station["queue"] == {"pending": 3, "leased": 1, "waiting": 0, "dead": 0}
    assert station["pipelines"][0]["name"] == "survey"
    assert station["throughput"]["bytes_per_s"] == 2_000_000.0


def test_ingest_refusals(hub: Hub) -> None:
    token = hub.add_station("field-1")
    hub.add_station("field-2")
    assert hub.ingest("not-a-token", batch("field-1"))[0] == 401
    status_code, body = hub.call("POST", "/api/v1/ingest", batch("field-1"))
    assert status_code == 401
    assert "Authorization: Bearer" in body["error"]
    # The token is field-1's: it may not speak for field-2.
    status_code, body = hub.ingest(token, batch("field-2"))
    assert status_code == 403
    assert "another station" in body["error"]
    # 1 MiB at most: refused on its Content-Length, before it is sent (a client that went
    # on sending would meet a closed connection; this one waits for the answer).
    assert announced_only(hub, token, 1024 * 1024 + 1) == (
        413,
        {"error": "the body is larger than 1024 KiB"},
    )
    # Invalid: one line saying where.
    missing = batch("field-1", {"kind": "delivered", "relpath": "a", "time": T0})
    status_code, body = hub.ingest(token, missing)
    assert status_code == 422
    assert body["error"] == "events[0].event.pipeline: Field required"
    assert "\n" not in body["error"]
    too_many = batch("field-1", *[event(relpath=f"{n}.jpg") for n in range(1001)])
    status_code, body = hub.ingest(token, too_many)
    assert status_code == 422
    assert body["error"].startswith("events: List should have at most 1000 items")
    status_code, body = hub.call("POST", "/api/v1/ingest", token=token, data=b"{nope")
    assert status_code == 422
    assert body["error"].startswith("the body is not valid JSON")
    long_id = batch("field-1", event())
    long_id["events"][0]["id"] = "i" * 65
    assert hub.ingest(token, long_id)[0] == 422
    assert hub.count(events) == 0


def test_ingest_takes_what_a_database_column_cannot_hold_without_it(hub: Hub) -> None:
    # A station retries a refused batch until it is taken: what only meta or status holds
    # goes in as well as the hub can store it, never failing the batch.
    token = hub.add_station("field-1")
    beyond = 2**70
    surrogate = "\udce9"  # a byte of a name that is not UTF-8, as Python decodes it
    group = {"name": "flight", "key": "f1"}
    odd_group = {"name": "flight", "key": f"caf{surrogate}"}
    heartbeat = {"pipeline": "survey", "name": "flight", "key": "f9", "files": 1, "seen": 2}
    body = batch(
        "field-1",
        event(relpath="f1/a.jpg", meta={"group": group, "note": surrogate, "sha256": "x" * 64}),
        event("flight-complete", "f1", meta={"files": beyond, "bytes": -1}),
        event(relpath="f2/b.jpg", at=T0 + 1, meta={"group": odd_group}),
        status={
            **status(dead=beyond),
            "groups": [{**heartbeat, "last_arrival": 10**400}],
            "errors": [{"message": surrogate}],
        },
    )
    today = time.strftime("%Y-%m-%d", time.gmtime())  # an arrival time no float holds: now
    assert hub.ingest(token, body) == (200, {"accepted": 3, "duplicates": 0, "commands": []})
    flights_now = {f["name"]: f for f in hub.get(f"/api/flights?day={DAY}")["flights"]}
    complete = flights_now["f1"]
    # The counts no column holds are left out: the files that arrived count instead.
    assert (complete["complete"], complete["files_seen"], complete["bytes"]) == (True, 1, 1000)
    assert flights_now["caf\\udce9"]["files_delivered"] == 1
    [heard] = hub.get(f"/api/flights?day={today}")["flights"]
    assert (heard["name"], heard["files_delivered"], heard["files_seen"]) == ("f9", 1, 2)
    [station] = hub.get("/api/stations")["stations"]
    assert station["dead_letters"] == 0
    assert station["errors"] == [{"message": "\\udce9"}]
    [found] = hub.get("/api/files?name=a.jpg")["files"]
    assert found["sha256"] is None  # "x" * 64 is no digest


def test_ingest_refuses_what_no_json_reader_takes(hub: Hub) -> None:
    token = hub.add_station("field-1")
    status_code, answer = hub.ingest(token, batch("field-1", event(size=2**70)))
    assert status_code == 422
    assert answer["error"].startswith("events[0].event.size: Input should be less than or equal")
    # NaN and Infinity: Python writes them, JSON has no such numbers.
    for constant in ("NaN", "Infinity", "-Infinity"):
        raw = json.dumps(batch("field-1", event(at=0.125))).replace(": 0.125", f": {constant}")
        status_code, answer = hub.call("POST", "/api/v1/ingest", token=token, data=raw.encode())
        assert status_code == 422
        assert answer["error"] == f"the body is not valid JSON: {constant} is not a JSON number"
    digits = json.dumps(batch("field-1", event())).replace('"seq": 1', '"seq": ' + "9" * 5000)
    status_code, answer = hub.call("POST", "/api/v1/ingest", token=token, data=digits.encode())
    assert (status_code, answer) == (
        422,
        {"error": "the body is not valid JSON: a number with too many digits"},
    )
    assert hub.count(events) == 0


def test_a_status_of_another_shape_is_stored_and_shown_without_its_odd_parts(hub: Hub) -> None:
    token = hub.add_station("field-1")
    odd = [
        {"pipelines": 5},
        {"pipelines": [{"name": "survey", "sinks": 5, "queue": 5}], "errors": 5},
        {"errors": {"a": 1}, "totals": [1], "throughput": "fast"},
    ]
    for shape in odd:
        assert hub.ingest(token, batch("field-1", status=shape))[0] == 200, shape
        [station] = hub.get("/api/stations")["stations"]
        assert station["errors"] == []
        assert station["queue"] == {"pending": 0, "leased": 0, "waiting": 0, "dead": 0}
        assert isinstance(station["totals"], dict)
        assert isinstance(station["throughput"], dict)
        assert all(p["sinks"] == [] for p in station["pipelines"])


def test_a_pipeline_name_no_column_holds_is_refused(hub: Hub) -> None:
    hub.add_station("field-1")
    for name in ("\ud800", "p" * 201, "", 5):
        status_code, body = hub.call("POST", "/api/stations/field-1/pause", {"pipeline": name})
        assert status_code == 400, name
        assert body["error"] == "pipeline must be a pipeline's name (1 to 200 characters)"
    assert hub.call("POST", "/api/stations/field-1/pause", {"pipeline": "p" * 200})[0] == 201


def test_a_static_path_the_file_system_refuses_is_not_found(hub: Hub) -> None:
    for path in ("/static/" + "a" * 300, "/static/" + "a/" * 2100 + "x"):
        assert hub.call("GET", path) == (404, {"error": "Not Found"})


# --- where is this file, flights, events ------------------------------------------------------


def test_files_by_name_and_sha256(hub: Hub) -> None:
    one, two = hub.add_station("field-1"), hub.add_station("field-2")
    hub.ingest(
        one,
        batch(
            "field-1",
            event(relpath="f1/DJI_0001.JPG", sha256=SHA_A),
            event(relpath="f1/DJI_0001.JPG", sink="gcs", remote="g/DJI_0001.JPG", sha256=SHA_A),
            event(relpath="f1/DJI_0002.JPG", meta={"sha256": SHA_B}),
            event(relpath="f1/100%_done.txt"),
        ),
    )
    hub.ingest(two, batch("field-2", event(relpath="other/DJI_0001.JPG", at=T0 + 60)))

    found = hub.get("/api/files?name=dji_0001.jpg")["files"]
    assert [(f["station"], f["sink"]) for f in found] == [
        ("field-2", "s3"),
        ("field-1", "gcs"),  # delivered at the same moment: by sink
        ("field-1", "s3"),
    ]
    assert found[2] == {
        "station": "field-1",
        "pipeline": "survey",
        "relpath": "f1/DJI_0001.JPG",
        "name": "DJI_0001.JPG",
        "sink": "s3",
        "remote": "2025/f1/DJI_0001.JPG",
        "delivered_at": T0,
        "size": 1000,
        "sha256": SHA_A,
    }
    assert len(hub.get("/api/files?name=DJI_*.JPG")["files"]) == 4
    assert len(hub.get("/api/files?name=DJI_000%3F.JPG")["files"]) == 4
    assert len(hub.get("/api/files?name=f1/*")["files"]) == 4
    assert hub.get("/api/files?name=100%25_done.txt")["files"][0]["relpath"] == "f1/100%_done.txt"
    assert hub.get("/api/files?name=100%25*")["files"][0]["relpath"] == "f1/100%_done.txt"
    assert hub.get("/api/files?name=1000_done.txt")["files"] == []  # _ and % are not wildcards
    by_sha = hub.get(f"/api/files?sha256={SHA_B.upper()}")["files"]
    assert [f["relpath"] for f in by_sha] == ["f1/DJI_0002.JPG"]
    assert len(hub.get(f"/api/files?sha256={SHA_A}")["files"]) == 2

    # A newer delivery replaces the row; an older one arriving late does not; a deletion of
    # the remote copy removes it.
    hub.ingest(
        one,
        {
            **batch("field-1"),
            "events": [
                {"id": "n1", "seq": 10, "event": event(relpath="f1/DJI_0002.JPG", at=T0 + 5,
                                                       remote="new/DJI_0002.JPG")},
                {"id": "n2", "seq": 11, "event": event(relpath="f1/DJI_0001.JPG", at=T0 - 5,
                                                       remote="old/DJI_0001.JPG")},
                {"id": "n3", "seq": 12, "event": event("deleted", "f1/DJI_0001.JPG", sink="gcs",
                                                       at=T0 + 6)},
            ],
        },
    )  # fmt: skip
    assert [f["remote"] for f in hub.get("/api/files?name=DJI_0002.JPG")["files"]] == [
        "new/DJI_0002.JPG"
    ]
    assert [(f["station"], f["sink"], f["remote"]) for f in hub.get(
        "/api/files?name=DJI_0001.JPG")["files"]] == [
        ("field-2", "s3", "2025/other/DJI_0001.JPG"),
        ("field-1", "s3", "2025/f1/DJI_0001.JPG"),
    ]  # fmt: skip

    assert hub.call("GET", "/api/files")[0] == 400
    assert hub.call("GET", "/api/files?sha256=abc")[0] == 400


def test_flights_from_events(hub: Hub) -> None:
    token = hub.add_station("field-1")
    group = {"group": {"name": "flight", "key": "2025-11-29/f1"}}
    hub.ingest(
        token,
        batch(
            "field-1",
            event(relpath="f1/a.JPG", size=100, meta=group),
            event(relpath="f1/a.JPG", size=100, sink="gcs", meta=group),  # a second sink
            event(relpath="f1/b.JPG", size=200, at=T0 + 30, meta=group),
            event(relpath="f2/c.JPG", size=50, at=T0 + 40,
                  meta={"group": {"name": "flight", "key": "2025-11-29/f2"}}),
        ),
    )  # fmt: skip
    flights = {f["name"]: f for f in hub.get(f"/api/flights?day={DAY}")["flights"]}
    assert flights["2025-11-29/f1"] == {
        "station": "field-1",
        "pipeline": "survey",
        "group": "flight",
        "name": "2025-11-29/f1",
        "folder": None,
        "files_delivered": 2,
        "files_seen": 2,
        "bytes": 300,
        "complete": False,
        "first_seen": T0,
        "last_seen": T0 + 30,
        "completed_at": None,
    }
    # The station's flight-complete event: 3 files in all (one not delivered yet).
    complete = event(
        "flight-complete",
        "2025-11-29/f1",
        at=T0 + 700,
        remote="2025-11-29/f1",
        size=350,
        meta={"files": 3, "bytes": 350, "with_position": 3, "reports": 1, "added": []},
    )
    hub.ingest(token, {**batch("field-1"), "events": [{"id": "c1", "seq": 9, "event": complete}]})
    flights = {f["name"]: f for f in hub.get(f"/api/flights?day={DAY}")["flights"]}
    f1 = flights["2025-11-29/f1"]
    assert (f1["files_delivered"], f1["files_seen"], f1["bytes"]) == (2, 3, 350)
    assert f1["complete"] is True
    assert f1["completed_at"] == T0 + 700
    assert f1["folder"] == "2025-11-29/f1"
    assert flights["2025-11-29/f2"]["complete"] is False
    assert list(flights) == ["2025-11-29/f1", "2025-11-29/f2"]  # latest activity first
    assert hub.get("/api/flights?day=2025-11-28")["flights"] == []
    assert hub.call("GET", "/api/flights?day=yesterday")[0] == 400


def test_flights_in_progress_from_the_stations_heartbeat(hub: Hub) -> None:
    # A station's heartbeat carries its latest groups (skyframe.hublink): their progress
    # shows before the flight is complete, whatever its files' events say.
    token = hub.add_station("field-1")
    group = {"pipeline": "survey", "name": "flight", "key": "f7", "state": "open"}
    status = {"pipelines": [], "groups": [{**group, "files": 3, "seen": 5, "last_arrival": T0}]}
    assert hub.ingest(token, batch("field-1", status=status))[0] == 200
    (flight,) = hub.get(f"/api/flights?day={DAY}")["flights"]
    assert (flight["station"], flight["group"], flight["name"]) == ("field-1", "flight", "f7")
    assert (flight["files_delivered"], flight["files_seen"], flight["complete"]) == (3, 5, False)
    later = {**status, "groups": [{**group, "files": 5, "seen": 5, "last_arrival": T0 + 60}]}
    hub.ingest(token, batch("field-1", status=later))
    (flight,) = hub.get(f"/api/flights?day={DAY}")["flights"]
    assert (flight["files_delivered"], flight["files_seen"]) == (5, 5)
    assert flight["last_seen"] == T0 + 60
    for odd in ({"files": "many"}, {"files": True}, {"files": 2**70}, {"key": "k" * 5000}):
        broken = {"groups": [{**group, "key": "x", "files": 1, "seen": 1, **odd}]}
        # Skipped, not stored, and the batch goes through (it would fail again at every try).
        assert hub.ingest(token, batch("field-1", status=broken))[0] == 200
    assert len(hub.get(f"/api/flights?day={DAY}")["flights"]) == 1


def test_events_are_paged(hub: Hub) -> None:
    token = hub.add_station("field-1")
    hub.add_station("field-2")
    hub.ingest(token, batch("field-1", *[event(relpath=f"{n}.jpg", at=T0 + n) for n in range(5)]))
    page = hub.get("/api/events?station=field-1&limit=2")
    assert [e["id"] for e in page["events"]] == ["e-1", "e-2"]
    assert page["events"][0]["event"]["relpath"] == "0.jpg"
    page = hub.get(f"/api/events?station=field-1&limit=2&after={page['next']}")
    assert [e["id"] for e in page["events"]] == ["e-3", "e-4"]
    page = hub.get(f"/api/events?station=field-1&limit=2&after={page['next']}")
    assert [e["id"] for e in page["events"]] == ["e-5"]
    assert page["next"] is None
    assert hub.get("/api/events?station=field-2")["events"] == []
    assert len(hub.get("/api/events?since=2025-11-29T15%3A26%3A42%2B00%3A00")["events"]) == 3
    assert hub.call("GET", "/api/events?since=soon")[0] == 400
    assert hub.call("GET", "/api/events?limit=0")[0] == 400
    assert hub.get(f"/api/events?after={2**62}")["events"] == []  # the largest, 19 digits
    assert hub.call("GET", f"/api/events?after={2**62 + 1}")[0] == 400


# --- commands ---------------------------------------------------------------------------------


def test_commands_round_trip(hub: Hub) -> None:
    token = hub.add_station("field-1")
    status_code, created = hub.call("POST", "/api/stations/field-1/pause", {"pipeline": "survey"})
    assert status_code == 201, created
    command_id = created["id"]
    listed = hub.get("/api/commands?station=field-1")["commands"]
    assert [(c["id"], c["state"]) for c in listed] == [(command_id, "pending")]

    wanted = [{"id": command_id, "action": "pause", "pipeline": "survey"}]
    assert hub.ingest(token, batch("field-1"))[1]["commands"] == wanted
    assert hub.get("/api/commands")["commands"][0]["state"] == "sent"
    # Not acknowledged yet: handed out again.
    assert hub.ingest(token, batch("field-1"))[1]["commands"] == wanted

    ack = {"id": command_id, "ok": True, "detail": "survey paused"}
    reply = hub.ingest(token, batch("field-1", acks=[ack]))[1]
    assert reply["commands"] == []
    done = hub.get("/api/commands?station=field-1")["commands"][0]
    assert (done["state"], done["ok"], done["detail"]) == ("confirmed", True, "survey paused")
    assert done["confirmed_at"] >= done["sent_at"] >= done["created_at"]

    # A whole-station resume; another station cannot acknowledge it.
    other = hub.add_station("field-2")
    resume_id = hub.call("POST", "/api/stations/field-1/resume", {})[1]["id"]
    hub.ingest(other, batch("field-2", acks=[{"id": resume_id, "ok": True}]))
    assert hub.ingest(token, batch("field-1"))[1]["commands"] == [
        {"id": resume_id, "action": "resume", "pipeline": None}
    ]
    assert hub.call("POST", "/api/stations/nobody/pause", {})[0] == 404
    assert hub.call("POST", "/api/stations/field-1/pause", {"pipeline": 3})[0] == 400


# --- group commit: the batches waiting together, in one transaction -------------------------


def test_batches_of_several_stations_stored_in_one_transaction(hub: Hub) -> None:
    one, two, gone = (hub.add_station(name) for name in ("field-1", "field-2", "field-3"))
    revoke_station(hub.engine, "field-3")
    command = create_command(hub.engine, "field-2", "pause")
    group = {"name": "flight", "key": "2025-11-29/f1"}
    first = batch(
        "field-1",
        event(relpath="f1/A.JPG", meta={"group": group}),
        event(relpath="f1/B.JPG", at=T0 + 1, meta={"group": group}),
    )
    # field-1 again before its first answer came: e-2 again (a duplicate) and a new e-3
    again = batch("field-1")
    again["events"] = [
        first["events"][1],
        {
            "id": "e-3",
            "seq": 3,
            "event": event(relpath="f1/C.JPG", at=T0 + 2, meta={"group": group}),
        },
    ]
    # the same ids at another station are other events; one batch may carry an id twice
    other = batch("field-2", event(relpath="x/A.JPG"), status=status(dead=2))
    other["events"].append(other["events"][0])
    arrivals = [
        Arrival(station_id(hub, "field-1"), token_hash(one), parse_batch(first)),
        Arrival(station_id(hub, "field-2"), token_hash(two), parse_batch(other)),
        Arrival(station_id(hub, "field-1"), token_hash(one), parse_batch(again)),
        Arrival(
            station_id(hub, "field-3"), token_hash(gone), parse_batch(batch("field-3", event()))
        ),
    ]
    with hub.engine.begin() as connection:
        results = store_batches(connection, arrivals, now=T0 + 10)
    wanted = [{"id": command["id"], "action": "pause", "pipeline": None}]
    assert [r.to_json() if r else None for r in results] == [
        {"accepted": 2, "duplicates": 0, "commands": []},
        {"accepted": 1, "duplicates": 1, "commands": wanted},
        {"accepted": 1, "duplicates": 1, "commands": []},
        None,  # its token was revoked: nothing of it is stored
    ]
    assert hub.count(events) == 4
    assert hub.count(files) == 4
    flight = hub.get(f"/api/flights?day={DAY}")["flights"]
    assert [(f["station"], f["files_delivered"]) for f in flight] == [("field-1", 3)]
    stations_now = {s["name"]: s for s in hub.get("/api/stations")["stations"]}
    assert stations_now["field-2"]["queue"]["dead"] == 2
    with hub.engine.connect() as connection:
        seqs = dict(connection.execute(sa.select(stations.c.name, stations.c.last_seq)).all())
    assert seqs == {"field-1": 3, "field-2": 1, "field-3": None}


class Gate:
    """Runs the writer's transactions on a thread; the first waits until it is opened."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.calls = 0

    async def run(self, func: Any) -> Any:
        self.calls += 1
        first = self.calls == 1

        def gated() -> Any:
            if first:
                self.entered.set()
                assert self.opened.wait(30)
            return func()

        return await asyncio.get_running_loop().run_in_executor(None, gated)


def while_the_first_is_stored(hub: Hub, arrivals: list[Arrival]) -> tuple[list[Any], IngestWriter]:
    """The first arrival is stored by a writer of one transaction at a time, held open until
    the others have come; each one's result (or error), and the writer."""
    gate = Gate()
    writer = IngestWriter(hub.engine, gate.run, writers=1)

    async def scenario() -> list[Any]:
        head = asyncio.ensure_future(writer.store(arrivals[0]))
        while not gate.entered.is_set():
            await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(writer.store(a)) for a in arrivals[1:]]
        await asyncio.sleep(0.05)
        gate.opened.set()
        return await asyncio.gather(head, *rest, return_exceptions=True)

    return asyncio.run(scenario()), writer


def test_requests_arriving_during_a_transaction_share_the_next(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = [hub.add_station(f"field-{n}") for n in range(11)]
    arrivals = [
        Arrival(
            station_id(hub, f"field-{n}"),
            token_hash(token),
            parse_batch(batch(f"field-{n}", event(relpath=f"f/{n}.JPG"))),
        )
        for n, token in enumerate(tokens)
    ]
    results, writer = while_the_first_is_stored(hub, arrivals)
    assert [r.accepted for r in results] == [1] * 11
    assert (writer.groups, writer.batches) == (2, 11)  # the ten that waited: one transaction
    assert hub.count(events) == 11

    # A group the database refuses is stored batch by batch: only the guilty one fails.
    def refuse_field_3(connection: sa.Connection, group: list[Arrival]) -> Any:
        if any(a.batch.station == "field-3" for a in group):
            raise sa.exc.OperationalError("INSERT", {}, Exception("refused for the test"))
        return store_batches(connection, group)

    monkeypatch.setattr("skyframe.hub.writer.store_batches", refuse_field_3)
    later = []
    for a in arrivals[:5]:
        body = batch(a.batch.station, event(relpath="g.JPG"))
        body["events"][0]["id"] = "g-1"
        later.append(Arrival(a.station_id, a.token_hash, parse_batch(body)))
    outcomes, _ = while_the_first_is_stored(hub, later)
    assert isinstance(outcomes[3], sa.exc.OperationalError)
    assert [o.accepted for n, o in enumerate(outcomes) if n != 3] == [1, 1, 1, 1]
    assert hub.count(events) == 15

    # The same for a fault of another kind (a value the driver cannot convert, say).
    def overflow_at_field_2(connection: sa.Connection, group: list[Arrival]) -> Any:
        if any(a.batch.station == "field-2" for a in group):
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return store_batches(connection, group)

    monkeypatch.setattr("skyframe.hub.writer.store_batches", overflow_at_field_2)
    for later_one in later:
        later_one.batch.events[0].id = "h-1"
    outcomes, _ = while_the_first_is_stored(hub, later)
    assert isinstance(outcomes[2], OverflowError)
    assert [o.accepted for n, o in enumerate(outcomes) if n != 2] == [1, 1, 1, 1]
    assert hub.count(events) == 19


def station_id(hub: Hub, name: str) -> int:
    with hub.engine.connect() as connection:
        return int(
            connection.execute(sa.select(stations.c.id).where(stations.c.name == name)).scalar_one()
        )


# --- alerts -----------------------------------------------------------------------------------


class WebhookReceiver:
    """A webhook endpoint on loopback that records every JSON body POSTed to it."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


def test_a_silent_station_fires_once(start_hub: Any, webhook: WebhookReceiver) -> None:
    # 3 s, not less: the cleared alert must be seen before the station is silent again, on
    # a machine whose checks may run late.
    hub = start_hub(
        f"alerts:\n  webhook: {webhook.url}\n  silent_after: 3s\n  check_every: 100ms\n"
    )
    token = hub.add_station("field-1")
    hub.ingest(token, batch("field-1", status=status()))
    assert hub.get("/api/stations")["stations"][0]["online"] is True
    wait_for(lambda: webhook.received, what="the silent alert", timeout=15)
    time.sleep(0.5)  # five more looks: still one alert
    assert len(webhook.received) == 1
    sent = webhook.received[0]
    assert (sent["alert"], sent["state"], sent["station"]) == ("silent", "fired", "field-1")
    station = hub.get("/api/stations")["stations"][0]
    assert (station["online"], station["state"]) == (False, "silent")
    shown = hub.get("/api/alerts")["alerts"]
    assert [(a["kind"], a["open"]) for a in shown] == [("silent", True)]
    # It reports again: the alert clears, once.
    hub.ingest(token, batch("field-1"))
    wait_for(lambda: len(webhook.received) == 2, what="the cleared alert", timeout=15)
    assert webhook.received[1]["state"] == "cleared"


def test_only_one_hub_fires_each_alert(hub: Hub) -> None:
    token = hub.add_station("field-1")
    hub.ingest(token, batch("field-1", status=status(dead=2, health="offline")))
    config = hub.loaded.config.alerts.model_copy(update={"sink_offline_after": 60.0})
    second = open_database(hub.loaded.database_url())  # another hub on the same database
    try:
        later = time.time() + 3600
        results: list[list[alerts.Change]] = []
        barrier = threading.Barrier(2)

        def look(engine: sa.Engine) -> None:
            barrier.wait()
            results.append(alerts.evaluate(engine, config, later))

        threads = [threading.Thread(target=look, args=(e,)) for e in (hub.engine, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        fired = sorted((c.kind, c.subject) for changes in results for c in changes)
        assert fired == [("dead-letters", ""), ("silent", ""), ("sink-offline", "survey/s3")]
        assert alerts.evaluate(second, config, later + 1) == []
    finally:
        second.dispose()


# --- the operators' defences ------------------------------------------------------------------


def test_operator_token_and_origin(start_hub: Any) -> None:
    hub = start_hub(f"operators:\n  token: {OPERATOR_TOKEN}\n")
    token = hub.add_station("field-1")
    assert hub.call("GET", "/api/stations")[0] == 401
    assert hub.call("GET", "/api/stations", token="wrong")[0] == 401
    assert hub.call("GET", "/api/stations", token=OPERATOR_TOKEN)[0] == 200
    assert hub.call("GET", "/healthz")[0] == 200
    # Stations use their own tokens, not the operators'.
    assert hub.ingest(token, batch("field-1"))[0] == 200
    assert hub.ingest(OPERATOR_TOKEN, batch("field-1"))[0] == 401
    # The page's sign-in: a cookie derived from the token.
    request = urllib.request.Request(
        hub.url + "/api/login",
        data=json.dumps({"token": OPERATOR_TOKEN}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with OPENER.open(request, timeout=10) as response:
        cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert OPERATOR_TOKEN not in cookie
    session = cookie.split(";", 1)[0]
    assert hub.call("GET", "/api/stations", headers={"Cookie": session})[0] == 200
    # A page of another site cannot post, even with the cookie.
    status_code, body = hub.call(
        "POST",
        "/api/stations/field-1/pause",
        {},
        headers={"Cookie": session, "Origin": "https://evil.example"},
    )
    assert status_code == 403
    assert "cross-site" in body["error"]
    assert hub.call("POST", "/api/stations/field-1/pause", {}, headers={
        "Cookie": session, "Content-Type": "text/plain"})[0] == 415  # fmt: skip


def test_without_a_token_only_loopback_names_are_served(hub: Hub) -> None:
    status_code, body = hub.call("GET", "/api/stations", headers={"Host": "evil.example:8740"})
    assert status_code == 403
    assert "unexpected Host" in body["error"]
    assert hub.call("GET", "/api/stations", headers={"Host": "localhost:8740"})[0] == 200
    # Stations reach the hub by whatever name: ingest is authenticated by their tokens.
    token = hub.add_station("field-1")
    status_code, _ = hub.call(
        "POST", "/api/v1/ingest", batch("field-1"), token=token, headers={"Host": "hub.example"}
    )
    assert status_code == 200


# --- the command line -------------------------------------------------------------------------


def test_listening_off_loopback_needs_the_operator_token(tmp_path: Path, hub_database: str) -> None:
    config = write_hub_yaml(tmp_path, hub_database)
    runner = CliRunner()
    result = runner.invoke(cli, ["hub", str(config), "--listen", "0.0.0.0:0"])
    assert result.exit_code == 2
    assert result.output.startswith("skyframe: error: ")
    assert "not loopback) needs the operators' token" in result.output
    assert len(result.output.strip().splitlines()) == 1

    config.write_text(
        f"listen: 0.0.0.0:0\ndatabase: {hub_database}\noperators:\n  token: ${{HUB_TOKEN}}\n"
    )
    result = runner.invoke(cli, ["hub", str(config)], env={"HUB_TOKEN": "short-secret"})
    assert result.exit_code == 2
    assert "hub.yaml:4:3: operators.token: " in result.output
    assert "at least 16 characters" in result.output
    assert "short-secret" not in result.output


def test_config_errors_name_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "hub.yaml"
    config.write_text("listen: 127.0.0.1:0\nalerts:\n  silent_after: soon\n  webhok: x\n")
    result = CliRunner().invoke(cli, ["hub", "token", "list", "-c", str(config)])
    assert result.exit_code == 2
    lines = result.output.splitlines()
    assert lines[0].startswith("skyframe: error: ")
    assert "hub.yaml:3:3: alerts.silent_after: " in lines[0]
    assert "hub.yaml:4:3: alerts.webhok: unknown key 'webhok'" in lines[1]
    config.write_text("database: mysql://u:pw@db/hub\n")
    result = CliRunner().invoke(cli, ["hub", "token", "list", "-c", str(config)])
    assert result.exit_code == 2
    assert "mysql is not supported" in result.output
    assert "pw" not in result.output


@pytest.mark.slow
def test_skyframe_hub_runs_until_sigterm(tmp_path: Path, hub_database: str) -> None:
    config = write_hub_yaml(tmp_path, hub_database)
    log = tmp_path / "hub.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "skyframe", "hub", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        wait_for(lambda: "hub: http://" in log.read_text(), what="the hub's address", timeout=30)
        url = re.search(r"hub: (http://127\.0\.0\.1:\d+)/", log.read_text())
        assert url, log.read_text()
        with OPENER.open(url[1] + "/healthz", timeout=10) as response:
            assert json.load(response) == {"status": "ok"}
        assert "database" in log.read_text()
    finally:
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(20) == 0, log.read_text()


def test_every_hub_config_key_is_documented() -> None:
    from skyframe.hub.config import AlertsConfig, HubConfig, OperatorsConfig, TlsConfig

    text = (REPO / "docs" / "hub.md").read_text(encoding="utf-8")
    for model in (HubConfig, OperatorsConfig, AlertsConfig, TlsConfig):
        for key in model.model_fields:
            assert f"`{key}`" in text, f"docs/hub.md does not mention `{key}`"


def test_tls_serves_https(tmp_path: Path, start_hub: Any) -> None:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(tmp_path / "hub.key"), "-out", str(tmp_path / "hub.crt")],
        check=True,
        capture_output=True,
    )  # fmt: skip
    hub = start_hub("tls:\n  cert: hub.crt\n  key: hub.key\n")
    assert hub.url.startswith("https://127.0.0.1:")
    context = ssl.create_default_context(cafile=str(tmp_path / "hub.crt"))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    with opener.open(hub.url + "/healthz", timeout=10) as response:
        assert json.load(response) == {"status": "ok"}


def test_the_hubs_answers_carry_the_security_headers(hub: Hub) -> None:
    with OPENER.open(hub.url + "/api/stations", timeout=10) as response:
        headers = response.headers
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "no-referrer"


# --- a station's events the hub refuses --------------------------------------------------------


def station_link(hub: Hub, folder: Path, **extra: Any) -> Any:
    from skyframe.config import HubLinkConfig
    from skyframe.hublink import HubLink

    token = hub.add_station("laptop-9")
    config = HubLinkConfig(url=hub.url, token=token, station="laptop-9", interval=0.2, **extra)
    folder.mkdir()
    return HubLink(config, folder)


def stored_relpaths(hub: Hub) -> list[str]:
    with hub.engine.connect() as connection:
        rows = connection.execute(sa.select(events.c.relpath).order_by(events.c.id)).all()
    return [row[0] for row in rows]


def test_an_event_the_hub_refuses_is_set_aside_and_the_rest_go_on(
    hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Sent again as it was, the batch would be refused forever, and every later event would
    # wait behind it. The hub says which event it refuses; the station sets it aside alone.
    from skyframe.events import LifecycleEvent

    link = station_link(hub, tmp_path / "station")
    link.skyframe_event(LifecycleEvent("delivered", "survey", "a.jpg", sink="s3://b", size=1))
    link.skyframe_event(LifecycleEvent("rejected", "survey", "b.jpg", reason="x" * 5000))
    link.skyframe_event(LifecycleEvent("delivered", "survey", "c.jpg", sink="s3://b", size=3))
    link.start()
    try:
        wait_for(lambda: link.pending == 0, timeout=15, what="the outbox emptied")
    finally:
        link.close(timeout=2)
    assert stored_relpaths(hub) == ["a.jpg", "c.jpg"]
    assert link.outbox.refused == 1
    assert "the rejected event of survey:b.jpg is set aside, as " in caplog.text
    assert "events[1].event.reason: String should have at most 4000 characters" in caplog.text


def test_a_batch_too_large_for_the_hub_goes_in_halves(
    hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 8 events of 200 KB: 1.6 MB in one request, more than the hub's 1 MiB (which it may
    # refuse by closing the connection). In halves they all arrive; an event alone larger
    # than 1 MiB is set aside.
    from skyframe.events import LifecycleEvent

    link = station_link(hub, tmp_path / "station", batch_size=8)
    for i in range(8):
        meta = {"note": f"{i}" * 200_000}
        link.skyframe_event(LifecycleEvent("delivered", "survey", f"{i}.jpg", meta=meta))
    link.skyframe_event(LifecycleEvent("delivered", "survey", "huge.jpg", meta={"n": "h" * 2**20}))
    link.start()
    try:
        wait_for(lambda: link.pending == 0, timeout=30, what="the outbox emptied")
    finally:
        link.close(timeout=2)
    assert stored_relpaths(hub) == [f"{i}.jpg" for i in range(8)]
    assert link.outbox.refused == 1
    said = "the delivered event of survey:huge.jpg is set aside, as "
    assert said in caplog.text
    assert "(the event alone is larger than the hub's 1024 KiB)" in caplog.text


def test_the_station_knows_the_hubs_largest_body() -> None:
    from skyframe.hub.ingest import MAX_BODY
    from skyframe.hublink import HUB_MAX_BODY

    assert HUB_MAX_BODY == MAX_BODY
