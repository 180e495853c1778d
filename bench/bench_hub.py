"""Benchmark of the hub's ingest: N simulated stations posting event batches, on SQLite and on
PostgreSQL.

For each backend and run: a fresh database (a SQLite file, or a new database of the
PostgreSQL cluster the tests use, `tests/servers.py`), one station token per simulated station
made against it (`skyframe.hub.tokens`), then the hub as the real command
(`python -m skyframe hub hub.yaml`, its own process and interpreter lock) on a free loopback
port. The load generator, this process (one asyncio loop, aiohttp), runs every station as a
task with its own connection:

- each second (stations spread evenly over the second) a station adds `--rate` `delivered`
  events (sha256, size, remote, meta with the flight group, as `LifecycleEvent.to_json()`)
  to its outbox and sends what waits, up to 1,000 events, in one request; every
  `--heartbeat` seconds the request also carries the station's status, as the daemon's does;
- a station waits for the answer before its next request (as `hublink.py` does): while the
  hub is slow, its outbox grows and the next batch is bigger;
- a request that fails (timeout, refused connection, any status but 200) is sent again, the
  same body, after a backoff as the station's (1 s doubling, randomised);
- after `--duration` seconds no more events are made; each station sends what is left (the
  drain, at most `--drain` seconds).

Measured: events and requests acknowledged per second in the load window against the offered
rate, the latency of each successful request (sent to 200 received: p50, p95, p99, max), the
failures by status, the duplicates the hub reported (resent batches it had stored), the CPU of
the hub process, of PostgreSQL and of the generator itself (% of one core) and the generator's
own lag: how late its tasks woke for a scheduled send (a loaded generator shows there; the
sends that were late because the previous request was still waiting count apart). After the
hub stopped, the rows of `events` are counted per station in the database itself: lost =
events made - rows stored.

The target (the hub issue): 200 stations x 20 events/s for 60 s with p99 < 200 ms, 0 lost
(on PostgreSQL); "met" also asks that the hub acknowledged at least 99% of the offered events
within the window (it kept up rather than catching up in the drain).

Run from the repository root:

    .venv/bin/python bench/bench_hub.py [--stations 200] [--rate 20] [--duration 60]
        [--backends sqlite,postgres] [--runs 1] [--heartbeat 10]

PostgreSQL needs the server binaries (Debian `postgresql`) and the venv's psycopg. Everything
lives in a temporary folder that is removed at the end; the hub and PostgreSQL are stopped,
also on Ctrl-C or errors. Each run waits for a quiet machine first (`machine.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import machine
import servers

from skyframe.hub.db import open_database
from skyframe.hub.schema import events, stations
from skyframe.hub.tokens import add_station

BACKENDS = ("sqlite", "postgres")
MAX_EVENTS = 1000  #: events in one request at most (the hub's limit)
TIMEOUT = 30.0  #: seconds one request may take, as a station's default
RETRY_INITIAL, RETRY_MAX = 1.0, 60.0  #: a station's backoff after a failed request
HUB_START_TIMEOUT = 60.0
HUB_STOP_TIMEOUT = 15.0
FLIGHT_FILES = 600  #: files of one flight before a station starts the next
TARGET_P99 = 0.200
TARGET_SHARE = 0.99  #: events acknowledged in the window / offered, to count as keeping up
TICKS = os.sysconf("SC_CLK_TCK")


def parse_backends(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    wrong = [item for item in items if item not in BACKENDS]
    if not items or wrong:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(BACKENDS)}: got {text!r}")
    return items


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
        return value

    return parse


# --------------------------------------------------------------------------------------------
# CPU of other processes, from /proc


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User + system seconds of a process (and of its reaped children)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            text = stat.read()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    used = int(fields[11]) + int(fields[12])  # utime, stime
    if children:
        used += int(fields[13]) + int(fields[14])  # cutime, cstime
    return used / TICKS


def family_cpu_seconds(leader: int) -> float:
    """CPU seconds of a server and its direct children, living or reaped (PostgreSQL's
    backends are children of the postmaster)."""
    total = cpu_seconds(leader, children=True)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == leader:
            total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------------------------
# The simulated stations


@dataclasses.dataclass
class Plan:
    """One run's schedule, in the generator's loop clock."""

    url: str
    rate: int
    start: float
    end: float
    drain_until: float
    heartbeat: int
    timeout: float


@dataclasses.dataclass
class Tally:
    """What the generator saw, all stations together."""

    latencies: list[float] = dataclasses.field(default_factory=list)  #: 200 answers, seconds
    wake_lag: list[float] = dataclasses.field(default_factory=list)  #: seconds late waking
    late_sends: int = 0  #: ticks already past when the previous request came back
    failures: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    requests_in_window: int = 0
    events_in_window: int = 0
    duplicates: int = 0
    last_ack: float = 0.0  #: loop time of the last successful answer


class Station:
    """One simulated field station: its outbox, its flight, its status."""

    def __init__(self, name: str, token: str, index: int, count: int) -> None:
        self.name = name
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.phase = index / count  #: stations spread evenly over each second
        self.random = random.Random(index)
        self.seq = 0
        self.made = 0
        self.pending: list[dict[str, Any]] = []
        self.started_at = time.time()
        self.day = time.strftime("%Y-%m-%d", time.gmtime())
        self.delivered = 0
        self.bytes = 0

    def flight(self) -> tuple[str, int]:
        """(the current flight's key, the file's number in it)."""
        number, file = divmod(self.made, FLIGHT_FILES)
        return f"{self.day}/f{number + 1}", file + 1

    def add_events(self, count: int, at: float) -> None:
        for _ in range(count):
            key, file = self.flight()
            relpath = f"{key.rsplit('/', 1)[1]}/DJI_{file:04}.JPG"
            digest = f"{self.random.getrandbits(256):064x}"
            size = self.random.randrange(6_000_000, 12_000_000)
            self.seq += 1
            self.made += 1
            self.delivered += 1
            self.bytes += size
            event = {
                "kind": "delivered",
                "pipeline": "survey",
                "relpath": relpath,
                "sink": "office-nas",
                "remote": f"{key}/{relpath.rsplit('/', 1)[1]}",
                "size": size,
                "sha256": digest,
                "attempt": 1,
                "meta": {
                    "sha256": digest,
                    "group": {"name": "flight", "key": key},
                    "gps": {
                        "lat": round(46.5 + self.random.random() / 100, 7),
                        "lon": round(6.6 + self.random.random() / 100, 7),
                        "alt": round(self.random.uniform(80, 120), 1),
                    },
                    "camera": "FC6310S",
                },
                "time": at,
            }
            self.pending.append({"id": uuid.uuid4().hex, "seq": self.seq, "event": event})

    def status(self) -> dict[str, Any]:
        """A heartbeat as the daemon sends it (its status document and latest groups)."""
        key, file = self.flight()
        sink = {
            "key": "office-nas",
            "display": "sftp://nas/survey",
            "health": "ok",
            "last_error": None,
            "in_flight": 2,
            "delivered": self.delivered,
            "bytes": self.bytes,
            "failed": 0,
        }
        pipeline = {
            "name": "survey",
            "source": "/data/drone",
            "paused": False,
            "queue": {"pending": len(self.pending), "leased": 2, "waiting": 0, "dead": 0},
            "sinks": [sink],
        }
        group = {
            "pipeline": "survey",
            "name": "flight",
            "key": key,
            "files": file,
            "seen": file + 2,
            "first_arrival": self.started_at,
            "last_arrival": time.time(),
            "complete": False,
        }
        return {
            "version": "0.9.0",
            "pid": 4000 + int(self.phase * 1000),
            "started_at": self.started_at,
            "paused": False,
            "pipelines": [pipeline],
            "removed": [],
            "transfers": [],
            "throughput": {"bytes_per_s": 1.8e8, "files_per_s": 20.0},
            "totals": {"delivered": self.delivered, "failed": 0},
            "errors": [],
            "groups": [group],
            "outbox": len(self.pending),
            "outbox_dropped": 0,
        }

    async def run(self, session: aiohttp.ClientSession, plan: Plan, tally: Tally) -> None:
        loop = asyncio.get_running_loop()
        tick, count = plan.start + self.phase, 0
        while tick < plan.end:
            now = loop.time()
            if tick > now:
                await asyncio.sleep(tick - now)
                tally.wake_lag.append(loop.time() - tick)
            else:
                tally.late_sends += 1
            self.add_events(plan.rate, time.time())
            heartbeat = count % plan.heartbeat == 0
            await self.exchange(session, plan, tally, heartbeat=heartbeat)
            tick += 1.0
            count += 1
        while self.pending and loop.time() < plan.drain_until:
            await self.exchange(session, plan, tally, heartbeat=False)

    async def exchange(
        self, session: aiohttp.ClientSession, plan: Plan, tally: Tally, *, heartbeat: bool
    ) -> None:
        """Send the oldest events until the hub takes them (the same body every time)."""
        loop = asyncio.get_running_loop()
        batch = self.pending[:MAX_EVENTS]
        body = {
            "station": self.name,
            "sent_at": time.time(),
            "events": batch,
            "status": self.status() if heartbeat else None,
            "acks": [],
        }
        data = json.dumps(body, separators=(",", ":")).encode()
        failures = 0
        while True:
            sent = loop.time()
            outcome: str
            try:
                async with session.post(
                    plan.url,
                    data=data,
                    headers=self.headers,
                    timeout=aiohttp.ClientTimeout(total=plan.timeout),
                ) as response:
                    answer = await response.read()
                    outcome = str(response.status)
            except TimeoutError:
                outcome = "timeout"
            except aiohttp.ClientError as exc:
                outcome = type(exc).__name__
            done = loop.time()
            if outcome == "200":
                tally.latencies.append(done - sent)
                tally.duplicates += int(json.loads(answer).get("duplicates", 0))
                tally.last_ack = done
                if done <= plan.end:
                    tally.requests_in_window += 1
                    tally.events_in_window += len(batch)
                del self.pending[: len(batch)]
                return
            tally.failures[outcome] += 1
            failures += 1
            if done >= plan.drain_until:
                return
            wait = min(RETRY_INITIAL * 2 ** (failures - 1), RETRY_MAX) * random.uniform(0.5, 1)
            await asyncio.sleep(min(wait, max(plan.drain_until - done, 0.0)))


async def generate(
    stations_: list[Station],
    plan_args: dict[str, Any],
    on_start: Callable[[], None],
    on_end: Callable[[], None],
) -> tuple[Plan, Tally]:
    """Run every station; ``on_start`` and ``on_end`` are called when the load window opens
    and closes (before the drain)."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in stations_]
    try:
        start = loop.time() + 1.0
        duration = plan_args["duration"]
        plan = Plan(
            url=plan_args["url"],
            rate=plan_args["rate"],
            start=start,
            end=start + duration,
            drain_until=start + duration + plan_args["drain"],
            heartbeat=plan_args["heartbeat"],
            timeout=plan_args["timeout"],
        )
        loop.call_at(start, on_start)
        loop.call_at(plan.end, on_end)
        pairs = zip(stations_, sessions, strict=True)
        await asyncio.gather(*(station.run(session, plan, tally) for station, session in pairs))
        await asyncio.sleep(max(plan.end - loop.time(), 0.0) + 0.01)  # on_end has run
    finally:
        await asyncio.gather(*(session.close() for session in sessions))
    return plan, tally


