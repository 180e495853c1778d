"""``bandwidth.metered: pause``: uploads held while the system says the link is metered.

The daemon asks NetworkManager through ``busctl`` on Linux; here a ``busctl`` on PATH answers
what a file holds, as NetworkManager would (``u 1`` metered, ``u 2`` not).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import Daemon, skyframe, wait_for

from skyframe.metered import MeteredProbe, from_networkmanager, from_windows
from skyframe.tray import state_of


def answer(code: int, out: str = "", err: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess([], code, out, err)


def test_what_the_systems_say() -> None:
    assert [from_networkmanager(f"u {n}\n") for n in range(5)] == [None, True, False, True, False]
    assert from_networkmanager("s nonsense") is None
    assert [from_windows(w) for w in ("Fixed\r\n", "Variable", "Unrestricted", "Unknown")] == [
        True,
        True,
        False,
        None,
    ]


def test_the_probe_says_why_it_cannot_tell() -> None:
    asked: list[list[str]] = []

    def nm(value: str) -> MeteredProbe:
        return MeteredProbe("linux", lambda c: asked.append(c) or answer(0, value))

    assert nm("u 3\n")() is True
    assert asked[0][:2] == ["busctl", "--system"]
    assert asked[0][-1] == "Metered"
    unknown = nm("u 0\n")
    assert unknown() is None
    assert unknown.problem == "NetworkManager does not know whether the link is metered"
    down = MeteredProbe(
        "linux", lambda c: answer(1, err="Failed to connect to bus: No such file or directory\n")
    )
    assert down() is None
    assert down.problem == (
        "NetworkManager did not answer: Failed to connect to bus: No such file or directory"
    )

    def missing(command: list[str]) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError(command[0])

    absent = MeteredProbe("linux", missing)
    assert absent() is None
    assert absent.problem == "busctl is not installed"
    assert MeteredProbe("win32", lambda c: answer(0, "Variable\r\n"))() is True
    mac = MeteredProbe("darwin", missing)
    assert mac() is None
    assert mac.problem == "darwin does not say whether a link is metered"


CONFIG = """\
state_dir: state
bandwidth: {metered: pause, check_every: 100ms}
pipelines:
  - name: survey
    source: {path: incoming, settle: 0, rescan: 1h}
    sinks:
      - url: outbox
"""


def test_uploads_wait_while_the_link_is_metered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    said = tmp_path / "networkmanager"
    said.write_text("u 1\n", encoding="utf-8")
    fake = tmp_path / "bin" / "busctl"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\ncat "{said}"\n', encoding="utf-8")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{__import__('os').environ['PATH']}")
    (tmp_path / "incoming").mkdir()
    config = tmp_path / "skyframe.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    with Daemon(config) as daemon:
        wait_for(lambda: daemon.engine.status()["metered"], timeout=10, what="the metered hold")
        (tmp_path / "incoming" / "DJI_0001.JPG").write_bytes(b"photo")
        wait_for(lambda: daemon.recorder.count("queued") == 1, timeout=10, what="queued")
        wait_for(
            lambda: daemon.engine.status()["pipelines"][0]["queue"]["pending"] == 1,
            timeout=10,
            what="the file waiting in the queue",
        )
        assert daemon.engine.status()["paused"] is False  # nobody paused it: the link holds it
        assert not (tmp_path / "outbox" / "DJI_0001.JPG").exists()

        said.write_text("u 4\n", encoding="utf-8")  # NetworkManager: "guessed not metered"
        delivered = tmp_path / "outbox" / "DJI_0001.JPG"
        wait_for(delivered.exists, timeout=10, what="delivery")
        assert daemon.engine.status()["metered"] is False
    reasons = [
        (e.kind, e.reason) for e in daemon.recorder.events if e.kind in ("paused", "resumed")
    ]
    assert reasons == [
        ("paused", "the link is metered"),
        ("resumed", "the link is not metered"),
    ]


def test_a_sink_cannot_say_metered(tmp_path: Path) -> None:
    (tmp_path / "skyframe.yaml").write_text(
        CONFIG.replace("bandwidth: {metered: pause, check_every: 100ms}\n", "").replace(
            "      - url: outbox\n", "      - url: outbox\n        bandwidth: {metered: pause}\n"
        ),
        encoding="utf-8",
    )
    done = skyframe(tmp_path, "validate", "skyframe.yaml")
    assert done.returncode == 2
    assert done.stderr.strip().endswith(
        "metered is about the machine's link: set it at the top level"
    )


def test_the_tray_shows_the_metered_hold() -> None:
    state = state_of({"paused": False, "metered": True, "pipelines": [], "transfers": []})
    assert (state.kind, state.paused) == ("paused", False)
    assert state.title == "skyframe: held, the link is metered"
