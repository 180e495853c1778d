"""What the CLI shows people: a live progress bar on a terminal, and run summaries."""

from __future__ import annotations

import threading
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from skyframe.display import shown
from skyframe.events import LifecycleEvent
from skyframe.markers import hookimpl
from skyframe.summary import RunSummary
from skyframe.units import format_size

#: Files at least this large get a bar of their own, in bytes, while they are sent.
BYTE_BAR_MIN = 8 * 1024 * 1024


class ProgressReporter:
    """A ``skyframe_event`` plugin that drives a progress bar of files handled, and one bar
    per large file in flight, in bytes, fed by the throttled ``progress`` events."""

    def __init__(self, console: Console, sinks_per_pipeline: dict[str, int]) -> None:
        self._sinks = sinks_per_pipeline
        self._lock = threading.Lock()
        self._progress = Progress(
            TextColumn("[bold]{task.description}", markup=True),
            BarColumn(),
            TextColumn("{task.fields[amount]}", markup=False),
            TextColumn("{task.fields[current]}", style="dim", markup=False),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._task = self._progress.add_task("delivering", total=0, current="", amount="0/0")
        self._files: dict[tuple[str, str, str], TaskID] = {}

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
            self._count(event)
            if event.sink is not None:
                self._bytes(event, (event.pipeline, event.relpath, event.sink))

    def _count(self, event: LifecycleEvent) -> None:
        """The files bar: each file counts once, shared between its pipeline's sinks."""
        share = 1 / max(self._sinks.get(event.pipeline, 1), 1)
        task = self._progress.tasks[0]
        if event.kind == "queued":
            self._progress.update(self._task, total=(task.total or 0) + 1)
        elif event.kind == "started":
            self._progress.update(self._task, current=event.relpath)
        elif event.kind in ("delivered", "unchanged", "moved") and event.sink is not None:
            self._progress.advance(self._task, share)
        elif event.kind in ("dead-lettered", "skipped"):
            self._progress.advance(self._task, 1)
        self._progress.update(
            self._task, amount=f"{int(task.completed + 1e-9)}/{int(task.total or 0)} files"
        )

    def _bytes(self, event: LifecycleEvent, key: tuple[str, str, str]) -> None:
        """A bar per large file in flight to one sink, in bytes, with its rate."""
        task = self._files.get(key)
        if event.kind == "started" and (event.size or 0) >= BYTE_BAR_MIN:
            if task is not None:
                self._progress.remove_task(task)
            self._files[key] = self._progress.add_task(
                "  sending", total=event.size, current=f"{event.relpath} -> {event.sink}", amount=""
            )
            self._progress.update(self._files[key], amount=self._amount(self._files[key]))
        elif event.kind == "progress" and task is not None and event.bytes_done is not None:
            self._progress.update(task, completed=event.bytes_done)
            self._progress.update(task, amount=self._amount(task))
        elif event.kind in ("delivered", "failed", "dead-lettered") and task is not None:
            self._progress.remove_task(task)
            del self._files[key]

    def _amount(self, task_id: TaskID) -> str:
        task = next(t for t in self._progress.tasks if t.id == task_id)
        text = f"{format_size(task.completed)}/{format_size(task.total or 0)}"
        if task.speed:
            text += f" {format_size(task.speed)}/s"
        return text


def print_summary(console: Console, summary: RunSummary) -> None:
    """A few plain lines: delivered, unchanged, rejected by rule, failed with reasons."""

    def line(text: str) -> None:
        console.print(text, highlight=False, markup=False, emoji=False, soft_wrap=True)

    line(
        f"delivered {summary.delivered} file(s) ({format_size(summary.delivered_bytes)}), "
        f"{summary.unchanged} unchanged, {sum(summary.rejected.values())} rejected, "
        f"{len(summary.failed)} failed"
    )
    for rule_name, count in sorted(summary.rejected.items()):
        line(f"  rejected by {shown(rule_name)}: {count}")
    if summary.moved or summary.deleted:
        line(f"  moved remotely: {summary.moved}, deleted remotely: {summary.deleted}")
    for group_name, count in sorted(summary.completed.items()):
        line(f"  complete: {count} {shown(group_name)}(s)")
    if summary.skipped:
        line(f"  skipped (vanished before delivery): {summary.skipped}")
    if summary.refused:
        line(
            f"  not taken from the source: {summary.refused} "
            "(a name that is not UTF-8, a link not followed, not a regular file: see the log)"
        )
    if summary.scan_errors:
        line(f"  unreadable while scanning: {summary.scan_errors}")
    earlier = summary.dead_letters - len(summary.failed)
    if earlier > 0:
        line(f"  dead-lettered by earlier runs: {earlier} (see `skyframe queue list`)")
    if summary.interrupted:
        line("  stopped before the queue was empty: the rest is delivered at the next run")
    if summary.held:
        line(f"  held in the queue, pipeline paused: {summary.held} (see `skyframe resume`)")
    for key, reason in sorted(summary.failed.items()):
        line(f"  failed {shown(key)}: {shown(reason)}")