# --------------------------------------------------------------------------------------------
# The hub and its database


class HubProcess:
    """`python -m skyframe hub hub.yaml` as a subprocess; its URL once it listens."""

    def __init__(self, config: Path, folder: Path) -> None:
        self.out = folder / "hub.stdout"
        self.err = folder / "hub.stderr"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "skyframe", "hub", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=folder,
                start_new_session=True,  # Ctrl-C reaches the harness only, which stops it
            )
        self.url = self._wait_ready()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + HUB_START_TIMEOUT
        while time.monotonic() < deadline:
            found = re.search(r"hub: (https?://\S+?)/ ", self.out.read_text(errors="replace"))
            if found:
                return found[1]
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the hub did not start:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        text = self.out.read_text(errors="replace") + self.err.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM (as Ctrl-C), then SIGKILL after a while. Idempotent."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(HUB_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def make_database(backend: str, folder: Path, postgres: servers.PostgresServer | None) -> str:
    if backend == "sqlite":
        return f"sqlite:///{folder / 'hub.db'}"
    assert postgres is not None
    return postgres.create_database("bench")


def make_stations(url: str, count: int) -> list[Station]:
    engine = open_database(url)
    try:
        return [
            Station(f"station-{n:04}", add_station(engine, f"station-{n:04}"), n, count)
            for n in range(count)
        ]
    finally:
        engine.dispose()


