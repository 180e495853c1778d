"""The durable history: what is recorded, how it is bounded, and `skyframe history`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from click.testing import CliRunner
from helpers import WriteConfig, make_file

from skyframe.cli import cli
from skyframe.events import LifecycleEvent
from skyframe.history import History


def test_records_transitions_not_progress_and_rejections_once(tmp_path: Path) -> None:
    history = History(tmp_path)
    for event in (
        LifecycleEvent("queued", "p", "a.jpg", size=3),
        LifecycleEvent("started", "p", "a.jpg", sink="s", size=3),
        LifecycleEvent("progress", "p", "a.jpg", sink="s", bytes_done=1),
        LifecycleEvent("delivered", "p", "a.jpg", sink="s", size=3),
        LifecycleEvent("unchanged", "p", "a.jpg"),
        # Every rescan rejects a rejected file again: one row is enough...
        LifecycleEvent("rejected", "p", "n.txt", rule="type", reason="no"),
        LifecycleEvent("rejected", "p", "n.txt", rule="type", reason="no"),
        # ... unless the verdict changes.
        LifecycleEvent("rejected", "p", "n.txt", rule="size", reason="too big"),
        LifecycleEvent("failed", "p", "b.jpg", attempt=1, reason="x", error="OSError"),
        LifecycleEvent("dead-lettered", "p", "b.jpg", attempt=2, reason="x"),
    ):
        history.record(event)
    history.flush()
    kinds = [(e["kind"], e["relpath"]) for e in history.query()]
    assert kinds == [
        ("dead-lettered", "b.jpg"),
        ("failed", "b.jpg"),
        ("rejected", "n.txt"),
        ("rejected", "n.txt"),
        ("delivered", "a.jpg"),
        ("started", "a.jpg"),
        ("queued", "a.jpg"),
    ]
    assert [e["kind"] for e in history.query(failed=True)] == ["dead-lettered", "failed"]
    assert [e["kind"] for e in history.query(relpath="a.jpg", limit=1)] == ["delivered"]
    assert history.query(pipeline="other") == []
    assert history.query(failed=True)[1]["error"] == "OSError"
    history.close()


def test_the_writer_thread_writes_within_a_second(tmp_path: Path) -> None:
    history = History(tmp_path)
    history.record(LifecycleEvent("queued", "p", "a.jpg"))
    reader = History(tmp_path, writer=False)
    deadline = time.monotonic() + 3
    while not reader.query() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e["relpath"] for e in reader.query()] == ["a.jpg"]
    reader.close()
    history.close()


def test_retention_and_size_bound(tmp_path: Path) -> None:
    history = History(tmp_path, retention=3600, max_events=1000)
    old = time.time() - 7200
    history.record(LifecycleEvent("queued", "p", "old.jpg", time=old))
    for i in range(1200):
        history.record(LifecycleEvent("queued", "p", f"f{i}.jpg"))
    history.flush()
    assert history.prune() == 201  # the old one, and the 200 beyond max_events
    names = [e["relpath"] for e in history.query(limit=5000)]
    assert len(names) == 1000
    assert names[0] == "f1199.jpg"
    assert names[-1] == "f200.jpg"
    history.close()


def test_since_filter(tmp_path: Path) -> None:
    history = History(tmp_path)
    now = time.time()
    history.record(LifecycleEvent("queued", "p", "a", time=now - 100))
    history.record(LifecycleEvent("queued", "p", "b", time=now - 10))
    history.flush()
    assert [e["relpath"] for e in history.query(since=now - 50)] == ["b"]
    history.close()


CONFIG = """\
state_dir: .state
retry: {max_attempts: 1}
pipelines:
  - name: survey
    source: {path: incoming, settle: 0}
    rules: [{type: {extensions: [.jpg]}}]
    sinks: [{url: outbox}]
"""


def test_cli_history_after_a_run(tmp_path: Path, write_config: WriteConfig) -> None:
    config = str(write_config(CONFIG))
    runner = CliRunner()
    result = runner.invoke(cli, ["history", "-c", config])
    assert result.exit_code == 0
    assert "no history yet" in result.output
    make_file(tmp_path / "incoming", "a.jpg", b"abc")
    make_file(tmp_path / "incoming", "notes.txt", b"x")
    assert runner.invoke(cli, ["run", config, "--once"]).exit_code == 0
    (tmp_path / "outbox").rename(tmp_path / "elsewhere")
    (tmp_path / "outbox").write_text("not a folder")
    make_file(tmp_path / "incoming", "b.jpg", b"abcd")
    assert runner.invoke(cli, ["run", config, "--once"]).exit_code == 1
    # a second run finds the rejected file again: still one row for it
    result = runner.invoke(cli, ["history", "-c", config])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    kinds = [line.split()[2] for line in lines]
    assert kinds.count("rejected") == 1
    assert kinds[:3] == ["queued", "rejected", "started"] or kinds[:3] == [
        "rejected",
        "queued",
        "started",
    ]
    assert "delivered     survey: a.jpg -> outbox (3 B)" in result.output
    assert lines[-1].split()[2] == "dead-lettered"
    result = runner.invoke(cli, ["history", "b.jpg", "-c", config, "--failed", "--json"])
    events = [json.loads(line) for line in result.output.splitlines()]
    assert [e["kind"] for e in events] == ["dead-lettered"]
    assert events[0]["sink"] == "outbox"
    result = runner.invoke(cli, ["history", "-c", config, "--since", "1h", "-n", "1"])
    assert len(result.output.splitlines()) == 1
    assert "dead-lettered" in result.output
    result = runner.invoke(cli, ["history", "-c", config, "--since", "2100-01-01"])
    assert result.exit_code == 0
    assert "no events match" in result.output
    result = runner.invoke(cli, ["history", "-c", config, "--since", "yesterday"])
    assert result.exit_code == 2
    assert "neither a duration" in result.output


def test_a_name_with_a_newline_or_a_tab_stays_on_one_line(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    config = str(write_config(CONFIG))
    make_file(tmp_path / "incoming", "new\nline\t.jpg", b"abc")
    (tmp_path / "outbox").write_text("not a folder")  # the file fails: the queue keeps it
    runner = CliRunner()
    assert runner.invoke(cli, ["run", config, "--once"]).exit_code == 1
    listed = runner.invoke(cli, ["queue", "list", "-c", config])
    [row] = listed.stdout.splitlines()
    assert row.split("\t")[:3] == ["dead", "survey", "new\\nline\\t.jpg"]
    history = runner.invoke(cli, ["history", "-c", config]).stdout.splitlines()
    assert history
    assert all("survey: new\\nline\\t.jpg" in line for line in history), history
