"""What the CLI shows people: a live progress bar on a terminal, and run summaries."""

from __future__ import annotations

import threading
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from skyframe.engine import RunSummary
from skyframe.events import LifecycleEvent
from skyframe.markers import hookimpl
from skyframe.units import format_size


class ProgressReporter:
    """A ``skyframe_event`` plugin that drives a progress bar of files handled."""

    def __init__(self, console: Console, sinks_per_pipeline: dict[str, int]) -> None:
        self._sinks = sinks_per_pipeline
        self._lock = threading.Lock()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[current]}", style="dim", markup=False),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._task = self._progress.add_task("delivering", total=0, current="")

    def __enter__(self) -> ProgressReporter:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    @hookimpl
    def skyframe_event(self, event: LifecycleEvent) -> None:
        with self._lock:
            share = 1 / max(self._sinks.get(event.pipeline, 1), 1)
            if event.kind == "queued":
                total = self._progress.tasks[0].total or 0
                self._progress.update(self._task, total=total + 1)
            elif event.kind == "started":
                self._progress.update(self._task, current=event.relpath)
            elif event.kind in ("delivered", "unchanged", "moved") and event.sink is not None:
                self._progress.advance(self._task, share)
            elif event.kind in ("dead-lettered", "skipped"):
                self._progress.advance(self._task, 1)


def print_summary(console: Console, summary: RunSummary) -> None:
    """A few plain lines: delivered, unchanged, rejected by rule, failed with reasons."""

    def line(text: str) -> None:
        console.print(text, highlight=False, markup=False, soft_wrap=True)

    line(
        f"delivered {summary.delivered} file(s) ({format_size(summary.delivered_bytes)}), "
        f"{summary.unchanged} unchanged, {sum(summary.rejected.values())} rejected, "
        f"{len(summary.failed)} failed"
    )
    for rule_name, count in sorted(summary.rejected.items()):
        line(f"  rejected by {rule_name}: {count}")
    if summary.moved or summary.deleted:
        line(f"  moved remotely: {summary.moved}, deleted remotely: {summary.deleted}")
    if summary.skipped:
        line(f"  skipped (vanished before delivery): {summary.skipped}")
    if summary.scan_errors:
        line(f"  unreadable while scanning: {summary.scan_errors}")
    earlier = summary.dead_letters - len(summary.failed)
    if earlier > 0:
        line(f"  dead-lettered by earlier runs: {earlier} (see `skyframe queue list`)")
    if summary.interrupted:
        line("  stopped before the queue was empty: the rest is delivered at the next run")
    for key, reason in sorted(summary.failed.items()):
        line(f"  failed {key}: {reason}")
