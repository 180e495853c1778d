"""Benchmark of one-shot uploads over an emulated field link: skyframe against rclone.

A drone flight (photos and a video) goes to real servers on loopback (SeaweedFS S3, OpenSSH
SFTP, from `tests/servers.py`) through `tests/fakes/link.py`'s `LinkEmulator`: one shared
upstream bandwidth (`--rate`, Mbit/s), a round trip (`--rtt`, ms; half of it each way, and one
more when a connection opens), and, in the flaky case, every open connection reset every
`--cut-every` seconds. Two cases:

- "steady": `--photos` photos of about `--photo-size` plus one video of `--video-size`, over a
  link that never fails;
- "flaky": `--flaky-photos` photos plus a video of `--flaky-video-size`, with the cuts.

A third case, "photos-first" (only when named in `--cases`), is about latency, not speed: the
daemon (in this process) watches a folder; a video of `--pf-video-size` lands, and while it
uploads `--pf-photos` photos of `--pf-photo-size` land, one every `--pf-every` seconds. Each
photo's latency (landing, by a rename into the folder, to its "delivered" event) is reported
against its own transfer time, measured first on the idle link (median of two photos sent
alone). Three variants per target: "arrival order" (`priority: {small_first: null}`), "photos
first" (the default config) and "photos first + bwlimit" (the sink's `bwlimit` at 95% of the
link). skyframe only; rclone has no watch mode.

For every case and target the tools run alternately (skyframe, rclone, skyframe, ...), `--runs`
times each, exactly as in `bench_remote.py` (and with its helpers; with `--baseline DIR`, the
code of checkout DIR runs too, as `skyframe-base`, first in each round): `python -m skyframe -q
run --once` with one pipeline (`settle: 0`) and one sink, and `rclone copy` (over SFTP with
`--sftp-disable-hashcheck`, the same work). Every run gets a fresh link (so the cuts start with
the command), a fresh bucket or folder and, for skyframe, a fresh state_dir; the tools are
pointed at the link's port (the S3 endpoint, the SFTP host and port, with a known_hosts line
naming the link's address). Before each run the disk is synced and the harness waits for idle
CPUs (`machine.py`). After each run the destination is listed directly on the server: every
file must be there with its size, or the run counts as failed (reported, exit code 1).

Reported per tool: median seconds (the command's start to its exit) and spread; the share of
the link's capacity used, payload bits / (rate x seconds); the bytes that went up through the
link / payload (protocol overhead, plus whatever was sent again after a cut); the bytes that
came down; failed runs. Ratio: rclone median / skyframe median (>= 1.0: skyframe at least as
fast). And where the time went, from the link's bytes up read every 50 ms (medians): the
start (to the first 100 KB up), the time with nothing sent after that (until 99% of the
bytes), and the tail (from 99% of the bytes to the exit); beside the time the payload alone
takes at the link's rate.

Run from the repository root:

    .venv/bin/python bench/bench_link.py [--runs N] [--cases steady,flaky]
        [--targets s3,sftp] [--tools skyframe,skyframe-base,rclone] [--baseline DIR]
        [--rate 40] [--rtt 80] [--down-rate 0]
        [--cut-every 6] [--photos 120] [--photo-size 600KB] [--video-size 30MB]
        [--flaky-photos 40] [--flaky-video-size 120MB] [--timeout 900]
        [--pf-video-size 1GB] [--pf-photos 8] [--pf-photo-size 5MB] [--pf-every 5]

Needs what `bench_remote.py` needs (rclone, sshd, the venv's test extras). Everything lives in
a temporary folder that is removed at the end; the servers and links are stopped, also on
Ctrl-C or errors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import baseline
import bench_remote
import servers
from bench_remote import Dataset, Destination, Launcher, Target, Tool, fmt, human, parse_size
from fakes.link import LinkEmulator, mbit
from helpers import Daemon

CASES = ("steady", "flaky", "photos-first")
DEFAULT_CASES = ["steady", "flaky"]
TARGETS = ("s3", "sftp")
TOOLS = ("skyframe", "skyframe-base", "rclone")
MB = 1_000_000
SAMPLE = 0.05  #: seconds between two readings of the link's bytes up (Timeline)
FIRST_BYTES = 100_000  #: bytes up that mark the start of the uploads (Timeline)
CHUNK = 8 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# Data: a flight


def make_flight(root: Path, case: str, photos: int, photo_size: int, video_size: int) -> Dataset:
    """Photos of photo_size +-10% (seeded) in photos/, one video in video/."""
    rng = random.Random(f"{case}-{photos}-{photo_size}-{video_size}")
    files: dict[str, int] = {}
    for n in range(1, photos + 1):
        relpath = f"photos/DJI_{n:04}.JPG"
        size = int(photo_size * rng.uniform(0.9, 1.1))
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
        files[relpath] = size
    if video_size:
        relpath = f"video/DJI_{photos + 1:04}.MP4"
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as out:
            left = video_size
            while left > 0:
                out.write(rng.randbytes(min(left, CHUNK)))
                left -= CHUNK
        files[relpath] = video_size
    return Dataset(case, root, files)


def describe(data: Dataset) -> str:
    photos = [size for path, size in data.files.items() if path.startswith("photos/")]
    video = data.total_bytes - sum(photos)
    text = f"{len(photos)} photos of ~{human(statistics.mean(photos))}" if photos else "no photos"
    return f"{text} + a video of {human(video)} ({human(data.total_bytes)})"


# --------------------------------------------------------------------------------------------
# The link in front of a target


@dataclasses.dataclass(frozen=True)
class Link:
    """The emulated link's settings."""

    rate: float  # bits per second, upstream
    down_rate: float | None  # bits per second, downstream; None: unlimited
    rtt: float  # seconds
    cut_every: float | None  # seconds

    def describe(self) -> str:
        down = f", down {self.down_rate / 1e6:g} Mbit/s" if self.down_rate else ""
        cuts = f", cut every {self.cut_every:g} s" if self.cut_every else ""
        return f"up {self.rate / 1e6:g} Mbit/s{down}, RTT {self.rtt * 1000:g} ms{cuts}"

    def open(self, server: servers.Server) -> LinkEmulator:
        port: int = server.port  # type: ignore[attr-defined]
        return LinkEmulator(
            servers.LOOPBACK,
            port,
            up_bps=self.rate,
            down_bps=self.down_rate,
            rtt=self.rtt,
            cut_every=self.cut_every,
        ).start()


