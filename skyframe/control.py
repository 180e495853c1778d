"""Pause and resume, for the whole daemon or one pipeline, kept across restarts.

The state lives in ``<state_dir>/control.json`` (written atomically), so a daemon paused before
a restart starts paused. While a pipeline is held, the dispatcher claims none of its jobs and
its running transfers wait before their next piece (see :meth:`Control.wait_running`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from skyframe.errors import StateError
from skyframe.state import write_json_atomic

log = logging.getLogger(__name__)

CONTROL_FILE = "control.json"
#: Longest wait between two looks at the cancel flag while a transfer is held.
HOLD_POLL = 0.25


class Control:
    """The pause switches of one state directory."""

    def __init__(self, state_dir: Path, pipelines: Iterable[str]) -> None:
        self._file = state_dir / CONTROL_FILE
        self._pipelines = list(pipelines)
        self._cond = threading.Condition()
        self.paused = False
        self._held: set[str] = set()
        #: held while the system says its link is metered (``bandwidth.metered: pause``); not
        #: saved: the next start asks the system again
        self.metered = False
        #: False when nothing at all is held: read without the lock on every piece sent
        self._any_held = False
        self._load()
        self._any_held = self.paused or bool(self._held)

    def _load(self) -> None:
        try:
            data = json.loads(self._file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            # Not fatal: uploads must go on. Say so, and start running.
            log.error("cannot read %s (%s): starting unpaused", self._file, exc)
            return
        if not isinstance(data, dict):
            log.error("%s does not hold a JSON object: starting unpaused", self._file)
            return
        self.paused = data.get("paused") is True
        held = data.get("pipelines", {})
        if isinstance(held, dict):
            self._held = {name for name, on in held.items() if on is True}

    def _save(self, paused: bool, held: set[str]) -> None:
        data = {"paused": paused, "pipelines": {name: True for name in sorted(held)}}
        try:
            write_json_atomic(self._file, data)
        except OSError as exc:
            raise StateError(f"cannot save the pause state in {self._file}: {exc}") from exc

    def set_pipelines(self, pipelines: Iterable[str]) -> None:
        """The configured pipelines changed (a reload); the switch of a removed one is kept,
        for when it comes back."""
        with self._cond:
            self._pipelines = list(pipelines)
            self._cond.notify_all()

    def state(self) -> dict[str, Any]:
        """``{"paused": bool, "pipelines": {name: bool}}`` for every configured pipeline."""
        with self._cond:
            return {
                "paused": self.paused,
                "pipelines": {name: name in self._held for name in self._pipelines},
            }

    def is_held(self, pipeline: str) -> bool:
        """True while the pipeline may not send (paused itself, or everything is)."""
        if not self._any_held:
            return False
        with self._cond:
            return self.paused or self.metered or pipeline in self._held

    def held(self) -> set[str]:
        """The configured pipelines that are held now."""
        with self._cond:
            return set(self._pipelines) if self.paused or self.metered else set(self._held)

    def set_metered(self, metered: bool) -> list[str]:
        """Hold every pipeline while the link is metered, or let them go (not saved); the
        pipelines whose held state changed."""
        with self._cond:
            before = self.held()
            self.metered = metered
            self._any_held = self.paused or metered or bool(self._held)
            changed = sorted(before ^ self.held())
            self._cond.notify_all()
        return changed

    def set(self, paused: bool, pipeline: str | None = None) -> list[str]:
        """Pause or resume everything (``pipeline`` None) or one pipeline; saved at once.

        Returns the pipelines whose held state changed.
        """
        with self._cond:
            if pipeline is not None and pipeline not in self._pipelines:
                raise KeyError(pipeline)
            before = self.held()
            everything, held = self.paused, set(self._held)
            if pipeline is None:
                everything = paused
                if not paused:
                    held.clear()  # resuming everything resumes every pipeline
            elif paused:
                held.add(pipeline)
            else:
                held.discard(pipeline)
            self._save(everything, held)  # nothing changes unless it is saved
            self.paused, self._held = everything, held
            self._any_held = everything or self.metered or bool(held)
            changed = sorted(before ^ self.held())
            self._cond.notify_all()
        return changed

    def wait_running(self, pipeline: str, *stop: threading.Event) -> bool:
        """Block while the pipeline is held, unless one of ``stop`` is set; True once it runs.

        Cheap when nothing is held: transfers call it before every piece.
        """
        if not self._any_held:
            return True
        with self._cond:
            while self.paused or self.metered or pipeline in self._held:
                if any(event.is_set() for event in stop):
                    return False
                self._cond.wait(HOLD_POLL)
            return True

    def wake(self) -> None:
        """Wake held transfers so they see a stop at once."""
        with self._cond:
            self._cond.notify_all()
