"""Names a local folder cannot hold: Windows's rules (checked with Windows's semantics on any
machine), and two names that differ only in case on a folder that ignores case."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import run_once

from skyframe import names
from skyframe.protocols.generic import local

CONFIG = """\
state_dir: state
retry: {max_attempts: 1, initial: 10ms, max: 10ms}
pipelines:
  - name: survey
    source: {path: incoming, settle: 0, recursive: true}
    sinks:
      - url: outbox
"""


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("f1/CON.JPG", "'CON.JPG' is a device name Windows reserves (CON)"),
        ("f1/con", "'con' is a device name Windows reserves (CON)"),
        ("AUX/DJI_0001.JPG", "'AUX' is a device name Windows reserves (AUX)"),
        ("f1/COM1.log", "'COM1.log' is a device name Windows reserves (COM1)"),
        ("f1/LPT²", "'LPT²' is a device name Windows reserves (LPT²)"),
        ("f1/nul .txt", "'nul .txt' is a device name Windows reserves (NUL)"),
        ("f1/12:30.jpg", "'12:30.jpg' contains ':', which Windows does not allow in a name"),
        ('f1/say "hi".txt', "'say \"hi\".txt' contains '\"', which Windows does not allow"),
        ("f1/what?.txt", "'what?.txt' contains '?'"),
        ("f1/end.", "'end.' ends with a dot"),
        ("f1 /x.jpg", "'f1 ' ends with a space"),
    ],
)
def test_names_windows_refuses(name: str, problem: str) -> None:
    found = names.windows_problem(name)
    assert found is not None
    assert found.startswith(problem)


@pytest.mark.parametrize(
    "name", ["f1/DJI_0001.JPG", "CONSOLE.txt", "con_1.txt", "COM10.log", "a.b.c/ок.jpg", "LPT0"]
)
def test_names_windows_takes(name: str) -> None:
    assert names.windows_problem(name) is None


def test_case_twins() -> None:
    held = ["DJI_0001.JPG", "notes.txt"]
    # A folder that ignores case finds dji_0001.jpg, and holds it as DJI_0001.JPG.
    assert names.case_twin("dji_0001.jpg", True, held) == "DJI_0001.JPG"
    assert names.case_twin("DJI_0001.JPG", True, held) is None  # the same file again
    assert names.case_twin("dji_0002.jpg", False, held) is None
    # A folder that minds case may hold both: it finds the exact one.
    assert names.case_twin("dji_0001.jpg", True, [*held, "dji_0001.jpg"]) is None


def project(tmp_path: Path, files: dict[str, bytes]) -> Path:
    for relpath, data in files.items():
        path = tmp_path / "incoming" / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    config = tmp_path / "skyframe.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    return config


def test_a_windows_folder_refuses_a_reserved_name_and_takes_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "WINDOWS", True)
    config = project(tmp_path, {"f1/CON.JPG": b"con", "f1/DJI_0001.JPG": b"photo"})
    summary = run_once(config)
    assert summary.delivered == 1
    assert (tmp_path / "outbox" / "f1" / "DJI_0001.JPG").read_bytes() == b"photo"
    assert summary.failed == {
        "survey:f1/CON.JPG": "remote name 'f1/CON.JPG' cannot be written on Windows: "
        "'CON.JPG' is a device name Windows reserves (CON)"
    }
    assert summary.dead_letters == 1


def test_a_folder_that_ignores_case_does_not_merge_two_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = project(tmp_path, {"f1/DJI_0001.JPG": b"first"})
    assert run_once(config).delivered == 1

    def found_ignoring_case(path: str) -> bool:  # what such a folder answers
        folder, name = os.path.split(path)
        try:
            return any(e.casefold() == name.casefold() for e in os.listdir(folder))
        except OSError:
            return False

    monkeypatch.setattr(names.os.path, "lexists", found_ignoring_case)
    (tmp_path / "incoming" / "f1" / "dji_0001.jpg").write_bytes(b"second")
    summary = run_once(config)
    assert summary.delivered == 0
    error = summary.failed["survey:f1/dji_0001.jpg"]
    assert error.endswith(
        "the folder ignores case and already holds 'DJI_0001.JPG'; 'dji_0001.jpg' would replace it"
    )
    assert (tmp_path / "outbox" / "f1" / "DJI_0001.JPG").read_bytes() == b"first"
    assert not (tmp_path / "outbox" / "f1" / "dji_0001.jpg").exists()
