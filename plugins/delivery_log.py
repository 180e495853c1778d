"""Example plugin: keep a JSON-lines log of deliveries and failures in the state directory.

Drop a file like this into a folder listed under ``plugins:`` in skyframe.yaml. It implements
two hooks: ``skyframe_startup`` (to learn where the state directory is) and ``skyframe_event``
(called for every lifecycle event). Each line of ``<state_dir>/deliveries.jsonl`` is the event's
documented JSON shape (see docs/hooks.md). A notifier must be quick and must not raise into a
transfer; skyframe logs and ignores errors from it.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from skyframe import LifecycleEvent, hookimpl
from skyframe.config import Config

KINDS = frozenset({"delivered", "dead-lettered"})

_lock = threading.Lock()
_log_file: Path | None = None


@hookimpl
def skyframe_startup(config: Config) -> None:
    """Remember where to write: ``deliveries.jsonl`` in the state directory."""
    global _log_file  # noqa: PLW0603 - one log per process, set once at startup
    config.state_path.mkdir(parents=True, exist_ok=True)
    _log_file = config.state_path / "deliveries.jsonl"


@hookimpl
def skyframe_event(event: LifecycleEvent) -> None:
    """Append delivered and dead-lettered events as JSON lines."""
    if _log_file is None or event.kind not in KINDS:
        return
    line = json.dumps(event.to_json(), sort_keys=True)
    with _lock, _log_file.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
