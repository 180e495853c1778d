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
            elif event.kind in ("delivered", "unchanged") and event.sink is not None:
                self._progress.advance(self._task, share)
            elif event.kind in ("dead-lettered", "skipped"):
                self._progress.advance(self._task, 1)


def print_summary(console: Console, summary: RunSummary) -> None:
    """A few plain lines: delivered, unchanged, rejected by rule, failed with reasons."""
    console.print(
        f"delivered {summary.delivered} file(s) ({format_size(summary.delivered_bytes)}), "
        f"{summary.unchanged} unchanged, {sum(summary.rejected.values())} rejected, "
        f"{len(summary.failed)} failed",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    for rule_name, count in sorted(summary.rejected.items()):
        console.print(
            f"  rejected by {rule_name}: {count}", highlight=False, markup=False, soft_wrap=True
        )
    if summary.moved or summary.deleted:
        console.print(
            f"  moved remotely: {summary.moved}, deleted remotely: {summary.deleted}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    if summary.skipped:
        console.print(
            f"  skipped (vanished before delivery): {summary.skipped}",
            highlight=False,
            markup=False,
        )
    if summary.scan_errors:
        console.print(
            f"  unreadable while scanning: {summary.scan_errors}", highlight=False, markup=False
        )
    earlier = summary.dead_letters - len(summary.failed)
    if earlier > 0:
        console.print(
            f"  dead-lettered by earlier runs: {earlier} (see `skyframe queue list`)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    if summary.interrupted:
        console.print(
            "  stopped before the queue was empty: the rest is delivered at the next run",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    for key, reason in sorted(summary.failed.items()):
        console.print(f"  failed {key}: {reason}", highlight=False, markup=False, soft_wrap=True)
