"""Shared fixtures: a temporary project folder and helpers to write configs and files."""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def example_project(tmp_path: Path) -> Path:
    """A copy of the repository's example project (config, rules, processes, plugins, data)."""
    target = tmp_path / "project"
    target.mkdir()
    for name in ("skyframe.yaml", "rules.py", "processes.py"):
        shutil.copy2(REPO / name, target / name)
    shutil.copytree(
        REPO / "plugins", target / "plugins", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(REPO / "incoming", target / "incoming")
    return target


WriteConfig = Callable[[str], Path]


@pytest.fixture
def write_config(tmp_path: Path) -> WriteConfig:
    """Write a skyframe.yaml (dedented) in tmp_path, with an incoming/ folder beside it."""
    (tmp_path / "incoming").mkdir(exist_ok=True)

    def write(text: str) -> Path:
        path = tmp_path / "skyframe.yaml"
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return path

    return write


@pytest.fixture
def memory_fs() -> Iterator[fsspec.AbstractFileSystem]:
    """fsspec's memory filesystem, emptied before and after the test."""
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")
    yield fs
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")


def tree_files(root: Path) -> dict[str, bytes]:
    """Every file under root (relative POSIX path -> bytes); {} when root does not exist."""
    files = {}
    for path in sorted(root.rglob("*")):
        try:
            if path.is_file():
                files[path.relative_to(root).as_posix()] = path.read_bytes()
        except FileNotFoundError:  # a temporary file renamed into place meanwhile
            continue
    return files


def make_file(
    root: Path, relpath: str, data: bytes | str = b"data", mtime: float | None = None
) -> Path:
    """Create a file (and its folders) under root."""
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mtime is not None:
        import os

        os.utime(path, (mtime, mtime))
    return path
