"""Live reload of the config: SIGHUP, ``POST /api/reload``, the config watch (docs/cli.md).

In-process daemons (helpers.Daemon) for what needs the engine's insides (events, manifest);
real ``skyframe run`` subprocesses for the signal and the watch on the config file.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Daemon, WriteConfig, make_file, request, tree_files, url_of, wait_for

from skyframe.client import status_lines
from skyframe.errors import ConfigError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGHUP: POSIX only")

TWO_PIPELINES = """
    state_dir: .state
    shutdown_grace: 1s
    retry: {max_attempts: 2, initial: 50ms, max: 100ms}
    api: {listen: "127.0.0.1:0"}
    pipelines:
      - name: survey
        source: {path: incoming, settle: 0, rescan: 1h}
        RULES
        sinks:
          - url: outbox
            BWLIMIT
      - name: logs
        source: {path: logs, settle: 0, rescan: 1h}
        sinks:
          - url: logbox
    """


def config_text(
    *, rules: str = "", bwlimit: str = "", logs: bool = True, survey: bool = True
) -> str:
    text = TWO_PIPELINES.replace("RULES", rules).replace("BWLIMIT", bwlimit)
    if not logs:
        text = text[: text.index("      - name: logs")]
    if not survey:
        text = text[: text.index("      - name: survey")] + text[text.index("      - name: logs") :]
    return text


@pytest.fixture
def project(tmp_path: Path, write_config: WriteConfig) -> Path:
    (tmp_path / "logs").mkdir()
    write_config(config_text())
    return tmp_path


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


def start(config: Path, started: list[Daemon]) -> Daemon:
    d = Daemon(config)
    started.append(d)
    d.__enter__()
    return d


def delivered(d: Daemon, relpath: str) -> int:
    return d.recorder.count("delivered", relpath)


# --- refused configs ---------------------------------------------------------------------------


def test_an_invalid_config_is_refused_and_the_old_one_keeps_running(
    project: Path,
    write_config: WriteConfig,
    daemons: list[Daemon],
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = start(project / "skyframe.yaml", daemons)
    write_config(config_text().replace("settle: 0, rescan: 1h}", "setle: 0}", 1))
    with caplog.at_level(logging.INFO, logger="skyframe"), pytest.raises(ConfigError) as info:
        d.engine.reload("test")
    assert "setle" in str(info.value)
    lines = [r.getMessage() for r in caplog.records if "reload" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("config not reloaded (test): ")
    assert "skyframe.yaml:7:30: pipelines[0].source.setle: unknown key" in lines[0]
    assert "the running config stays" in lines[0]
    assert not any(r.exc_info for r in caplog.records)
    wait_for(lambda: d.recorder.count("reload-refused") == 1, what="the reload-refused event")
    # The old config goes on: both pipelines deliver.
    make_file(project / "incoming", "a.txt", "a")
    make_file(project / "logs", "b.log", "b")
    wait_for((project / "outbox" / "a.txt").exists, what="a.txt delivered")
    wait_for((project / "logbox" / "b.log").exists, what="b.log delivered")


def test_a_plugin_that_calls_sys_exit_is_refused_and_reloads_go_on(
    project: Path, write_config: WriteConfig, daemons: list[Daemon]
) -> None:
    from skyframe.errors import PluginError

    d = start(project / "skyframe.yaml", daemons)
    rules = project / "rules.py"
    rules.write_text("raise SystemExit('stop')\n", encoding="utf-8")
    with pytest.raises(PluginError, match=r"rules\.py:1: cannot load: SystemExit: stop"):
        d.engine.reload("test")
    rules.unlink()
    write_config(config_text(logs=False))
    d.engine.reload("test")  # the next reload is taken
    assert [p.name for p in d.engine.config.pipelines] == ["survey"]


def test_a_new_state_dir_is_refused(
    project: Path, write_config: WriteConfig, daemons: list[Daemon]
) -> None:
    d = start(project / "skyframe.yaml", daemons)
    write_config(config_text().replace("state_dir: .state", "state_dir: .other"))
    with pytest.raises(ConfigError, match="state directory cannot change"):
        d.engine.reload()
    assert not (project / ".other").exists()
    make_file(project / "incoming", "a.txt", "a")
    wait_for((project / "outbox" / "a.txt").exists, what="a.txt delivered")


# --- pipelines added, removed, changed -----------------------------------------------------------


def test_pipelines_added_removed_and_changed_take_effect(
    project: Path,
    write_config: WriteConfig,
    daemons: list[Daemon],
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = start(project / "skyframe.yaml", daemons)
    before = d.engine.pipelines["logs"]
    sink = before.sinks[0]
    # Remove `survey`, leave `logs` alone, add `extra` (with a file waiting for it).
    (project / "extra").mkdir()
    make_file(project / "extra", "waiting.dat", "w")
    text = config_text(survey=False)
    text += """
      - name: extra
        source: {path: extra, settle: 0, rescan: 1h}
        sinks:
          - url: extrabox
    """
    write_config(text)
    with caplog.at_level(logging.INFO, logger="skyframe"):
        plan = d.engine.reload("test")
    assert (plan.added, plan.changed, plan.removed) == (["extra"], [], ["survey"])
    assert "config reloaded (test): added extra, removed survey" in caplog.text
    # Unchanged: the very same objects, its sink and connection kept.
    assert d.engine.pipelines["logs"] is before
    assert d.engine.pipelines["logs"].sinks[0] is sink
    # Added: watched, and its catch-up scan ran.
    wait_for((project / "extrabox" / "waiting.dat").exists, what="the catch-up scan")
    make_file(project / "extra", "new.dat", "n")
    wait_for((project / "extrabox" / "new.dat").exists, what="a watched file")
    # Removed: no longer watched.
    make_file(project / "incoming", "ignored.txt", "i")
    time.sleep(1.0)
    assert not (project / "outbox" / "ignored.txt").exists()
    names = [p["name"] for p in d.engine.status()["pipelines"]]
    assert names == ["logs", "extra"]
    assert d.engine.control.state()["pipelines"] == {"logs": False, "extra": False}

    # Changed: a rule added to `logs` applies to files that arrive after the reload.
    logs = "source: {path: logs, settle: 0, rescan: 1h}"
    text = text.replace(logs, logs + "\n        rules: [{ignore: {patterns: ['*.tmp1']}}]")
    write_config(text)
    plan = d.engine.reload("test")
    assert (plan.added, plan.changed, plan.removed) == ([], ["logs"], [])
    assert d.engine.pipelines["logs"] is not before
    assert d.engine.pipelines["logs"].sinks[0] is sink  # its settings did not change
    make_file(project / "logs", "x.tmp1", "x")
    make_file(project / "logs", "y.log", "y")
    wait_for((project / "logbox" / "y.log").exists, what="y.log delivered")
    wait_for(lambda: d.recorder.count("rejected", "x.tmp1") >= 1, what="x.tmp1 rejected")
    assert not (project / "logbox" / "x.tmp1").exists()
    assert d.engine.reload("test").describe() == "no change"


def test_a_removed_pipelines_jobs_wait_in_the_queue_until_it_is_back(
    project: Path, write_config: WriteConfig, daemons: list[Daemon]
) -> None:
    d = start(project / "skyframe.yaml", daemons)
    d.engine.set_paused(True, "survey")
    for i in range(5):
        make_file(project / "incoming", f"f{i}.txt", str(i))
    wait_for(
        lambda: d.engine.queue.counts_by_pipeline().get("survey", {}).get("pending") == 5,
        what="5 queued jobs",
    )
    write_config(config_text(survey=False))
    plan = d.engine.reload("test")
    assert (plan.added, plan.removed) == ([], ["survey"])
    d.engine.set_paused(False)  # resuming everything: `survey`'s jobs still wait
    time.sleep(0.5)
    counts = d.engine.queue.counts_by_pipeline()["survey"]
    assert (counts["pending"], counts["dead"]) == (5, 0), counts
    wait_for(lambda: d.engine.status()["removed"], what="the jobs of `survey` in the status")
    assert d.engine.status()["removed"] == [
        {"name": "survey", "queue": {"pending": 5, "leased": 0, "waiting": 0, "dead": 0}}
    ]
    assert d.recorder.count("dead-lettered") == 0
    lines = status_lines(d.engine.status())
    assert "survey (not in the config): 5 job(s) wait in the queue until the pipeline is " in (
        "\n".join(lines)
    )
    # Back in the config: its jobs go out.
    write_config(config_text())
    assert d.engine.reload("test").added == ["survey"]
    # A file is in place a moment before its "delivered" event is recorded.
    wait_for(
        lambda: all(delivered(d, f"f{i}.txt") for i in range(5)),
        what="the 5 files delivered",
        timeout=20,
    )
    assert len(tree_files(project / "outbox")) == 5
    assert [delivered(d, f"f{i}.txt") for i in range(5)] == [1] * 5  # none twice


# --- the proof: a reload in the middle of transfers --------------------------------------------


def test_reload_mid_flight_loses_nothing_and_sends_nothing_twice(
    project: Path, write_config: WriteConfig, daemons: list[Daemon]
) -> None:
    write_config(config_text(bwlimit="bwlimit: 2MB/s", logs=False))
    d = start(project / "skyframe.yaml", daemons)
    incoming = project / "incoming"
    with (incoming / "big.mp4").open("wb") as f:
        f.truncate(12_000_000)  # 6 s at 2 MB/s
    wait_for(lambda: d.recorder.count("progress", "big.mp4") >= 1, what="big.mp4 under way")
    small = [f"small/{i:02d}.dat" for i in range(40)]
    for i, name in enumerate(small):
        make_file(incoming, name, os.urandom(20_000 + i))
    wait_for(lambda: d.recorder.count("queued") >= 41, what="the small files queued")
    assert len(tree_files(project / "outbox")) < 30, "the small files went too fast"
    # The new rule ignores *.skip: it concerns files that arrive from now on.
    write_config(
        config_text(
            bwlimit="bwlimit: 2MB/s", logs=False, rules="rules: [{ignore: {patterns: ['*.skip']}}]"
        )
    )
    status, answer, _ = request(url_of(d) + "/api/reload", "POST", {})
    assert status == 200, answer
    assert answer["changed"] == ["survey"]
    assert answer["summary"] == "changed survey"
    assert d.recorder.count("delivered", "big.mp4") == 0, "the reload came too late"
    make_file(incoming, "late/after.skip", "no")
    make_file(incoming, "late/after.txt", "yes")
    expected = {"big.mp4", "late/after.txt", *small}
    wait_for(
        lambda: set(tree_files(project / "outbox")) >= expected,
        what="every file delivered",
        timeout=60,
    )
    wait_for(lambda: d.recorder.count("rejected", "late/after.skip") >= 1, what="after.skip")
    # A file is in place a moment before its job is settled and its "delivered" recorded.
    wait_for(
        lambda: (
            all(delivered(d, name) for name in expected) and d.engine.queue.counts()["leased"] == 0
        ),
        what="every delivery settled",
    )
    assert set(tree_files(project / "outbox")) == expected
    # Exactly once each; the big upload went on, never started again.
    assert d.recorder.count("started", "big.mp4") == 1
    for name in expected:
        assert delivered(d, name) == 1, name
    manifest = {rel for _p, _s, rel, _e in d.engine.manifest.entries()}
    assert manifest == expected
    assert d.engine.queue.counts() == {"pending": 0, "leased": 0, "waiting": 0, "dead": 0}


# --- the API ------------------------------------------------------------------------------------


def test_the_api_refuses_an_invalid_config_with_its_error(
    project: Path, write_config: WriteConfig, daemons: list[Daemon]
) -> None:
    d = start(project / "skyframe.yaml", daemons)
    write_config(config_text(rules="rules: [{no_such_rule: {}}]"))
    status, answer, _ = request(url_of(d) + "/api/reload", "POST", {})
    assert status == 422
    assert answer["error"].startswith("config not reloaded: "), answer
    assert "skyframe.yaml:" in answer["error"]
    assert "no_such_rule" in answer["error"]
    # The usual checks of a POST apply: a form post from another site is refused.
    status, _, _ = request(
        url_of(d) + "/api/reload", "POST", {}, headers={"Origin": "http://evil.example"}
    )
    assert status == 403
    write_config(config_text())
    status, answer, _ = request(url_of(d) + "/api/reload", "POST", {})
    assert (status, answer["summary"]) == (200, "no change")


# --- a real daemon: SIGHUP and the watch on the config file ------------------------------------


def spawn(root: Path, *args: str) -> subprocess.Popen[bytes]:
    """``skyframe -v run ARGS skyframe.yaml`` in ``root`` (-v: the reloads are info lines)."""
    log = (root / "daemon.log").open("ab")
    with log:
        return subprocess.Popen(
            [sys.executable, "-m", "skyframe", "-v", "run", *args, "skyframe.yaml"],
            cwd=root,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )


def output(root: Path) -> str:
    return (root / "daemon.log").read_text(errors="replace")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def test_sighup_reloads_a_real_daemon_and_refuses_a_broken_config(
    project: Path, write_config: WriteConfig, processes: list[subprocess.Popen[bytes]]
) -> None:
    write_config(config_text(logs=False))
    daemon = spawn(project, "--no-watch-config")
    processes.append(daemon)
    wait_for(lambda: "watching 1 source folder(s)" in output(project), what="the start", timeout=30)
    make_file(project / "incoming", "one.txt", "1")
    wait_for((project / "outbox" / "one.txt").exists, what="one.txt delivered")

    write_config(config_text(logs=False) + "    oops: [\n")
    daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: "config not reloaded (SIGHUP)" in output(project), what="the refusal")
    assert "Traceback" not in output(project)
    make_file(project / "incoming", "two.txt", "2")
    wait_for((project / "outbox" / "two.txt").exists, what="two.txt delivered")

    write_config(config_text())  # adds `logs`
    daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: "config reloaded (SIGHUP): added logs" in output(project), what="the reload")
    make_file(project / "logs", "three.log", "3")
    wait_for((project / "logbox" / "three.log").exists, what="three.log delivered")
    assert daemon.poll() is None
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(30) == 0, output(project)
    assert "Traceback" not in output(project)


def test_a_change_of_the_config_file_reloads_it(
    project: Path, write_config: WriteConfig, processes: list[subprocess.Popen[bytes]]
) -> None:
    write_config(config_text(logs=False))
    daemon = spawn(project)
    processes.append(daemon)
    wait_for(lambda: "watching 1 source folder(s)" in output(project), what="the start", timeout=30)
    time.sleep(0.5)
    write_config(config_text())
    wait_for(
        lambda: "config reloaded (the config changed): added logs" in output(project),
        what="the reload",
    )
    make_file(project / "logs", "x.log", "x")
    wait_for((project / "logbox" / "x.log").exists, what="x.log delivered")
    # A broken save is refused once; the fixed one is taken.
    write_config(config_text() + "    oops: [\n")
    wait_for(
        lambda: "config not reloaded (the config changed)" in output(project), what="the refusal"
    )
    write_config(config_text(rules="rules: [{ignore: {patterns: ['*.no']}}]"))
    wait_for(
        lambda: "config reloaded (the config changed): changed survey" in output(project),
        what="the second reload",
    )
    assert output(project).count("config not reloaded") == 1
    assert daemon.poll() is None


def test_the_shared_bwlimit_is_on_each_sink_once_after_any_reload(
    project: Path, daemons: list[Daemon]
) -> None:
    config = project / "skyframe.yaml"

    def write(top: str) -> None:
        config.write_text(top + textwrap.dedent(config_text(bwlimit="bwlimit: 4MB/s")).lstrip())

    write("bwlimit: 1MB/s\n")
    d = start(config, daemons)

    def shared_rates() -> list[list[float]]:
        # Per sink, the rates of its buckets: the shared budget first, then its own.
        return [
            [bucket.rate for bucket in sink.limiter.buckets]
            for pipeline in d.engine.pipelines.values()
            for sink in pipeline.sinks
        ]

    assert shared_rates() == [[1e6, 4e6], [1e6]]
    d.engine.reload()  # nothing changed: the kept sinks keep one shared budget
    d.engine.reload()
    assert shared_rates() == [[1e6, 4e6], [1e6]]
    write("bwlimit: 2MB/s\n")
    d.engine.reload()
    assert shared_rates() == [[2e6, 4e6], [2e6]]
    write("")
    d.engine.reload()
    assert shared_rates() == [[4e6], []]