def through(target: Target, dest: Destination, link: LinkEmulator, folder: Path) -> str:
    """Point dest's skyframe sink at the link; returns the rclone.conf section doing the same."""
    if isinstance(target, bench_remote.S3Target):
        url = f"http://{link.address}"
        dest.sink["options"]["endpoint_url"] = url
        return target.s3.rclone_section(target.name).replace(target.s3.endpoint_url, url)
    assert isinstance(target, bench_remote.SFTPTarget)
    sftp = target.sftp
    known_hosts = folder / "known_hosts"
    known_hosts.write_text(f"[{link.host}]:{link.port} {sftp.host_public_key}\n", "utf-8")
    dest.sink["url"] = dest.sink["url"].replace(f":{sftp.port}/", f":{link.port}/", 1)
    dest.sink["options"]["known_hosts"] = str(known_hosts)
    section = sftp.rclone_section(target.name)
    section = section.replace(f"port = {sftp.port}\n", f"port = {link.port}\n")
    return section.replace(str(sftp.known_hosts), str(known_hosts))


def used_before(target: Target, dest: Destination) -> None:
    """Write one object into the fresh bucket of an S3 run, beside the destination and
    straight to the server: a crew's bucket has been written to before. SeaweedFS takes about
    0.3 s over the first write into a new bucket (it makes the bucket's volume then), which
    would fall in either tool's first request."""
    if not isinstance(target, bench_remote.S3Target):
        return
    bucket = dest.listing_root.split("/", 1)[0]
    fs = target.filesystem()
    try:
        fs.pipe_file(f"{bucket}/used-before", b"an earlier flight\n")
    finally:
        servers.close_filesystem(fs)


# --------------------------------------------------------------------------------------------
# Runs


