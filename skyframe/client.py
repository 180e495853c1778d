"""The CLI's side of the API: find the daemon of a config and talk to it; render its status."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from datetime import datetime
from typing import Any

from skyframe.config import Config
from skyframe.errors import SkyframeError
from skyframe.state import API_FILE, read_api_file
from skyframe.units import format_rate, format_size

TIMEOUT = 10.0
BAR_WIDTH = 24


class NoDaemonError(SkyframeError):
    """No daemon runs for this config (or it does not answer)."""


class DaemonClient:
    """Requests to the daemon that holds a config's state directory."""

    def __init__(self, config: Config) -> None:
        self.config = config
        found = read_api_file(config.state_path)
        where = config.state_path / API_FILE
        if found is None:
            raise NoDaemonError(
                f"no daemon is running for {config.file} (no {where}; start it with "
                f"skyframe run {config.file.name})"
            )
        pid = found.get("pid")
        if isinstance(pid, int) and not _alive(pid):
            raise NoDaemonError(f"no daemon is running for {config.file} (pid {pid} has ended)")
        self.url: str = found["url"]

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Send one request; the answer's JSON. Errors become one-line SkyframeErrors."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.config.api.token:
            request.add_header("Authorization", f"Bearer {self.config.api.token}")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                message = exc.reason
            if exc.code == 401:
                message += " (set api.token in the config, from the environment)"
            raise SkyframeError(
                f"the daemon at {self.url} answered {exc.code}: {message}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise NoDaemonError(
                f"the daemon of {self.config.file} does not answer at {self.url}: {reason}"
            ) from None


def _alive(pid: int) -> bool:
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
    return " ".join(parts)