def stored_per_station(url: str) -> dict[str, int]:
    """Rows of `events` per station, read from the database."""
    engine = open_database(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.select(stations.c.name, sa.func.count(events.c.id))
                .select_from(stations.outerjoin(events, events.c.station_id == stations.c.id))
                .group_by(stations.c.name)
            ).all()
    finally:
        engine.dispose()
    return {str(name): int(count) for name, count in rows}


# --------------------------------------------------------------------------------------------
# One run


@dataclasses.dataclass
class Run:
    backend: str
    index: int
    stations: int
    rate: int
    duration: float
    made: int
    stored: int
    lost: int
    events_per_s: float
    requests_per_s: float
    latencies: list[float]
    failures: dict[str, int]
    duplicates: int
    drain_s: float
    hub_cpu: float  #: % of one core during the load window
    db_cpu: float | None
    gen_cpu: float
    wake_p99: float
    wake_max: float
    late_sends: int
    problem: str = ""

    @property
    def offered(self) -> float:
        return self.stations * self.rate

    def p(self, q: float) -> float:
        return quantile(self.latencies, q)

    @property
    def met(self) -> bool:
        return (
            not self.problem
            and self.lost == 0
            and bool(self.latencies)
            and self.p(0.99) < TARGET_P99
            and self.events_per_s >= TARGET_SHARE * self.offered
        )


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def one_run(
    backend: str,
    index: int,
    args: argparse.Namespace,
    base: Path,
    postgres: servers.PostgresServer | None,
) -> Run:
    folder = base / f"{backend}-{index}"
    folder.mkdir()
    url = make_database(backend, folder, postgres)
    began = time.perf_counter()
    station_list = make_stations(url, args.stations)
    print(f"  {len(station_list)} stations made in {time.perf_counter() - began:.1f} s", flush=True)
    config = folder / "hub.yaml"
    # JSON is YAML; the alerts loop runs at its default pace
    config.write_text(json.dumps({"listen": "127.0.0.1:0", "database": url}), encoding="utf-8")
    waited = machine.wait_until_quiet()
    if waited >= 1:
        print(f"  (waited {waited:.0f} s for the machine to be quiet)", flush=True)
    hub = HubProcess(config, folder)
    db_pid = postgres.pid if postgres is not None and backend == "postgres" else None
    marks: dict[str, float] = {}

    def on_start() -> None:
        marks.update(hub=cpu_seconds(hub.process.pid), gen=own_cpu_seconds())
        if db_pid is not None:
            marks["db"] = family_cpu_seconds(db_pid)

    def on_end() -> None:
        marks.update(hub_end=cpu_seconds(hub.process.pid), gen_end=own_cpu_seconds())
        if db_pid is not None:
            marks["db_end"] = family_cpu_seconds(db_pid)

    async def load() -> tuple[Plan, Tally]:
        plan_args = {
            "url": f"{hub.url}/api/v1/ingest",
            "rate": args.rate,
            "duration": args.duration,
            "drain": args.drain,
            "heartbeat": args.heartbeat,
            "timeout": args.timeout,
        }
        return await generate(station_list, plan_args, on_start, on_end)

    problem = ""
    try:
        plan, tally = asyncio.run(load())
    finally:
        hub.stop()
    if hub.process.returncode not in (0, -signal.SIGTERM):
        problem = f"the hub exited with {hub.process.returncode}: {hub.log_tail(5)}"
    stored = stored_per_station(url)
    made = sum(station.made for station in station_list)
    lost = sum(max(station.made - stored.get(station.name, 0), 0) for station in station_list)
    extra = sum(max(stored.get(s.name, 0) - s.made, 0) for s in station_list)
    if extra:
        problem = f"{extra} rows more than events made"
    unsent = sum(len(station.pending) for station in station_list)
    if unsent:
        problem = f"{unsent} events still in the outboxes when the drain ended"
    duration = window = args.duration
    return Run(
        backend=backend,
        index=index,
        stations=args.stations,
        rate=args.rate,
        duration=duration,
        made=made,
        stored=sum(stored.values()),
        lost=lost,
        events_per_s=tally.events_in_window / duration,
        requests_per_s=tally.requests_in_window / duration,
        latencies=tally.latencies,
        failures=dict(tally.failures),
        duplicates=tally.duplicates,
        drain_s=max(tally.last_ack - plan.end, 0.0),
        hub_cpu=100 * (marks.get("hub_end", 0.0) - marks.get("hub", 0.0)) / window,
        db_cpu=100 * (marks["db_end"] - marks["db"]) / window if "db_end" in marks else None,
        gen_cpu=100 * (marks.get("gen_end", 0.0) - marks.get("gen", 0.0)) / window,
        wake_p99=quantile(tally.wake_lag, 0.99),
        wake_max=max(tally.wake_lag, default=float("nan")),
        late_sends=tally.late_sends,
        problem=problem,
    )