class Timeline:
    """Where a run's seconds went on the link, from the bytes up sampled every
    :data:`SAMPLE` seconds from the command's start: ``start``, until the first
    :data:`FIRST_BYTES` went up (Python's or Go's start, the handshakes, the sinks' check);
    ``idle``, the samples with nothing sent between then and 99% of the bytes up (waits for
    answers, gaps between files); ``tail``, from 99% of the bytes to the command's exit (the
    last answers, renames, closing)."""

    def __init__(self, link: LinkEmulator) -> None:
        self.link = link
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-timeline", daemon=True)

    def __enter__(self) -> Timeline:
        self.began = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.ended = time.monotonic()
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            self.samples.append((time.monotonic() - self.began, self.link.bytes_up))
            if self._stop.wait(SAMPLE):
                return

    def figures(self) -> tuple[float, float, float] | None:
        """(start, idle, tail) in seconds; None when too little went up to tell."""
        total = self.samples[-1][1] if self.samples else 0
        first = next((t for t, up in self.samples if up >= FIRST_BYTES), None)
        last = next((t for t, up in self.samples if up >= 0.99 * total), None)
        if first is None or last is None or last <= first:
            return None
        idle = sum(
            SAMPLE
            for (t, up), (_, before) in zip(self.samples[1:], self.samples, strict=False)
            if first < t <= last and up == before
        )
        return first, idle, (self.ended - self.began) - last


@dataclasses.dataclass
class Run:
    tool: str
    seconds: float
    up: int  # bytes through the link, client -> server
    down: int
    cuts: int  # connections the link reset
    connections: int
    problem: str = ""
    #: (start, idle, tail) seconds (see :class:`Timeline`); None when too little went up
    timeline: tuple[float, float, float] | None = None

    @property
    def ok(self) -> bool:
        return not self.problem


def one_run(
    tool: Tool,
    target: Target,
    data: Dataset,
    spec: Link,
    *,
    launcher: Launcher,
    work: Path,
    index: int,
) -> Run:
    label = f"{tool.name}-{data.case}-{index}"
    run_dir = work / f"{target.name}-{label}"
    run_dir.mkdir()
    dest = target.fresh(label)
    used_before(target, dest)
    bench_remote.quiesce()
    try:
        with spec.open(target.server) as link:
            rclone_conf = run_dir / "rclone.conf"
            rclone_conf.write_text(through(target, dest, link, run_dir), encoding="utf-8")
            with Timeline(link) as timeline:
                if tool.code is not None:
                    outcome = bench_remote.run_skyframe(launcher, data, dest, run_dir, tool.code)
                else:
                    outcome = bench_remote.run_rclone(
                        launcher, data, dest, run_dir, rclone_conf, flags=tool.flags
                    )
            counts = (link.bytes_up, link.bytes_down, link.cut_connections, link.connections)
        seconds, _, code, stderr, _ = outcome
        problem = f"exit code {code}" if code != 0 else ""
        try:
            wrong = bench_remote.check(target, data, dest)
        except Exception as exc:
            wrong = f"could not list the destination: {type(exc).__name__}: {exc}"
        problem = "; ".join(filter(None, [problem, wrong]))
        if problem:
            tail = "\n".join(stderr.rstrip().splitlines()[-30:]) or "(empty)"
            print(
                f"\n!!!!! FAILED: {tool.name} -> {target.name}, case {data.case}, run {index + 1}: "
                f"{problem}\n!!!!! end of the run's stderr:\n{tail}\n",
                flush=True,
            )
        return Run(tool.name, seconds, *counts, problem=problem, timeline=timeline.figures())
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        try:
            dest.cleanup()
        except Exception as exc:
            print(f"warning: could not remove {dest.listing_root}: {exc}", flush=True)


# --------------------------------------------------------------------------------------------
# Report


