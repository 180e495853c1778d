"""Benchmark of watch mode on a local sink: latency, throughput, queue speed, memory.

Prints, for small files with settle 0:
- event-to-delivered latency p50 / p99 (file closed -> delivered event), at a steady rate;
- sustained end-to-end files per second for a burst;
- JobQueue operations per second (put, claim, complete);
- the daemon's peak RSS while it works through a backlog of queued jobs (10,000 and 100,000);
- the peak RSS of a one-shot run (``skyframe run --once``) over 100,000 files.

Run from the repository root:  .venv/bin/python bench/bench_daemon.py [--backlog 100000]
Everything lives in a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

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
api: {listen: "127.0.0.1:0"}  # served as usual, on a free port: runs never collide
pipelines:
  - name: bench
    source: {path: incoming, settle: 0, rescan: 1h}
    sinks:
      - url: outbox
        concurrency: 4
"""


def make_project(root: Path) -> None:
    (root / "incoming").mkdir(parents=True)
    (root / "plugins").mkdir()
    (root / "plugins" / "recorder.py").write_text(textwrap.dedent(RECORDER))
    (root / "skyframe.yaml").write_text(CONFIG)


def start(root: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "skyframe", "run", "skyframe.yaml"],
        cwd=root,
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


def bench_latency(base: Path, files: int, rate: float) -> tuple[float, float]:
    root = base / "latency"
    make_project(root)
    proc = start(root)
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


def bench_throughput(base: Path, files: int) -> float:
    root = base / "throughput"
    make_project(root)
    proc = start(root)
    try:
        began = time.time()
        for i in range(files):
            (root / "incoming" / f"f{i:06}.jpg").write_bytes(os.urandom(4096))
        done = wait_delivered(root, files, 600)
    finally:
        stop(proc)
    return files / (max(done.values()) - began)


def bench_queue(base: Path, jobs: int) -> float:
    from skyframe.events import FileEvent
    from skyframe.jobs import Upload
    from skyframe.queue import JobQueue

    queue = JobQueue(base / "queue-bench")
    began = time.perf_counter()
    for i in range(jobs):
        event = FileEvent("bench", base / f"f{i}.jpg", f"f{i}.jpg", i, i)
        queue.put("bench", Upload(event=event, accepted=True), f"{i}")
    for _ in range(jobs):
        claim = queue.claim()
        assert claim is not None
        queue.complete(claim)
    elapsed = time.perf_counter() - began
    queue.close()
    return 3 * jobs / elapsed


def make_backlog(root: Path, files: int) -> None:
    """A project whose source holds ``files`` files of 100 bytes, 1,000 per folder."""
    make_project(root)
    for i in range(files):
        folder = root / "incoming" / f"d{i // 1000:03}"
        if i % 1000 == 0:
            folder.mkdir()
        (folder / f"f{i:06}.jpg").write_bytes(b"x" * 100)


def bench_backlog(base: Path, backlog: int) -> tuple[float, int, float]:
    """Peak RSS of a daemon started on `backlog` files (all queued by its catch-up scan)."""
    root = base / f"backlog-{backlog}"
    make_backlog(root, backlog)
    proc = start(root)
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
        rate = backlog / (time.time() - began)
    finally:
        stop(proc)
    return rss, max_queued, rate


# ru_maxrss starts at the peak RSS of the process that started the child (exec records the old
# memory map's high-water mark): this process held a queue of its own (bench_queue), so the
# one-shot run is started from a small helper that stays at about 10 MB.
PEAK_RSS = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def bench_once(base: Path, files: int) -> tuple[float, float]:
    """Peak RSS (MB) of ``skyframe run --once`` over ``files`` new files, and files per second
    (start-up included)."""
    root = base / f"once-{files}"
    make_backlog(root, files)
    command = [sys.executable, "-m", "skyframe", "-q", "run", "--once", "skyframe.yaml"]
    began = time.time()
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", PEAK_RSS, *command],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    )
    elapsed = time.time() - began
    code, maxrss_kb = (int(field) for field in out.stdout.split())
    delivered = sum(1 for path in (root / "outbox").rglob("*") if path.is_file())
    if code != 0 or delivered != files:
        raise RuntimeError(f"run --once exited {code}, {delivered} of {files} delivered")
    return maxrss_kb / 1024, files / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-files", type=int, default=300)
    parser.add_argument("--rate", type=float, default=50.0, help="files per second for latency")
    parser.add_argument("--burst", type=int, default=5000)
    parser.add_argument("--queue-jobs", type=int, default=20000)
    parser.add_argument("--backlog", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument(
        "--once-files", type=int, nargs="*", default=[100_000], help="files for run --once"
    )
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="skyframe-bench-"))
    try:
        p50, p99 = bench_latency(base, args.latency_files, args.rate)
        print(
            f"latency (settle 0, {args.latency_files} files at {args.rate:.0f}/s): "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        )
        rate = bench_throughput(base, args.burst)
        print(f"throughput ({args.burst} x 4 KB burst, local sink): {rate:.0f} files/s")
        ops = bench_queue(base, args.queue_jobs)
        print(f"queue: {ops:.0f} operations/s (put, claim, complete; {args.queue_jobs} jobs)")
        for backlog in args.backlog:
            rss, queued, drain = bench_backlog(base, backlog)
            print(
                f"backlog {backlog} files: peak RSS {rss:.0f} MB "
                f"(up to {queued} queued), drained at {drain:.0f} files/s"
            )
        for files in args.once_files:
            rss, rate = bench_once(base, files)
            print(f"run --once over {files} files: peak RSS {rss:.0f} MB, {rate:.0f} files/s")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
