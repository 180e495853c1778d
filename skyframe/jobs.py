"""What a queued entry asks for: upload a file, move it remotely, or delete it remotely.

One typed job goes from intake (the scan or the watcher decides) through the queue (which
stores its JSON) to delivery (which carries it out) and to the API and the CLI (which show
its kind). ``to_json`` and :func:`job_from_json` are inverse; the JSON is the shape queues
written by earlier versions hold, so a queue survives an upgrade.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from skyframe.events import FileEvent

JobKind = Literal["upload", "move", "delete"]

#: Whether a folder scan sees a file's inode. Not on Windows: there ``os.scandir`` gives 0 (the
#: watcher's ``os.stat`` gives the file's ID), and a version with the inode would make every
#: scan offer the file a watcher event queued as a new version, its attempts begun again.
SCANS_SEE_INODES = os.name != "nt"

#: Priority levels: the queue hands out ready jobs of a higher level first (see queue.py).
HIGH, NORMAL, LOW = 1, 0, -1
PRIORITIES = {"high": HIGH, "normal": NORMAL, "low": LOW}


def priority_level(value: object) -> int:
    """A stored priority as one of the levels (anything else, or none: normal)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return max(LOW, min(HIGH, value))
    return NORMAL


@dataclass(frozen=True, kw_only=True)
class Upload:
    """Send this version of a file to every sink that lacks it."""

    kind: ClassVar[JobKind] = "upload"
    event: FileEvent  #: the file as it was when queued
    #: The rules accepted this very version when it was queued: delivery runs them again
    #: only if the file changed since.
    accepted: bool = False
    #: HIGH, NORMAL or LOW: the pipeline's ``priority`` for this file, decided when queued
    priority: int = NORMAL

    @property
    def relpath(self) -> str:
        """The file's path relative to its source root (the queue's key)."""
        return self.event.relpath

    @property
    def version(self) -> str:
        """What identifies this state of the file: offering it again changes nothing."""
        event = self.event
        inode = event.inode if SCANS_SEE_INODES else 0
        return f"{event.size}:{event.mtime_ns}:{inode}:"

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict, as stored in the queue."""
        out: dict[str, Any] = {"action": self.kind, "event": self.event.to_json()}
        if self.accepted:
            out["accepted"] = True
        if self.priority != NORMAL:  # absent reads as normal, as in queues of earlier versions
            out["priority"] = self.priority
        return out


@dataclass(frozen=True, kw_only=True)
class Move(Upload):
    """A file renamed in the source: rename it on each sink that has it (and upload it where
    a rename is not possible or the sink lacks it)."""

    kind: ClassVar[JobKind] = "move"
    moved_from: str  #: its previous relative path

    @property
    def version(self) -> str:
        return super().version + self.moved_from

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "moved_from": self.moved_from}


@dataclass(frozen=True, kw_only=True)
class Delete:
    """A file deleted from the source: remove it from each sink with ``on_delete: delete``."""

    kind: ClassVar[JobKind] = "delete"
    relpath: str
    version: ClassVar[str] = "deleted"
    priority: ClassVar[int] = NORMAL

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict, as stored in the queue."""
        return {"action": self.kind, "relpath": self.relpath}


QueuedJob = Upload | Move | Delete


def job_from_json(data: dict[str, Any]) -> QueuedJob:
    """The inverse of ``to_json``. Also reads the shape of earlier versions, where a move
    was an upload with ``moved_from``; raises ValueError for anything else."""
    action = data.get("action", "upload")
    try:
        if action == "delete":
            return Delete(relpath=str(data["relpath"]))
        if action in ("upload", "move"):
            event = FileEvent.from_json(data["event"])
            accepted = bool(data.get("accepted"))
            priority = priority_level(data.get("priority"))
            if data.get("moved_from"):
                moved_from = str(data["moved_from"])
                return Move(
                    event=event, accepted=accepted, priority=priority, moved_from=moved_from
                )
            return Upload(event=event, accepted=accepted, priority=priority)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"a queued {action!r} job lacks {exc}") from None
    raise ValueError(f"unknown queued job {action!r}")


def kind_of(data: dict[str, Any]) -> JobKind | None:
    """The kind of a job from its JSON without decoding the rest (for listings); None for
    JSON that is no job this version knows."""
    action = data.get("action", "upload")
    if action == "upload" and data.get("moved_from"):
        return "move"
    if action in ("upload", "move", "delete"):
        return action  # type: ignore[no-any-return]
    return None
