"""Benchmark of watch mode on a local sink: latency, throughput, queue speed, memory.

Prints, for small files with settle 0:
- event-to-delivered latency p50 / p99 (file closed -> delivered event), at a steady rate;
- sustained end-to-end files per second for a burst;
- JobQueue operations per second (put, claim, complete);
- the daemon's peak RSS while it works through a backlog of queued jobs (10,000 and 100,000);
- the peak RSS of a one-shot run (``skyframe run --once``) over 100,000 files.

The daemon runs as a subprocess (``python -m skyframe run skyframe.yaml``, 4 workers, a local
sink of concurrency 4, the API on a free port), with a small plugin that records the time of
every ``delivered`` event. Latency is measured from the writer's close to that event;
throughput from the first write of the burst to the last delivery. The backlog runs create the
files first (once per size, shared by the runs) and start the daemon on them, so its catch-up
scan queues them all while the workers deliver; peak RSS is the daemon's ``VmHWM``, the drain
rate counts from the daemon's start to the last delivery. The one-shot run's peak RSS is
``ru_maxrss`` from ``os.wait4`` of a small helper that starts it, and its rate counts
start-up. The queue operations run in a fresh interpreter each time, on a
queue of its own, with the job record the engine queues for a new file.

skyframe's bytecode is written before the runs (as for an installed copy). Before each run the
disk is synced and the harness waits until the CPUs have been idle for two seconds
(`machine.py`), so that no run pays for the write-back of the files an earlier one (or the
set-up) wrote, nor starts while other work keeps the machine busy.

``--baseline DIR`` compares the current code with the code of checkout DIR (e.g. a
``git worktree`` of an earlier commit; see ``baseline.py``): every case runs both in turn,
base then current, ``--runs`` times each (``--long-runs`` for the 100,000-file cases), and a
table gives each figure's median and spread (min-max) for both and the ratio of the medians,
oriented so that >= 0.95 means "current not more than 5% slower": base / current for times,
current / base for rates; for peak RSS it is current / base (<= 1.05: at most 5% more). Without
it, each case runs once (``--runs``) on the current code, as before.

Run from the repository root:

    .venv/bin/python bench/bench_daemon.py [--backlog 10000 100000] [--once-files 100000]
        [--baseline DIR] [--runs N] [--long-runs N] [--cases latency,burst,queue,backlog,once]

Everything lives in a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import baseline
import machine
from baseline import Code

CASES = ("latency", "burst", "queue", "backlog", "once")
LONG_CASE = 100_000  #: a backlog or one-shot run of this many files or more is a long case

RECORDER = """
import json, threading, time
from skyframe import hookimpl

_lock = threading.Lock()
_out = open("deliveries.jsonl", "a", buffering=1)

@hookimpl
def skyframe_event(event):
    if event.kind == "delivered":
        with _lock:
            _out.write(json.dumps({"relpath": event.relpath, "t": time.time()}) + "\\n")
"""

CONFIG = """\
state_dir: .state
plugins: [plugins]
workers: 4
api: {{listen: "127.0.0.1:0"}}  # served as usual, on a free port: runs never collide
pipelines:
  - name: bench
    source: {{path: {source}, settle: 0, rescan: 1h}}
    sinks:
      - url: outbox
        concurrency: 4