# --------------------------------------------------------------------------------------------
# Report


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.0f}"


def describe(run: Run) -> str:
    failures = ", ".join(f"{k}: {v}" for k, v in sorted(run.failures.items())) or "none"
    db = f"{run.db_cpu:.0f}%" if run.db_cpu is not None else "-"
    return (
        f"  {run.backend} run {run.index + 1}: {run.events_per_s:,.0f} events/s of "
        f"{run.offered:,.0f} offered, {run.requests_per_s:.0f} requests/s; latency ms p50 "
        f"{ms(run.p(0.5))} p95 {ms(run.p(0.95))} p99 {ms(run.p(0.99))} max "
        f"{ms(max(run.latencies, default=float('nan')))}; failures {failures}; "
        f"lost {run.lost} of {run.made:,}; duplicates {run.duplicates}; drain "
        f"{run.drain_s:.1f} s; CPU hub {run.hub_cpu:.0f}%, database {db}, generator "
        f"{run.gen_cpu:.0f}%; generator lag p99 {ms(run.wake_p99)} ms, max "
        f"{ms(run.wake_max)} ms; late sends {run.late_sends}"
        + (f"\n  !!!!! {run.problem}" if run.problem else "")
    )


def spread(values: list[float], spec: str) -> str:
    middle = format(statistics.median(values), spec)
    if len(values) == 1:
        return middle
    return f"{middle} ({format(min(values), spec)}-{format(max(values), spec)})"


