"""What one run did, counted from its lifecycle events: the CLI's summary and exit code."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from skyframe.events import LifecycleEvent


@dataclass
class RunSummary:
    """Counts for one run, for the CLI's summary and exit code."""

    queued: int = 0
    delivered: int = 0
    delivered_bytes: int = 0
    unchanged: int = 0
    skipped: int = 0
    moved: int = 0
    deleted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    failed: dict[str, str] = field(default_factory=dict)  #: "pipeline:relpath" -> last error
    scan_errors: int = 0
    #: files not taken from a source: a name that is not UTF-8, a link outside the source
    refused: int = 0
    dead_letters: int = 0  #: jobs in the dead-letter list when a --once run ended
    interrupted: bool = False  #: a --once run was stopped before the queue was empty
    held: int = 0  #: jobs a --once run left in the queue because their pipeline is paused
    #: groups completed, by group name (flight: 2)
    completed: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        """True when every accepted file was delivered (or needed no delivery), and the scans
        read every folder and file they met (one they could not read was not looked at)."""
        return (
            not self.failed
            and not self.dead_letters
            and not self.interrupted
            and not self.held
            and not self.scan_errors
        )

    def count(self, event: LifecycleEvent) -> None:
        """Add one lifecycle event to the counts."""
        kind = event.kind
        if kind == "queued":
            self.queued += 1
        elif kind == "rejected":
            self.rejected[event.rule or "?"] += 1
        elif kind == "unchanged":
            self.unchanged += 1
        elif kind == "skipped":
            self.skipped += 1
        elif kind == "delivered":
            self.delivered += 1
            self.delivered_bytes += event.size or 0
        elif kind == "moved":
            self.moved += 1
        elif kind == "deleted":
            self.deleted += 1
        elif kind == "dead-lettered":
            self.failed[f"{event.pipeline}:{event.relpath}"] = event.reason or "failed"
        elif kind.endswith("-complete"):
            self.completed[kind.removesuffix("-complete")] += 1