"""


def parse_cases(text: str) -> list[str]:
    cases = [case.strip() for case in text.split(",") if case.strip()]
    wrong = [case for case in cases if case not in CASES]
    if not cases or wrong:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(CASES)}: got {text!r}")
    return cases


def make_project(root: Path, source: Path | None = None) -> None:
    """A project in ``root`` whose source is ``root/incoming``, or ``source`` when given."""
    root.mkdir(parents=True)
    if source is None:
        (root / "incoming").mkdir()
    (root / "plugins").mkdir()
    (root / "plugins" / "recorder.py").write_text(textwrap.dedent(RECORDER))
    path = "incoming" if source is None else json.dumps(str(source))
    (root / "skyframe.yaml").write_text(CONFIG.format(source=path))


def quiesce() -> None:
    """Let the disk and the machine settle before a run: what the set-up and earlier runs
    wrote would otherwise be written back during the next run, by the kernel on the same two
    cores, and other work on the machine would slow down whichever run overlaps it (see
    `machine.wait_until_quiet`)."""
    waited = machine.wait_until_quiet()
    if waited >= 1:
        print(f"  (waited {waited:.0f} s for the machine to be quiet)", flush=True)


def start(root: Path, code: Code) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "skyframe", "run", "skyframe.yaml"],
        cwd=root,
        env=code.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # the "watching ..." banner: signal handlers are installed
    while b"warning:" in line:  # say, an installed plugin that does not load: shown, not fatal
        sys.stderr.write(line.decode(errors="replace"))
        line = proc.stderr.readline()
    if b"watching" not in line:
        raise RuntimeError(f"daemon did not start: {line!r}")
    time.sleep(0.3)  # catch-up scan of an empty folder, observers running
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def deliveries(root: Path) -> dict[str, float]:
    path = root / "deliveries.jsonl"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        out[record["relpath"]] = record["t"]
    return out


def wait_delivered(root: Path, count: int, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = deliveries(root)
        if len(done) >= count:
            return done
        time.sleep(0.05)
    raise RuntimeError(f"only {len(deliveries(root))} of {count} delivered in {timeout}s")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def bench_latency(root: Path, code: Code, files: int, rate: float) -> tuple[float, float]:
    make_project(root)
    quiesce()
    proc = start(root, code)
    closed: dict[str, float] = {}
    try:
        for i in range(files):
            name = f"f{i:05}.jpg"
            with (root / "incoming" / name).open("wb") as f:
                f.write(os.urandom(4096))
            closed[name] = time.time()
            time.sleep(1 / rate)
        done = wait_delivered(root, files, 60)
    finally:
        stop(proc)
    latencies = sorted((done[n] - closed[n]) * 1000 for n in closed)
    return statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1]


def bench_throughput(root: Path, code: Code, files: int) -> float:
    make_project(root)
    quiesce()
    proc = start(root, code)
    try:
        began = time.time()
        for i in range(files):
            (root / "incoming" / f"f{i:06}.jpg").write_bytes(os.urandom(4096))
        done = wait_delivered(root, files, 600)
    finally:
        stop(proc)
    return files / (max(done.values()) - began)


# Run by each version's interpreter: the record queued is the one the engine queues for a new
# file (a typed `Upload` since fe878fa, the same JSON payload built by the engine before).
QUEUE_BENCH = """
import sys, time
from pathlib import Path
from skyframe.events import FileEvent
from skyframe.queue import JobQueue
try:
    from skyframe.jobs import Upload
except ImportError:
    Upload = None

folder, jobs = Path(sys.argv[1]), int(sys.argv[2])
queue = JobQueue(folder)
began = time.perf_counter()
for i in range(jobs):
    event = FileEvent("bench", folder / f"f{i}.jpg", f"f{i}.jpg", i, i)
    if Upload is not None:
        queue.put("bench", Upload(event=event, accepted=True), f"{i}")
    else:
        payload = {"action": "upload", "event": event.to_json(), "accepted": True}
        queue.put("bench", event.relpath, payload, f"{i}")
for _ in range(jobs):
    claim = queue.claim()
    assert claim is not None
    queue.complete(claim)