def print_table(runs: list[Run], backends: list[str]) -> None:
    print(
        "\n=== ingest: medians over the runs (min-max); latency: request sent -> 200 received ==="
    )
    rows: list[tuple[str, Callable[[Run], float], str]] = [
        ("events/s (offered)", lambda r: r.events_per_s, ",.0f"),
        ("requests/s", lambda r: r.requests_per_s, ".0f"),
        ("latency p50 ms", lambda r: 1000 * r.p(0.5), ".0f"),
        ("latency p95 ms", lambda r: 1000 * r.p(0.95), ".0f"),
        ("latency p99 ms", lambda r: 1000 * r.p(0.99), ".0f"),
        ("latency max ms", lambda r: 1000 * max(r.latencies, default=float("nan")), ".0f"),
        ("failed requests", lambda r: sum(r.failures.values()), ".0f"),
        ("lost events", lambda r: r.lost, ".0f"),
        ("duplicates", lambda r: r.duplicates, ".0f"),
        ("drain s", lambda r: r.drain_s, ".1f"),
        ("hub CPU % (1 core)", lambda r: r.hub_cpu, ".0f"),
        ("database CPU %", lambda r: r.db_cpu if r.db_cpu is not None else float("nan"), ".0f"),
        ("generator CPU %", lambda r: r.gen_cpu, ".0f"),
        ("generator lag p99 ms", lambda r: 1000 * r.wake_p99, ".0f"),
        ("late sends", lambda r: r.late_sends, ".0f"),
    ]
    width = 24
    print(f"{'':<{width}}" + "".join(f"{backend:>30}" for backend in backends))
    for label, value, spec in rows:
        line = f"{label:<{width}}"
        for backend in backends:
            mine = [r for r in runs if r.backend == backend]
            values = [value(r) for r in mine]
            known = [v for v in values if not math.isnan(v)]
            shown = spread(known, spec) if known else "-"
            if label.startswith("events/s") and mine:
                shown += f" of {mine[0].offered:,.0f}"
            line += f"{shown:>30}"
        print(line)
    line = f"{'target met':<{width}}"
    for backend in backends:
        mine = [r for r in runs if r.backend == backend]
        verdict = f"{sum(r.met for r in mine)} of {len(mine)} runs" if mine else "-"
        line += f"{verdict:>30}"
    print(line)
    print(
        f"target: p99 < {TARGET_P99 * 1000:.0f} ms, 0 lost, >= {TARGET_SHARE:.0%} of the "
        "offered events acknowledged within the window"
    )


