"""Processes on a Dask cluster (``executors:``): a real ``distributed.LocalCluster`` of worker
processes, and a scheduler and workers started as processes of their own on loopback."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO, Daemon, run_once, skyframe, tree_files, wait_for, write_plugin

from skyframe.client import status_lines

DRONE = REPO / "tests" / "data" / "drone"
PHOTOS = sorted((DRONE / "ebee-snowpeak").glob("*.JPG")) + sorted(
    (DRONE / "gps-camera").glob("*.jpg")
)
BIN = Path(sys.executable).parent

STEPS = """\
import os
import time
from pathlib import Path

from skyframe import process


@process
def process_stamp(job, delay: float = 0.0):
    \"\"\"Say where it ran (a derived file), after ``delay`` seconds; count its calls.\"\"\"
    with open(os.environ["SKYFRAME_TEST_CALLS"], "a") as calls:
        calls.write(job.relpath + "\\n")
    time.sleep(delay)
    job.meta["ran_in"] = os.getpid()
    job.add_file(".where.txt", str(os.getpid()).encode(), beside=True)
"""


def project(folder: Path, executor: str | None, *, photos: int = 3, delay: float = 0.0,
            address: str = "local", attempts: int = 30) -> Path:  # fmt: skip
    """Photos in ``incoming``; geotag here, thumbnail and stamp on ``executor`` (or here)."""
    (folder / "incoming").mkdir(parents=True)
    for photo in PHOTOS[:photos]:
        shutil.copyfile(photo, folder / "incoming" / photo.name)
    write_plugin(folder, "steps.py", STEPS)
    on = f", executor: {executor}" if executor else ""
    config = folder / "skyframe.yaml"
    config.write_text(
        f"""\
state_dir: state
plugins: [steps.py]
retry: {{max_attempts: {attempts}, initial: 200ms, max: 1s}}
executors:
  cluster: {{dask: "{address}", workers: 2, timeout: 60s}}
pipelines:
  - name: survey
    source: {{path: incoming, settle: 0, rescan: 1h}}
    processes:
      - geotag
      - thumbnail: {{max_px: 128{on}}}
      - stamp: {{delay: {delay}{on}}}
    sinks:
      - url: outbox
""",
        encoding="utf-8",
    )
    return config


@pytest.fixture
def calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file each call of the stamp process adds a line to (workers inherit the variable)."""
    path = tmp_path / "calls.txt"
    path.touch()
    monkeypatch.setenv("SKYFRAME_TEST_CALLS", str(path))
    # The workers' temporary files (a killed one leaves its task's) and Dask's scratch space
    # go under the test's folder, removed with it.
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # this process's Dask scheduler
    return path


def test_a_local_cluster_gives_what_the_station_gives(tmp_path: Path, calls: Path) -> None:
    here = run_once(project(tmp_path / "here", None))
    there = run_once(project(tmp_path / "there", "cluster"))
    assert (here.delivered, there.delivered) == (3, 3)
    mine, theirs = (
        tree_files(tmp_path / "here" / "outbox"),
        tree_files(tmp_path / "there" / "outbox"),
    )
    assert sorted(mine) == sorted(theirs)
    assert len(mine) == 9  # each photo, its thumbnail, its stamp
    for name, data in mine.items():
        if name.endswith(".where.txt"):
            assert data == str(os.getpid()).encode()  # ran here
            assert theirs[name] != data  # ran in a worker process
        else:
            assert theirs[name] == data, name  # the same photo, the same thumbnail


def test_a_local_cluster_leaves_dasks_default_port_alone(tmp_path: Path, calls: Path) -> None:
    # Its scheduler serves HTTP even without a dashboard: on 8787 it met a port in use (a
    # second cluster, Jupyter), warned, and left the socket it tried with unclosed.
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):  # in use already: as good
            taken.bind(("127.0.0.1", 8787))
            taken.listen()
        summary = run_once(project(tmp_path, "cluster", photos=1))
    assert summary.delivered == 1


def test_config_errors_name_the_step(tmp_path: Path, calls: Path) -> None:
    config = project(tmp_path, "nowhere")
    done = skyframe(tmp_path, "validate", "skyframe.yaml")
    assert done.returncode == 2
    assert done.stderr.startswith("skyframe: error: skyframe.yaml:11:")
    assert done.stderr.strip().endswith(
        ": pipelines[0].processes[1].thumbnail.executor: no executor 'nowhere' (executors: cluster)"
    )
    text = config.read_text().replace(
        "    processes:\n",
        "    rules:\n      - size: {min: 1, executor: cluster}\n    processes:\n",
    )
    config.write_text(text.replace("nowhere", "cluster"), encoding="utf-8")
    done = skyframe(tmp_path, "validate", "skyframe.yaml")
    assert done.returncode == 2
    assert "rules always run at the station: executor is for processes" in done.stderr


