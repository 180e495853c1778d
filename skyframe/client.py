"""The CLI's side of the API: find the daemon of a config and talk to it; render its status."""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from skyframe import locks
from skyframe.config import Config
from skyframe.display import escape
from skyframe.drone import photo_summary
from skyframe.errors import SkyframeError
from skyframe.state import API_FILE, StateLock, read_api_file
from skyframe.units import format_rate, format_size

#: Seconds to wait for the daemon to accept a request, and then for each part of its answer.
TIMEOUT = 10.0
#: Requests to the daemon, never through a proxy: it runs on this machine, where a proxy the
#: environment or Windows's settings name (a company laptop's) could not reach it, and
#: Python's proxy bypass does not exempt 127.0.0.1 by itself.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
BAR_WIDTH = 24


class NoDaemonError(SkyframeError):
    """No daemon runs for this config: its saved state may be changed directly."""


class DaemonNotAnsweringError(SkyframeError):
    """A process holds the config's state directory, but its API does not answer."""


class DaemonClient:
    """Requests to the daemon that holds a config's state directory."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.where = config.state_path / API_FILE
        found = read_api_file(config.state_path) or {}
        pid = found.get("pid")
        self.pid = pid if isinstance(pid, int) else None
        self.url: str = found.get("url", "")
        ended = self.pid is not None and not _alive(self.pid)
        # api.json tells where a daemon listens, not whether one runs: its lock tells that.
        in_use = state_dir_in_use(config.state_path)
        if found and not ended and in_use:
            return
        if in_use:
            holder = _lock_holder(config.state_path)
            raise DaemonNotAnsweringError(
                f"a skyframe process{holder} is using {config.state_path}, but without an API "
                "that answers (api.enabled is false, its address was taken, or it is a "
                "run --once)"
            )
        if not found:
            reason = f"no {self.where}; start it with skyframe run {config.file.name}"
        elif ended:
            reason = f"pid {self.pid} has ended"
        else:  # killed, and its PID is a zombie or another process's now
            reason = f"{self.where} is left over: pid {self.pid} does not hold the state dir"
        raise NoDaemonError(f"no daemon is running for {config.file} ({reason})")

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Send one request; the answer's JSON. Errors become one-line SkyframeErrors:
        NoDaemonError when no daemon runs after all (``api.json`` was left behind)."""
        data = None if body is None else json.dumps(body).encode()
        try:
            request = urllib.request.Request(self.url + path, data=data, method=method)
        except ValueError:  # not a URL: api.json was not written by a daemon
            raise self._unreachable(f"{self.url!r} is not an address") from None
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.config.api.token:
            request.add_header("Authorization", f"Bearer {self.config.api.token}")
        try:
            with _DIRECT.open(request, timeout=TIMEOUT) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                raise SkyframeError(self._refusal(exc)) from None
        except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
            reason = getattr(exc, "reason", exc)
            if isinstance(exc, TimeoutError) or isinstance(reason, TimeoutError):
                raise self._unreachable(None) from None
            raise self._unreachable(str(reason) or type(reason).__name__) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise DaemonNotAnsweringError(
                f"what answers at {self.url} is not the API of skyframe "
                f"(is the address in {self.where} used by another program?)"
            ) from None

    def _refusal(self, exc: urllib.error.HTTPError) -> str:
        """The one line for an error answer of the daemon."""
        try:
            answer = json.loads(exc.read())
        except ValueError:
            answer = None
        error = answer.get("error") if isinstance(answer, dict) else None
        message = error if isinstance(error, str) else exc.reason
        if exc.code == 401:
            message += " (set api.token in the config, from the environment)"
        return f"the daemon at {self.url} answered {exc.code}: {message}"

    def _unreachable(self, reason: str | None) -> SkyframeError:
        """The error for an API that cannot be reached (``reason`` None: it timed out);
        whether the state directory is held tells whether a daemon runs."""
        file, url = self.config.file, self.url
        if not state_dir_in_use(self.config.state_path):  # it ended meanwhile
            reason = reason or f"no answer within {TIMEOUT:g} s"
            return NoDaemonError(f"no daemon is running for {file} ({url}: {reason})")
        if reason is None:
            return DaemonNotAnsweringError(
                f"the daemon of {file} did not answer at {url} within {TIMEOUT:g} s: it may "
                "be hung (see its log)"
            )
        return DaemonNotAnsweringError(
            f"a skyframe process holds {self.config.state_path}, but its API does not answer "
            f"at {url} ({reason}): it may be starting, or run without its API"
        )


def state_dir_in_use(state_dir: Path) -> bool:
    """Whether a process (a daemon, a run) holds the state directory's lock now.

    The lock, unlike ``api.json``, goes away with its process, even one killed.
    """
    try:
        fd = os.open(StateLock(state_dir).path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: say that one may run
    try:
        if not locks.try_lock(fd, shared=True):
            return True
        locks.unlock(fd)
    except OSError:
        return True  # cannot tell: say that one may run
    finally:
        os.close(fd)
    return False


def _lock_holder(state_dir: Path) -> str:
    """`` (pid N)`` as the state lock's holder wrote it, or nothing."""
    try:
        pid = StateLock(state_dir).path.read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill there would end the process: the state lock tells instead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _bar(done: int, total: int) -> str:
    fraction = min(done / total, 1.0) if total > 0 else 1.0
    filled = round(fraction * BAR_WIDTH)
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction * 100:3.0f}%"