@dataclasses.dataclass
class Result:
    case: str
    target: str
    data: Dataset
    spec: Link
    tools: list[str]
    runs: list[Run]

    def of(self, tool: str, *, ok: bool = True) -> list[Run]:
        return [run for run in self.runs if run.tool == tool and (run.ok or not ok)]

    def median(self, tool: str) -> float | None:
        times = [run.seconds for run in self.of(tool)]
        return statistics.median(times) if times else None

    def spread(self, tool: str) -> str:
        times = [run.seconds for run in self.of(tool)]
        return f"{min(times):.1f}-{max(times):.1f}" if times else "-"

    def capacity(self, tool: str) -> float | None:
        """Share of the link's upstream capacity the payload used, over the median time."""
        median = self.median(tool)
        return self.data.total_bytes * 8 / (self.spec.rate * median) if median else None

    def overhead(self, tool: str) -> float | None:
        """Median bytes up through the link / payload."""
        ups = [run.up for run in self.of(tool)]
        return statistics.median(ups) / self.data.total_bytes if ups else None

    def down_mb(self, tool: str) -> float | None:
        downs = [run.down for run in self.of(tool)]
        return statistics.median(downs) / MB if downs else None

    def median_of(self, tool: str, field: str) -> float | None:
        values = [getattr(run, field) for run in self.of(tool)]
        return statistics.median(values) if values else None

    def failed(self, tool: str) -> int:
        return sum(1 for run in self.of(tool, ok=False) if not run.ok)

    def timeline(self, tool: str) -> tuple[float, float, float] | None:
        """Median start, idle and tail seconds of the tool's runs (see :class:`Timeline`)."""
        figures = [run.timeline for run in self.of(tool) if run.timeline is not None]
        if not figures:
            return None
        start, idle, tail = zip(*figures, strict=True)
        return statistics.median(start), statistics.median(idle), statistics.median(tail)

    def ratio(self, other: str = "rclone") -> float | None:
        top, bottom = self.median(other), self.median("skyframe")
        return top / bottom if top and bottom else None


def print_result(result: Result) -> None:
    print(
        f"\n=== {result.case}: {describe(result.data)} -> {result.target}, "
        f"link {result.spec.describe()} ==="
    )
    print(
        f"{'tool':<13} {'median s':>9} {'spread':>11} {'% link':>7} {'up/payload':>10} "
        f"{'down MB':>8} {'conns':>6} {'cut':>5} {'failed':>7}  runs (s; * = failed)"
    )
    for tool in result.tools:
        capacity = result.capacity(tool)
        times = " ".join(
            f"{run.seconds:.1f}{'' if run.ok else '*'}" for run in result.of(tool, ok=False)
        )
        print(
            f"{tool:<13} {fmt(result.median(tool), '.1f'):>9} {result.spread(tool):>11} "
            f"{fmt(None if capacity is None else capacity * 100, '.0f'):>6}% "
            f"{fmt(result.overhead(tool), '.3f'):>10} {fmt(result.down_mb(tool), '.2f'):>8} "
            f"{fmt(result.median_of(tool, 'connections'), '.0f'):>6} "
            f"{fmt(result.median_of(tool, 'cuts'), '.0f'):>5} "
            f"{result.failed(tool)}/{len(result.of(tool, ok=False)):<5}  {times}"
        )
    floor = result.data.total_bytes * 8 / result.spec.rate
    print(
        f"where the time went (medians, s; the payload alone takes {floor:.1f} s of the link): "
        f"start = to the first {FIRST_BYTES // 1000} KB up, idle = nothing sent after that, "
        "tail = after 99% of the bytes"
    )
    for tool in result.tools:
        parts = result.timeline(tool)
        if parts is not None:
            start, idle, tail = parts
            print(f"  {tool:<13} start {start:5.2f}   idle {idle:5.2f}   tail {tail:5.2f}")
    if "rclone" in result.tools:
        print(f"ratio rclone/skyframe (medians): {fmt(result.ratio())} (>= 1.00: skyframe as fast)")
    if "skyframe-base" in result.tools:
        print(
            f"ratio skyframe-base/skyframe (medians): {fmt(result.ratio('skyframe-base'), '.3f')} "
            "(> 1.00: the current code is faster)"
        )
    sys.stdout.flush()