elapsed = time.perf_counter() - began
queue.close()
print(3 * jobs / elapsed)
"""


def bench_queue(folder: Path, code: Code, jobs: int) -> float:
    quiesce()
    out = subprocess.run(
        [sys.executable, "-c", QUEUE_BENCH, str(folder), str(jobs)],
        cwd=folder.parent,
        env=code.env,
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout)


def make_backlog(source: Path, files: int) -> None:
    """A source folder holding ``files`` files of 100 bytes, 1,000 per folder."""
    for i in range(files):
        folder = source / f"d{i // 1000:03}"
        if i % 1000 == 0:
            folder.mkdir(parents=True)
        (folder / f"f{i:06}.jpg").write_bytes(b"x" * 100)


def bench_backlog(root: Path, code: Code, source: Path, backlog: int) -> tuple[float, int, float]:
    """Peak RSS of a daemon started on `backlog` files (all queued by its catch-up scan)."""
    make_project(root, source)
    quiesce()
    proc = start(root, code)
    max_queued = 0
    try:
        began = time.time()
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            delivered = len(deliveries(root))
            max_queued = max(max_queued, backlog - delivered)
            if delivered >= backlog:
                break
            time.sleep(1)
        rss = peak_rss_mb(proc.pid)
        done = deliveries(root)
        # Timed to the last delivery, not to the poll that saw it (a second is 5% of 10,000).
        finished = max(done.values()) if len(done) >= backlog else time.time()
        rate = backlog / (finished - began)
    finally:
        stop(proc)
    return rss, max_queued, rate


# ru_maxrss starts at the peak RSS of the process that started the child (exec records the old
# memory map's high-water mark): the one-shot run is started from a small helper that stays at
# about 10 MB, whatever this process holds.
PEAK_RSS = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def bench_once(root: Path, code: Code, source: Path, files: int) -> tuple[float, float]:
    """Peak RSS (MB) of ``skyframe run --once`` over ``files`` new files, and files per second
    (start-up included)."""
    make_project(root, source)
    command = [sys.executable, "-m", "skyframe", "-q", "run", "--once", "skyframe.yaml"]
    quiesce()
    began = time.time()
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", PEAK_RSS, *command],
        cwd=root,
        env=code.env,  # -I keeps it from the helper, not from the run it starts
        check=True,
        capture_output=True,
        text=True,
    )
    elapsed = time.time() - began
    exit_code, maxrss_kb = (int(field) for field in out.stdout.split())
    delivered = sum(1 for path in (root / "outbox").rglob("*") if path.is_file())
    if exit_code != 0 or delivered != files:
        raise RuntimeError(f"run --once exited {exit_code}, {delivered} of {files} delivered")
    return maxrss_kb / 1024, files / elapsed


# --------------------------------------------------------------------------------------------
# Figures over runs and versions

Kind = Literal["time", "rate", "memory"]


@dataclasses.dataclass
class Figure:
    """One figure's values, per version label, in run order."""

    name: str
    unit: str
    kind: Kind  # time: lower is better; rate: higher is better; memory: peak RSS
    values: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def median(self, label: str) -> float | None:
        found = self.values.get(label)
        return statistics.median(found) if found else None

    def ratio(self) -> float | None:
        """>= 0.95 for times and rates: current at most 5% slower than base; for memory,
        current / base (<= 1.05: at most 5% more)."""
        current, base = self.median("current"), self.median("base")
        if not current or not base:
            return None
        return base / current if self.kind == "time" else current / base

    def verdict(self) -> str:
        ratio = self.ratio()
        if ratio is None:
            return ""
        if self.kind == "memory":
            return "ok" if ratio <= 1.05 else "MORE MEMORY"
        return "ok" if ratio >= 0.95 else "SLOWER"

    def spread(self, label: str, spec: str) -> str:
        found = self.values.get(label)
        if not found:
            return "n/a"
        median = format(statistics.median(found), spec)
        if len(found) == 1:
            return median
        return f"{median} ({min(found):{spec}}-{max(found):{spec}})"


class Figures:
    def __init__(self) -> None:
        self.figures: dict[str, Figure] = {}

    def add(self, name: str, unit: str, kind: Kind, label: str, value: float) -> None:
        figure = self.figures.setdefault(name, Figure(name, unit, kind))
        figure.values.setdefault(label, []).append(value)

    def print_table(self, codes: list[Code]) -> None:
        labels = [code.label for code in codes]
        title = ", ".join(f"{code.label} = {code.commit}" for code in codes)
        print(f"\n=== medians (min-max) over the runs; {title} ===")
        header = f"{'figure':<34} {'unit':<8}" + "".join(f" {label:>22}" for label in labels)
        if "base" in labels:
            header += f" {'ratio':>6}  verdict"
        print(header)
        for figure in self.figures.values():
            spec = ".1f" if figure.kind == "time" or figure.unit == "MB" else ".0f"
            row = f"{figure.name:<34} {figure.unit:<8}"
            row += "".join(f" {figure.spread(label, spec):>22}" for label in labels)
            if "base" in labels:
                ratio = figure.ratio()
                row += f" {'n/a' if ratio is None else format(ratio, '.2f'):>6}  {figure.verdict()}"
            print(row)
        if "base" in labels:
            print(
                "ratio of the medians: base / current for times, current / base for rates "
                "(>= 0.95: current at most 5% slower); current / base for peak RSS "
                "(<= 1.05: at most 5% more)"
            )