def _span(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _clock(at: float) -> str:
    return datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")


def status_lines(status: dict[str, Any]) -> list[str]:
    """The status document as lines for a terminal or a log (no markup)."""
    state = "PAUSED" if status["paused"] else "running"
    lines = [
        f"skyframe {status['version']}, pid {status['pid']}, up "
        f"{_span(time.time() - status['started_at'])}: {state}"
    ]
    for pipeline in status["pipelines"]:
        held = " (paused)" if pipeline["paused"] or status["paused"] else ""
        queue = pipeline["queue"]
        lines.append(f"{pipeline['name']}{held}: {pipeline['source']}")
        lines.append(
            f"  queue: {queue['pending']} pending, {queue['leased']} in progress, "
            f"{queue['waiting']} waiting to retry, {queue['dead']} dead-lettered"
        )
        for sink in pipeline["sinks"]:
            line = (
                f"  -> {sink['display']}: {sink['health']}, {sink['in_flight']} in flight, "
                f"{sink['delivered']} delivered ({format_size(sink['bytes'])}), "
                f"{sink['failed']} failed"
            )
            if sink["last_error"]:
                line += f"; last error: {sink['last_error']}"
            lines.append(line)
    for removed in status.get("removed") or []:  # a daemon older than reloads has none
        queue = removed["queue"]
        waiting = queue["pending"] + queue["leased"] + queue["waiting"]
        lines.append(
            f"{removed['name']} (not in the config): {waiting} job(s) wait in the queue "
            "until the pipeline is configured again"
        )
    if status.get("metered"):
        lines.append("held: the link is metered (bandwidth.metered: pause)")
    for executor in status.get("executors") or []:
        state = "connected" if executor["connected"] else "not connected"
        line = (
            f"executor {executor['name']}: {executor['kind']} {executor['address']}, {state}, "
            f"{executor['workers']} worker(s), {executor['in_flight']} call(s) in flight"
        )
        if executor.get("last_error"):
            line += f"; last error: {executor['last_error']}"
        lines.append(line)
    transfers = status["transfers"]
    if transfers:
        lines.append(f"in flight ({len(transfers)}):")
        for t in sorted(transfers, key=lambda t: t["started_at"]):
            lines.append(
                f"  {_bar(t['bytes_done'], t['size'])} {format_size(t['bytes_done'])}"
                f"/{format_size(t['size'])} {format_rate(t['rate'])}  "
                f"{t['pipeline']}: {t['relpath']} -> {t['sink']}"
            )
    throughput = status["throughput"]
    lines.append(
        f"throughput (last 10 s): {format_rate(throughput['bytes_per_s'])}, "
        f"{throughput['files_per_s']:.1f} files/s"
    )
    totals = status["totals"]
    lines.append(
        f"since start: {totals['delivered']} delivered ({format_size(totals['bytes'])}), "
        f"{totals['failed']} failed attempts, {totals['dead_lettered']} dead-lettered"
    )
    if status["errors"]:
        lines.append("latest errors:")
        for error in status["errors"][:5]:
            where = f" -> {error['sink']}" if error.get("sink") else ""
            lines.append(
                f"  {_clock(error['time'])} {error['kind']} {error['pipeline']}: "
                f"{error['relpath']}{where}: {error.get('reason', '')}"
            )
    return lines


def history_line(event: dict[str, Any]) -> str:
    """One history event as one line."""
    parts = [_clock(event["time"]), f"{event['kind']:<13}", f"{event['pipeline']}:"]
    parts.append(event["relpath"] or "(pipeline)")
    if event.get("sink"):
        parts.append(f"-> {event['sink']}")
    if event.get("remote") and event["remote"] != event["relpath"]:
        parts.append(f"as {event['remote']}")
    if event.get("size") is not None and event["kind"] in ("delivered", "queued", "moved"):
        parts.append(f"({format_size(event['size'])})")
    if event.get("attempt") and event["kind"] in ("failed", "dead-lettered"):
        parts.append(f"attempt {event['attempt']}")
    if event.get("reason"):
        parts.append(f"- {event['reason']}")
    meta = event.get("meta") or {}
    photo = meta.get("photo")
    if isinstance(photo, dict):
        parts.append(f"[{photo_summary(photo)}]")
    if str(event["kind"]).endswith("-complete") and "files" in meta:
        parts.append(
            f"({meta['files']} file(s), {meta.get('with_position', 0)} with a position"
            f"{', reported again' if meta.get('reports', 1) > 1 else ''})"
        )
    return escape(" ".join(parts))  # one line, whatever a name or a reason holds