def print_summary(results: list[Result]) -> None:
    print(
        "\n=== summary (median seconds, % of the link's capacity, bytes up / payload; "
        "ratio = rclone / skyframe) ==="
    )
    print(
        f"{'case':<7} {'target':<6} {'skyframe':>9} {'%':>4} {'up/pay':>7} {'rclone':>9} "
        f"{'%':>4} {'up/pay':>7} {'ratio':>6}  failed (sky, rcl)"
    )
    for r in results:
        cells = []
        for tool in ("skyframe", "rclone"):
            capacity = r.capacity(tool)
            cells.append(
                f"{fmt(r.median(tool), '.1f'):>9} "
                f"{fmt(None if capacity is None else capacity * 100, '.0f'):>4} "
                f"{fmt(r.overhead(tool), '.3f'):>7}"
            )
        print(
            f"{r.case:<7} {r.target:<6} {cells[0]} {cells[1]} {fmt(r.ratio()):>6}  "
            f"{r.failed('skyframe')}, {r.failed('rclone')}"
        )


# --------------------------------------------------------------------------------------------
# Photos first: latency of photos landing while a video uploads

#: variant -> (pipeline keys, bwlimit as a share of the link's rate)
PF_VARIANTS: dict[str, tuple[dict[str, Any], float | None]] = {
    "arrival order": ({"priority": {"small_first": None}}, None),
    "photos first": ({}, None),
    "photos first + bwlimit": ({}, 0.95),
}
PF_VIDEO = "DJI_9999.MP4"


@dataclasses.dataclass
class PhotoTimes:
    target: str
    variant: str
    alone: float  # seconds a photo takes on the idle link (median), landing to delivered
    latencies: list[float]  # each photo landing during the video, landing to delivered
    video: float  # seconds from the video's landing to its delivery
    problem: str = ""


def pf_run(
    args: argparse.Namespace,
    target: Target,
    spec: Link,
    work: Path,
    variant: str,
) -> PhotoTimes:
    """One variant on one target: two photos alone, then the video with photos landing."""
    keys, share = PF_VARIANTS[variant]
    label = f"pf-{target.name}-{list(PF_VARIANTS).index(variant)}"
    run_dir = work / label
    incoming = run_dir / "incoming"
    incoming.mkdir(parents=True)
    photos = pf_data(args, run_dir / "staging", label)
    dest = target.fresh(label)
    used_before(target, dest)
    bench_remote.quiesce()
    try:
        with spec.open(target.server) as link:
            through(target, dest, link, run_dir)
            sink = {**dest.sink, "name": "field"}
            if share is not None:
                sink["bwlimit"] = f"{spec.rate * share / 1e6:g}Mbit/s"
            source = {"path": str(incoming), "settle": 1}
            pipeline = {"name": "flight", "source": source, "sinks": [sink], **keys}
            config = {
                "state_dir": str(run_dir / "state"),
                "api": {"enabled": False},
                "shutdown_grace": 1,
                "pipelines": [pipeline],
            }
            path = run_dir / "skyframe.yaml"
            path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
            with Daemon(path) as daemon:
                landed, during, times = pf_watch(args, daemon, run_dir, photos)
        alone = statistics.median(times[n] - landed[n] for n in photos[:2])
        latencies = [times[n] - landed[n] for n in during]
        return PhotoTimes(
            target.name, variant, alone, latencies, times[PF_VIDEO] - landed[PF_VIDEO]
        )
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
        print(f"\n!!!!! FAILED: photos-first {variant} -> {target.name}: {problem}", flush=True)
        return PhotoTimes(target.name, variant, 0.0, [], 0.0, problem)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        try:
            dest.cleanup()
        except Exception as exc:
            print(f"warning: could not remove {dest.listing_root}: {exc}", flush=True)


def pf_data(args: argparse.Namespace, staging: Path, seed: str) -> list[str]:
    """The photos (returned) and the video, written to staging, to land from there."""
    staging.mkdir()
    rng = random.Random(seed)
    photos = [f"DJI_{n:04}.JPG" for n in range(1, args.pf_photos + 3)]
    for name in photos:
        (staging / name).write_bytes(rng.randbytes(args.pf_photo_size))
    with (staging / PF_VIDEO).open("wb") as out:
        left = args.pf_video_size
        while left > 0:
            out.write(rng.randbytes(min(left, CHUNK)))
            left -= CHUNK
    return photos