# --------------------------------------------------------------------------------------------
# Main


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, so the clean-up below runs as for Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--stations", type=positive(int), default=200)
    parser.add_argument(
        "--rate", type=positive(int), default=20, help="events per second of each station"
    )
    parser.add_argument("--duration", type=positive(float), default=60.0, help="seconds")
    parser.add_argument("--backends", type=parse_backends, default=list(BACKENDS))
    parser.add_argument("--runs", type=positive(int), default=1, help="runs of each backend")
    parser.add_argument(
        "--heartbeat", type=positive(int), default=10, help="seconds between two statuses"
    )
    parser.add_argument(
        "--drain", type=positive(float), default=60.0, help="seconds to send what is left"
    )
    parser.add_argument("--timeout", type=positive(float), default=TIMEOUT, help="per request")
    args = parser.parse_args()
    print(
        f"{args.stations} stations x {args.rate} events/s for {args.duration:g} s "
        f"({args.stations * args.rate:,} events/s offered), heartbeat every {args.heartbeat} s; "
        f"Python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, "
        f"SQLAlchemy {sa.__version__}"
    )
    print(f"CPUs: {os.cpu_count()} (usable by this process: {len(os.sched_getaffinity(0))})")
    base = Path(tempfile.mkdtemp(prefix="skyframe-bench-hub-"))
    runs: list[Run] = []
    try:
        with sigterm_as_interrupt(), contextlib.ExitStack() as stack:
            postgres = None
            if "postgres" in args.backends:
                postgres = stack.enter_context(servers.PostgresServer(base / "servers"))
                print(f"postgres ready in {postgres.start_seconds:.1f} s", flush=True)
            for index in range(args.runs):
                for backend in args.backends:
                    print(f"\n{backend} run {index + 1}", flush=True)
                    runs.append(one_run(backend, index, args, base, postgres))
                    print(describe(runs[-1]), flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print_table(runs, args.backends)
    if any(run.problem for run in runs):
        print("\n!!!!! SOME RUNS FAILED: see the messages above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
