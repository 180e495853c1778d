"""Processes run on a Dask cluster (``executors:``), rules and everything else at the station.

A process marked ``executor: NAME`` is sent to the cluster with what it needs: the file's bytes
(``ship: bytes``, the default) or its path (``ship: path``, when the workers see the same
storage), the job's remote name and metadata. The worker runs the process on a job of its
own and sends back the remote name, the metadata and the derived files' bytes; the station
applies them to its job and delivers as usual. The queue and the manifest stay at the
station: a call that fails or times out (the cluster slow, gone, a worker killed) fails the
job's attempt, which is retried with the job's backoff, then dead-lettered with the error.

A finished call's result is kept in the state directory (``executor-results/``) for a day, so
a station restarted before the job is delivered does not run the process again for the same
version of the file.

The cluster must be one the station trusts: Dask moves tasks and results with pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skyframe.errors import DeliveryError, ProcessError, SkyframeError
from skyframe.events import FileEvent, Job

if TYPE_CHECKING:
    from skyframe.config import ExecutorConfig
    from skyframe.registry import BoundStep

log = logging.getLogger(__name__)

RESULTS = "executor-results"  #: in the state directory
RESULTS_KEPT = 86400.0  #: seconds a result is kept
CONNECT_TIMEOUT = 30.0  #: seconds to reach a scheduler


class ExecutorError(DeliveryError):
    """The cluster did not run the process (gone, slow, a worker lost): retried with backoff."""


class ExecutorUnavailable(SkyframeError):
    """The executor cannot be used at all (its package is not installed)."""


@dataclass
class Outcome:
    """What a process did to a job, as sent back by a worker."""

    remote_name: str
    meta: dict[str, Any]
    derived: list[tuple[str, bool, bytes]]  #: (remote name or suffix, beside, content)


def run_remotely(func: Any, options: dict[str, Any], payload: dict[str, Any]) -> Outcome:
    """On a worker: ``func(job, **options)`` on a job made from ``payload``; what it did."""
    with tempfile.TemporaryDirectory(prefix="skyframe-task-") as folder:
        base = Path(folder)
        data = payload.get("data")
        if data is not None:
            path = base / "in" / Path(payload["relpath"]).name
            path.parent.mkdir()
            path.write_bytes(data)
            mtime = payload["mtime_ns"]
            os.utime(path, ns=(mtime, mtime))
        else:
            path = Path(payload["path"])
        event = FileEvent(
            payload["pipeline"],
            path,
            payload["relpath"],
            payload["size"],
            payload["mtime_ns"],
            payload["kind"],
            payload["inode"],
        )
        job = Job(event, base / "scratch", payload["remote_name"], dict(payload["meta"]))
        func(job, **options)
        derived = [(d.remote_name, d.beside, d.path.read_bytes()) for d in job.derived]
        return Outcome(job.remote_name, job.meta, derived)


class DaskExecutor:
    """One ``executors:`` entry: a Dask client, connected on first use (and again after the
    cluster was lost), and the results it kept."""

    def __init__(self, name: str, config: ExecutorConfig, state_dir: Path) -> None:
        self.name = name
        self.config = config
        self.state_dir = state_dir
        self.results = state_dir / RESULTS
        self._lock = threading.Lock()
        self._client: Any = None
        self._cluster: Any = None
        self._in_flight = 0
        self._last_error = ""

    # --- the cluster ------------------------------------------------------------------------

    def _connect(self) -> Any:
        with self._lock:
            if self._client is not None and self._client.status == "running":
                return self._client
            try:
                from distributed import Client, LocalCluster
            except ImportError:
                raise ExecutorUnavailable(
                    f"executor {self.name}: Dask is not installed: pip install 'skyframe[dask]'"
                ) from None
            self._close_client()
            address = self.config.dask
            try:
                if address == "local":
                    self._cluster = LocalCluster(
                        n_workers=self.config.workers,
                        threads_per_worker=1,
                        processes=True,
                        # Its scheduler serves HTTP whatever this says (None: port 8787,
                        # where a second cluster, or Jupyter, meets a port in use): any free
                        # port, on loopback only.
                        dashboard_address="127.0.0.1:0",
                        # the workers' scratch space in the state directory, not the system's
                        local_directory=str(self.state_dir / "dask-workers"),
                    )
                    self._client = Client(self._cluster, timeout=CONNECT_TIMEOUT)
                else:
                    self._client = Client(address, timeout=CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                self._close_client()
                self._last_error = str(exc) or type(exc).__name__
                raise ExecutorError(
                    f"executor {self.name}: cannot reach {address}: {self._last_error}"
                ) from None
            log.info("executor %s: connected to %s", self.name, self._client.scheduler.address)
            return self._client

    def _close_client(self) -> None:
        client, cluster = self._client, self._cluster
        self._client = self._cluster = None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close(timeout=5)
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close(timeout=5)

    def close(self) -> None:
        """Disconnect (and stop a local cluster)."""
        with self._lock:
            self._close_client()

    def status(self) -> dict[str, Any]:
        """For the status document: address, connected, workers, calls in flight."""
        client = self._client
        connected = client is not None and client.status == "running"
        workers = 0
        if connected:
            with contextlib.suppress(Exception):
                workers = len(client.scheduler_info(n_workers=-1).get("workers", {}))
        return {
            "name": self.name,
            "kind": "dask",
            "address": self.config.dask,
            "connected": connected,
            "workers": workers,
            "in_flight": self._in_flight,
            "last_error": self._last_error or None,
        }

    # --- one call ---------------------------------------------------------------------------

    def run(self, step: BoundStep, job: Job, index: int) -> None:
        """``step`` on ``job`` on the cluster (or its kept result); the outcome applied."""
        key = self._key(step, job, index)
        outcome = self._kept(key)
        if outcome is None:
            outcome = self._call(step, job)
            self._keep(key, outcome)
        job.remote_name = outcome.remote_name
        job.meta.clear()
        job.meta.update(outcome.meta)
        for number, (name, beside, data) in enumerate(outcome.derived):
            job.scratch_dir.mkdir(parents=True, exist_ok=True)
            local = job.scratch_dir / f"{self.name}-{index}-{number}"
            local.write_bytes(data)
            job.add_file(name, local, beside=beside)

    def _call(self, step: BoundStep, job: Job) -> Outcome:
        event = job.event
        if self.config.ship == "bytes" and event.size > self.config.max_ship:
            raise ProcessError(
                f"executor {self.name}: {step.name}: {event.relpath} is {event.size:,} bytes, "
                f"more than max_ship ({self.config.max_ship:,}): use ship: path"
            )
        client = self._connect()
        payload = {
            "pipeline": event.pipeline,
            "relpath": event.relpath,
            "path": str(event.path),
            "size": event.size,
            "mtime_ns": event.mtime_ns,
            "kind": event.kind,
            "inode": event.inode,
            "remote_name": job.remote_name,
            "meta": job.meta,
            "data": None if self.config.ship == "path" else event.path.read_bytes(),
        }
        func = step.spec.func
        _by_value(func)
        with self._lock:
            self._in_flight += 1
        try:
            future = client.submit(
                run_remotely, func, dict(step.options), payload, pure=False, retries=0
            )
            try:
                result: Outcome = future.result(timeout=self.config.timeout)
            except BaseException:
                future.cancel()  # a task that took too long, or whose answer got lost
                raise
            finally:
                future.release()
        except (ProcessError, ExecutorError):
            raise
        except Exception as exc:
            raise self._failure(step, exc) from None
        finally:
            with self._lock:
                self._in_flight -= 1
        self._last_error = ""
        return result

    def _failure(self, step: BoundStep, exc: Exception) -> Exception:
        from distributed import TimeoutError as DaskTimeout

        name = type(exc).__name__
        if isinstance(exc, TimeoutError | DaskTimeout):
            why = f"no result within {self.config.timeout:g} s"
        elif name in ("KilledWorker", "CommClosedError", "CancelledError", "FutureCancelledError"):
            why = f"the cluster lost the task ({name}: {exc})"
        elif isinstance(exc, OSError):
            why = f"the cluster is unreachable ({exc})"
        else:  # the process itself raised, on the worker: retried like a process at the station
            return exc
        self._last_error = why
        return ExecutorError(f"executor {self.name}: {step.name}: {why}")

    # --- kept results -----------------------------------------------------------------------

    @staticmethod
    def _key(step: BoundStep, job: Job, index: int) -> str:
        event = job.event
        identity = json.dumps(
            [event.pipeline, event.relpath, event.size, event.mtime_ns, index, step.name,
             sorted((k, repr(v)) for k, v in step.options.items()), job.remote_name],
        )  # fmt: skip
        return hashlib.sha256(identity.encode()).hexdigest()[:32]

    def _kept(self, key: str) -> Outcome | None:
        folder = self.results / key
        try:
            found = json.loads((folder / "outcome.json").read_text(encoding="utf-8"))
            derived = [
                (entry["name"], bool(entry["beside"]), (folder / f"{n}.bin").read_bytes())
                for n, entry in enumerate(found["derived"])
            ]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        log.info("executor %s: the result of an earlier call is reused", self.name)
        return Outcome(found["remote_name"], found["meta"], derived)

    def _keep(self, key: str, outcome: Outcome) -> None:
        """Written whole into a new folder, then renamed in place."""
        staging: Path | None = None
        try:
            self.results.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".new-", dir=self.results))
            for number, (_, _, data) in enumerate(outcome.derived):
                (staging / f"{number}.bin").write_bytes(data)
            record = {
                "remote_name": outcome.remote_name,
                "meta": outcome.meta,
                "derived": [{"name": n, "beside": b} for n, b, _ in outcome.derived],
                "at": time.time(),
            }
            (staging / "outcome.json").write_text(json.dumps(record), encoding="utf-8")
            os.replace(staging, self.results / key)
        except (OSError, TypeError, ValueError) as exc:  # metadata JSON cannot hold: not kept
            log.warning("executor %s: a result is not kept (%s)", self.name, exc)
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)


def forget_results(state_dir: Path, older_than: float) -> int:
    """Remove kept results older than ``older_than`` seconds (their jobs were delivered, or
    left); how many."""
    folder = state_dir / RESULTS
    removed = 0
    cutoff = time.time() - older_than
    with contextlib.suppress(FileNotFoundError):
        for entry in folder.iterdir():
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry)
                    removed += 1
    return removed


def _by_value(func: Any) -> None:
    """A process from the project's own files (not importable on the workers) travels with
    its code; one from an installed package is imported there."""
    module = getattr(func, "__module__", "") or ""
    if module.startswith("_skyframe_user") and module in sys.modules:
        import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[module])