# --- a scheduler and workers of their own ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Cluster:
    """``dask scheduler`` and ``dask worker`` processes on loopback, each stopped at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "tmp").mkdir(exist_ok=True)  # the processes' TMPDIR
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._logs = 0

    def _start(self, *args: str) -> subprocess.Popen[bytes]:
        self._logs += 1
        log = self.folder / f"dask-{self._logs}.log"
        with log.open("wb") as out:
            return subprocess.Popen(
                [str(BIN / "dask"), *args],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "TMPDIR": str(self.folder / "tmp")},
            )

    def start_scheduler(self) -> None:
        self.scheduler = self._start(
            "scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"
        )
        wait_for(self._listening, timeout=60, what=f"the Dask scheduler on {self.address}")

    def _listening(self) -> bool:
        assert self.scheduler is not None
        if self.scheduler.poll() is not None:
            pytest.fail(f"the Dask scheduler ended: {self._tail()}")
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def start_worker(self) -> subprocess.Popen[bytes]:
        worker = self._start(
            "worker", self.address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
            "--name", f"w{len(self.workers)}",
        )  # fmt: skip
        self.workers.append(worker)
        return worker

    def _tail(self) -> str:
        return "".join(
            p.read_text(errors="replace")[-2000:] for p in self.folder.glob("dask-*.log")
        )

    def stop(self, process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, sig)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def close(self) -> None:
        for process in [*self.workers, self.scheduler]:
            self.stop(process)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    if not (BIN / "dask").exists():
        pytest.fail(f"{BIN / 'dask'} is missing: .ci/setup installs distributed")
    made = Cluster(tmp_path)
    try:
        yield made
    finally:
        made.close()


def delivered_once(daemon: Daemon, names: list[str]) -> bool:
    return all(daemon.recorder.count("delivered", name) == 1 for name in names)


def test_a_worker_killed_and_the_scheduler_gone_for_a_while(
    tmp_path: Path, calls: Path, cluster: Cluster
) -> None:
    cluster.start_scheduler()
    cluster.start_worker()
    cluster.start_worker()
    config = project(tmp_path / "station", "cluster", photos=3, delay=1.0, address=cluster.address)
    names = [p.name for p in PHOTOS[:3]]
    outbox = tmp_path / "station" / "outbox"
    with Daemon(config) as daemon:
        # A worker killed while it runs a task: the scheduler gives the task to the other.
        wait_for(lambda: calls.read_text().count("\n") >= 1, timeout=120, what="a first call")
        cluster.stop(cluster.workers[0], signal.SIGKILL)
        wait_for(lambda: delivered_once(daemon, names), timeout=180, what="the first photos")
        status = daemon.engine.status()["executors"][0]
        assert (status["name"], status["connected"], status["workers"]) == ("cluster", True, 1)
        shown = status_lines(daemon.engine.status())
        assert (
            f"executor cluster: dask {cluster.address}, connected, 1 worker(s), 0 call(s) in flight"
            in shown
        )

        # The scheduler gone for longer than the retry interval: the files wait, then go.
        cluster.stop(cluster.scheduler)
        cluster.stop(cluster.workers[1])
        late = PHOTOS[3:5]
        assert len(late) == 2
        for photo in late:
            shutil.copyfile(photo, tmp_path / "station" / "incoming" / photo.name)
        wait_for(lambda: daemon.recorder.count("failed") >= 1, timeout=120, what="a failed try")
        time.sleep(2)
        assert not any((outbox / photo.name).exists() for photo in late)
        cluster.start_scheduler()
        cluster.start_worker()
        every = names + [p.name for p in late]
        wait_for(lambda: delivered_once(daemon, every), timeout=180, what="the late photos")
    for name in every:
        assert (outbox / name).exists()
        assert (outbox / f"{name}.thumb.jpg").exists()
        stamp = (outbox / f"{name}.where.txt").read_bytes()
        assert re.fullmatch(rb"\d+", stamp)
        assert stamp != str(os.getpid()).encode()
    assert all(daemon.recorder.count("dead-lettered", name) == 0 for name in every)


def test_a_result_is_not_computed_again_after_a_restart(tmp_path: Path, calls: Path) -> None:
    config = project(tmp_path, "cluster", photos=1, attempts=1)
    name = PHOTOS[0].name
    (tmp_path / "outbox").write_text("a file where the sink's folder should be")
    first = run_once(config)  # the stamp runs on the cluster, then the delivery fails
    assert (first.delivered, first.dead_letters) == (0, 1)
    assert calls.read_text().splitlines() == [name]
    (tmp_path / "outbox").unlink()
    again = skyframe(tmp_path, "queue", "retry", "-c", "skyframe.yaml", name)
    assert again.returncode == 0, again.stderr
    second = run_once(config)  # a new engine, as after a restart: the result was kept
    assert second.delivered == 1
    assert calls.read_text().splitlines() == [name]  # not called again
    assert (tmp_path / "outbox" / f"{name}.where.txt").exists()
    assert (tmp_path / "outbox" / f"{name}.thumb.jpg").exists()


def test_a_file_too_large_to_ship_is_dead_lettered_with_the_reason(
    tmp_path: Path, calls: Path
) -> None:
    config = project(tmp_path, "cluster", photos=1)
    config.write_text(
        config.read_text().replace("timeout: 60s}", "timeout: 60s, max_ship: 1kB}"),
        encoding="utf-8",
    )
    summary = run_once(config)
    assert (summary.delivered, summary.dead_letters) == (0, 1)
    (reason,) = summary.failed.values()
    assert reason.startswith(f"executor cluster: thumbnail: {PHOTOS[0].name} is ")
    assert reason.endswith("more than max_ship (1,000): use ship: path")
    assert calls.read_text() == ""