class Session:
    """Runs every case for each version in turn and collects the figures."""

    def __init__(self, args: argparse.Namespace, codes: list[Code], base: Path) -> None:
        self.args = args
        self.codes = codes
        self.base = base
        self.figures = Figures()
        self.labelled = len(codes) > 1 or args.runs > 1 or args.long_runs > 1

    def alternate(self, runs: int, case: Callable[[Code, int], str]) -> None:
        """Run a case `runs` times for each version in turn (base, current, base, ...)."""
        for run in range(runs):
            for code in self.codes:
                line = case(code, run)
                print(f"[{code.label} {run + 1}] {line}" if self.labelled else line, flush=True)

    def latency(self, code: Code, run: int) -> str:
        files, rate = self.args.latency_files, self.args.rate
        root = self.base / f"latency-{code.label}-{run}"
        p50, p99 = bench_latency(root, code, files, rate)
        shutil.rmtree(root)
        self.figures.add("latency p50", "ms", "time", code.label, p50)
        self.figures.add("latency p99", "ms", "time", code.label, p99)
        return (
            f"latency (settle 0, {files} files at {rate:.0f}/s): p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        )

    def throughput(self, code: Code, run: int) -> str:
        files = self.args.burst
        root = self.base / f"throughput-{code.label}-{run}"
        rate = bench_throughput(root, code, files)
        shutil.rmtree(root)
        self.figures.add(f"burst of {files}", "files/s", "rate", code.label, rate)
        return f"throughput ({files} x 4 KB burst, local sink): {rate:.0f} files/s"

    def queue(self, code: Code, run: int) -> str:
        jobs = self.args.queue_jobs
        folder = self.base / f"queue-{code.label}-{run}"
        ops = bench_queue(folder, code, jobs)
        shutil.rmtree(folder, ignore_errors=True)
        self.figures.add(f"queue ops, {jobs} jobs", "ops/s", "rate", code.label, ops)
        return f"queue: {ops:.0f} operations/s (put, claim, complete; {jobs} jobs)"

    def source(self, files: int) -> Path:
        """The backlog's files, made once and shared by the runs (they only read them)."""
        source = self.base / f"data-{files}"
        if not source.exists():
            make_backlog(source, files)
        return source

    def backlog(self, files: int) -> Callable[[Code, int], str]:
        source = self.source(files)

        def case(code: Code, run: int) -> str:
            root = self.base / f"backlog-{files}-{code.label}-{run}"
            rss, queued, drain = bench_backlog(root, code, source, files)
            shutil.rmtree(root)
            self.figures.add(f"backlog {files}: peak RSS", "MB", "memory", code.label, rss)
            self.figures.add(f"backlog {files}: drain rate", "files/s", "rate", code.label, drain)
            return (
                f"backlog {files} files: peak RSS {rss:.0f} MB "
                f"(up to {queued} queued), drained at {drain:.0f} files/s"
            )

        return case

    def once(self, files: int) -> Callable[[Code, int], str]:
        source = self.source(files)

        def case(code: Code, run: int) -> str:
            root = self.base / f"once-{files}-{code.label}-{run}"
            rss, rate = bench_once(root, code, source, files)
            shutil.rmtree(root)
            self.figures.add(f"run --once {files}: peak RSS", "MB", "memory", code.label, rss)
            self.figures.add(f"run --once {files}: rate", "files/s", "rate", code.label, rate)
            return f"run --once over {files} files: peak RSS {rss:.0f} MB, {rate:.0f} files/s"

        return case

    def run(self) -> None:
        args = self.args
        if "latency" in args.cases:
            self.alternate(args.runs, self.latency)
        if "burst" in args.cases:
            self.alternate(args.runs, self.throughput)
        if "queue" in args.cases:
            self.alternate(args.runs, self.queue)
        backlogs = args.backlog if "backlog" in args.cases else []
        once_files = args.once_files if "once" in args.cases else []
        for files in backlogs:
            runs = args.long_runs if files >= LONG_CASE else args.runs
            self.alternate(runs, self.backlog(files))
            if files not in once_files:
                shutil.rmtree(self.source(files))
        for files in once_files:
            runs = args.long_runs if files >= LONG_CASE else args.runs
            self.alternate(runs, self.once(files))
            shutil.rmtree(self.source(files))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--cases",
        type=parse_cases,
        default=list(CASES),
        help=f"which cases to run, comma-separated (default all: {','.join(CASES)})",
    )
    parser.add_argument("--latency-files", type=int, default=300)
    parser.add_argument("--rate", type=float, default=50.0, help="files per second for latency")
    parser.add_argument("--burst", type=int, default=5000)
    parser.add_argument("--queue-jobs", type=int, default=20000)
    parser.add_argument("--backlog", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument(
        "--once-files", type=int, nargs="*", default=[100_000], help="files for run --once"
    )
    baseline.add_argument(
        parser, "also run the code of this checkout, alternately with the current code"
    )
    parser.add_argument(
        "--runs", type=int, help="runs of each version per case (default 1, 3 with --baseline)"
    )
    parser.add_argument(
        "--long-runs",
        type=int,
        help=f"runs of each version for backlogs and one-shot runs of {LONG_CASE:,} files or "
        "more (default 1, 2 with --baseline)",
    )
    args = parser.parse_args()
    compare = args.baseline is not None
    args.runs = args.runs or (3 if compare else 1)
    args.long_runs = args.long_runs or (2 if compare else 1)
    codes = baseline.prepare(args.baseline)
    base = Path(tempfile.mkdtemp(prefix="skyframe-bench-"))
    session = Session(args, codes, base)
    try:
        session.run()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if session.labelled:
        session.figures.print_table(codes)


if __name__ == "__main__":
    main()
