"""The terminal progress bar and the plain summary."""

from __future__ import annotations

import io
from collections import Counter

from rich.console import Console

from skyframe.console import ProgressReporter, print_summary
from skyframe.engine import RunSummary
from skyframe.events import LifecycleEvent


def test_progress_counts_files_across_sinks() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    with ProgressReporter(console, {"p": 2}) as reporter:
        for name in ("a.jpg", "b.jpg", "c.jpg"):
            reporter.skyframe_event(LifecycleEvent("queued", "p", name))
        for sink in ("s1", "s2"):
            reporter.skyframe_event(LifecycleEvent("delivered", "p", "a.jpg", sink=sink))
        reporter.skyframe_event(LifecycleEvent("moved", "p", "b.jpg", sink="s1"))
        reporter.skyframe_event(LifecycleEvent("unchanged", "p", "b.jpg", sink="s2"))
        reporter.skyframe_event(LifecycleEvent("dead-lettered", "p", "c.jpg", reason="x"))
        reporter.skyframe_event(LifecycleEvent("rejected", "p", "d.txt", rule="type"))
        task = reporter._progress.tasks[0]
        assert (task.total, task.completed) == (3, 3)


def test_summary_is_plain_text_with_markup_shown_literally() -> None:
    out = io.StringIO()
    summary = RunSummary(
        delivered=2,
        delivered_bytes=2000,
        unchanged=1,
        rejected=Counter({"ignore": 2}),
        failed={"p:[bold]x.jpg": "PermissionError: denied", "p:fire:.jpg": "OSError: full"},
    )
    print_summary(Console(file=out, width=40), summary)
    text = out.getvalue()
    assert text.splitlines()[0] == (
        "delivered 2 file(s) (2.0 KB), 1 unchanged, 2 rejected, 2 failed"
    )
    assert "  rejected by ignore: 2" in text
    assert "  failed p:[bold]x.jpg: PermissionError: denied" in text  # long lines not wrapped
    assert "  failed p:fire:.jpg: OSError: full" in text  # no emoji for ":fire:"


def test_large_files_get_a_byte_bar_while_they_are_sent() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    size = 50_000_000
    with ProgressReporter(console, {"p": 1}) as reporter:
        for name in ("big.mp4", "small.jpg"):
            reporter.skyframe_event(LifecycleEvent("queued", "p", name))
        reporter.skyframe_event(LifecycleEvent("started", "p", "big.mp4", sink="s3", size=size))
        reporter.skyframe_event(LifecycleEvent("started", "p", "small.jpg", sink="s3", size=10))
        assert len(reporter._progress.tasks) == 2  # the files bar and one byte bar
        reporter.skyframe_event(
            LifecycleEvent("progress", "p", "big.mp4", sink="s3", size=size, bytes_done=20_000_000)
        )
        bar = reporter._progress.tasks[1]
        assert (bar.total, bar.completed) == (size, 20_000_000)
        assert bar.fields["amount"].startswith("20.0 MB/50.0 MB")
        assert bar.fields["current"] == "big.mp4 -> s3"
        reporter.skyframe_event(LifecycleEvent("delivered", "p", "big.mp4", sink="s3", size=size))
        assert len(reporter._progress.tasks) == 1
        assert reporter._progress.tasks[0].fields["amount"] == "1/2 files"