def pf_watch(
    args: argparse.Namespace, daemon: Daemon, run_dir: Path, photos: list[str]
) -> tuple[dict[str, float], list[str], dict[str, float]]:
    """Land two photos alone, then the video and photos during it; return when each landed,
    the photos that landed during the video, and when each was delivered."""
    recorder = daemon.recorder
    staging, incoming = run_dir / "staging", run_dir / "incoming"
    landed: dict[str, float] = {}

    def delivered() -> dict[str, float]:
        with recorder.lock:
            return {e.relpath: e.time for e in recorder.events if e.kind == "delivered"}

    def land(name: str) -> None:
        landed[name] = time.time()
        (staging / name).rename(incoming / name)

    def wait(names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not set(names) <= set(delivered()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"not delivered in {timeout:g} s: {names}")
            time.sleep(0.01)

    for name in photos[:2]:  # alone on the idle link: their own transfer time
        land(name)
        wait([name], 120)
    land(PF_VIDEO)
    while recorder.count("started", PF_VIDEO) == 0:
        time.sleep(0.01)
    during = []
    for name in photos[2:]:
        time.sleep(args.pf_every)
        if PF_VIDEO in delivered():
            break
        land(name)
        during.append(name)
    wait([*during, PF_VIDEO], args.timeout)
    return landed, during, delivered()


def print_photos_first(results: list[PhotoTimes], args: argparse.Namespace, spec: Link) -> None:
    print(
        f"\n=== photos-first: a video of {human(args.pf_video_size)}, photos of "
        f"{human(args.pf_photo_size)} landing every {args.pf_every:g} s, link {spec.describe()} ==="
    )
    print(
        f"{'target':<6} {'variant':<23} {'alone s':>8} {'photos':>6} {'median s':>9} "
        f"{'max s':>7} {'max/alone':>9} {'video s':>8} {'video % link':>12}"
    )
    for r in results:
        if r.problem:
            print(f"{r.target:<6} {r.variant:<23} FAILED: {r.problem}")
            continue
        worst = max(r.latencies, default=0.0)
        median = statistics.median(r.latencies) if r.latencies else 0.0
        video_share = args.pf_video_size * 8 / (spec.rate * r.video) * 100 if r.video else 0.0
        print(
            f"{r.target:<6} {r.variant:<23} {r.alone:8.2f} {len(r.latencies):6} {median:9.2f} "
            f"{worst:7.2f} {worst / r.alone if r.alone else 0.0:9.1f} {r.video:8.1f} "
            f"{video_share:11.0f}%"
        )
        print(f"{'':<6} {'':<23} each: " + " ".join(f"{t:.2f}" for t in r.latencies))
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------
# Main


def bench(
    args: argparse.Namespace,
    base: Path,
    stack: contextlib.ExitStack,
    launcher: Launcher,
    latency: list[PhotoTimes],
) -> list[Result]:
    """The cases' results (those of photos-first go to ``latency``)."""
    codes = baseline.prepare(args.baseline, lambda code: bench_remote.skyframe_tool(code).name)
    targets: list[Target] = []
    for name in args.targets:
        if name == "s3":
            targets.append(
                bench_remote.S3Target(stack.enter_context(servers.S3Server(base / "servers")))
            )
        else:
            targets.append(
                bench_remote.SFTPTarget(stack.enter_context(servers.SFTPServer(base / "servers")))
            )
        print(f"{name} server ready in {targets[-1].server.start_seconds:.1f} s", flush=True)
    work = base / "work"
    work.mkdir()
    down = mbit(args.down_rate) if args.down_rate else None
    results = []
    for case in args.cases:
        if case == "photos-first":
            spec = Link(mbit(args.rate), down, args.rtt / 1000, None)
            print(f"\ncase {case}; link {spec.describe()}", flush=True)
            latency += [
                pf_run(args, target, spec, work, variant)
                for target in targets
                for variant in PF_VARIANTS
            ]
            print_photos_first(latency, args, spec)
            continue
        if case == "steady":
            data = make_flight(
                base / "data" / case, case, args.photos, args.photo_size, args.video_size
            )
            spec = Link(mbit(args.rate), down, args.rtt / 1000, None)
        else:
            data = make_flight(
                base / "data" / case,
                case,
                args.flaky_photos,
                args.photo_size,
                args.flaky_video_size,
            )
            spec = Link(mbit(args.rate), down, args.rtt / 1000, args.cut_every)
        print(f"\ncase {case}: {describe(data)}; link {spec.describe()}", flush=True)
        for target in targets:
            every = [bench_remote.skyframe_tool(c) for c in codes] + [target.rclone_runs()[0]]
            tools = [tool for tool in every if tool.name in args.tools]
            runs = []
            for index in range(args.runs):
                for tool in tools:
                    run = one_run(
                        tool, target, data, spec, launcher=launcher, work=work, index=index
                    )
                    print(
                        f"  {case}/{target.name} run {index + 1} {tool.name:<13} "
                        f"{run.seconds:7.1f} s  up {run.up / MB:7.1f} MB  "
                        f"{run.cuts:3} cut  {'ok' if run.ok else 'FAILED'}",
                        flush=True,
                    )
                    runs.append(run)
            results.append(
                Result(case, target.name, data, spec, [tool.name for tool in tools], runs)
            )
            print_result(results[-1])
        shutil.rmtree(data.path, ignore_errors=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each tool per case/target")
    parser.add_argument("--cases", type=bench_remote.parse_list(CASES), default=DEFAULT_CASES)
    parser.add_argument("--targets", type=bench_remote.parse_list(TARGETS), default=list(TARGETS))
    parser.add_argument(
        "--tools",
        type=bench_remote.parse_list(TOOLS),
        default=list(TOOLS),
        help="which to run (default all; skyframe-base needs --baseline)",
    )
    baseline.add_argument(parser, bench_remote.BASELINE_HELP)
    parser.add_argument("--rate", type=float, default=40.0, help="upstream Mbit/s")
    parser.add_argument(
        "--down-rate", type=float, default=0.0, help="downstream Mbit/s (0: unlimited)"
    )
    parser.add_argument("--rtt", type=float, default=80.0, help="round trip, ms")
    parser.add_argument("--cut-every", type=float, default=6.0, help="flaky case: seconds")
    parser.add_argument("--photos", type=int, default=120)
    parser.add_argument("--photo-size", type=parse_size, default=parse_size("600KB"))
    parser.add_argument("--video-size", type=parse_size, default=parse_size("30MB"))
    parser.add_argument("--flaky-photos", type=int, default=40)
    parser.add_argument("--flaky-video-size", type=parse_size, default=parse_size("120MB"))
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds before a run is killed"
    )
    parser.add_argument("--pf-video-size", type=parse_size, default=parse_size("1GB"))
    parser.add_argument("--pf-photos", type=int, default=8, help="photos landing during it")
    parser.add_argument("--pf-photo-size", type=parse_size, default=parse_size("5MB"))
    parser.add_argument("--pf-every", type=float, default=5.0, help="seconds between photos")
    args = parser.parse_args()
    comparing = set(args.cases) - {"photos-first"} and "rclone" in args.tools
    if comparing and shutil.which("rclone") is None:
        parser.error("rclone not found: install Debian's rclone")
    if args.rate <= 0 or args.rtt < 0 or args.cut_every <= 0:
        parser.error("--rate and --cut-every must be > 0, --rtt >= 0")
    bench_remote.RUN_TIMEOUT = args.timeout  # the launcher kills a run after this long
    print(bench_remote.versions())
    print(f"CPUs: {os.cpu_count()} (usable by this process: {len(os.sched_getaffinity(0))})")
    base = Path(tempfile.mkdtemp(prefix="skyframe-bench-link-"))
    results: list[Result] = []
    latency: list[PhotoTimes] = []
    try:
        with bench_remote.sigterm_as_interrupt(), contextlib.ExitStack() as stack:
            launcher = Launcher()  # before this process grows: see bench_remote.LAUNCHER
            stack.callback(launcher.close)
            results = bench(args, base, stack, launcher, latency)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if results:
        print_summary(results)
    print(f"CPUs: {os.cpu_count()}")
    failed = any(r.problem for r in latency)
    if failed or any(result.failed(tool) for result in results for tool in result.tools):
        print("\n!!!!! SOME RUNS FAILED: see the messages above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
