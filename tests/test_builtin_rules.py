"""Each stock rule, called the way the engine calls it: through the registry with YAML options."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from skyframe.builtin.rules import DEFAULT_IGNORES
from skyframe.events import FileEvent
from skyframe.plugin_manager import get_plugin_manager
from skyframe.registry import Registry
from skyframe.storage import temporary_path

REGISTRY = Registry.from_plugin_manager(get_plugin_manager(load_entry_points=False))


def event(relpath: str, size: int = 10, age: float = 0.0) -> FileEvent:
    mtime_ns = int((time.time() - age) * 1e9)
    return FileEvent("p", Path("/src") / relpath, relpath, size, mtime_ns)


def verdict(name: str, ev: FileEvent, **options: Any) -> bool | str:
    spec = REGISTRY.rules[name]
    return spec.func(ev, **spec.validate_options(options))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "relpath",
    [
        ".DJI_0001.JPG.swp",
        "flight/notes.txt~",
        "video.MP4.part",
        "download.crdownload",
        "a/.DS_Store",
        "Thumbs.db",
        "sub/desktop.ini",
        "4913",
        "x/~$report.docx",
        "._DJI_0001.JPG",
        ".Trash-1000/files/DJI_0001.JPG",
        "capture.TMP",
        temporary_path("flight/DJI_0001.JPG"),
    ],
)
def test_ignore_defaults_reject_swap_temp_and_partial(relpath: str) -> None:
    result = verdict("ignore", event(relpath))
    assert isinstance(result, str)
    assert result.startswith("matches ")


@pytest.mark.parametrize("relpath", ["DJI_0001.JPG", "flight-01/log.tlog", "a/b/c.mp4", "part.jpg"])
def test_ignore_defaults_accept_media(relpath: str) -> None:
    assert verdict("ignore", event(relpath)) is True


def test_ignore_own_patterns_and_defaults_off() -> None:
    assert verdict("ignore", event("x/old.BAK"), patterns=["*.bak"]) == "matches '*.bak'"
    assert verdict("ignore", event("x/old.BAK"), patterns=["*.bak"], case_sensitive=True) is True
    assert verdict("ignore", event("x.part"), defaults=False) is True
    assert verdict("ignore", event("raw/a.dng"), patterns=["raw/*.dng"]) == "matches 'raw/*.dng'"
    assert verdict("ignore", event("jpg/a.dng"), patterns=["raw/*.dng"]) is True
    assert verdict("ignore", event("cache/x/a.jpg"), patterns=["cache"]) == "matches 'cache'"
    assert verdict("ignore", event("x/raw/a.dng"), patterns=["/raw/*.dng"]) is True  # anchored
    assert verdict("ignore", event("raw/a.dng"), patterns=["/raw/*.dng"]) == "matches '/raw/*.dng'"
    assert (
        verdict("ignore", event("a/b/c/d.tif"), patterns=["a/**/*.tif"]) == "matches 'a/**/*.tif'"
    )
    assert verdict("ignore", event("a/d.tif"), patterns=["a/**/*.tif"]) == "matches 'a/**/*.tif'"
    assert verdict("ignore", event("b/d.tif"), patterns=["/a/**/*.tif"]) is True
    # a folder pattern covers what is inside it; a trailing slash means folders only
    assert (
        verdict("ignore", event("scratch/x/y.jpg"), patterns=["/scratch"]) == "matches '/scratch'"
    )
    assert verdict("ignore", event("a/raw/x.dng"), patterns=["a/raw"]) == "matches 'a/raw'"
    assert verdict("ignore", event("cache"), patterns=["cache/"]) is True
    assert verdict("ignore", event("cache/a.jpg"), patterns=["cache/"]) == "matches 'cache/'"
    assert verdict("ignore", event("x/raw"), patterns=["raw/**"]) is True
    assert "*.part" in DEFAULT_IGNORES


def test_include() -> None:
    assert verdict("include", event("f/DJI_0001.JPG"), patterns=["DJI_*"]) is True
    result = verdict("include", event("f/IMG_1.JPG"), patterns=["DJI_*", "*.mp4"])
    assert result == "matches none of DJI_*, *.mp4"


def test_type_by_extension_and_mime() -> None:
    assert verdict("type", event("a.JPG"), extensions=["jpg"]) is True
    assert verdict("type", event("a.dng"), extensions=[".DNG"]) is True
    assert verdict("type", event("a.mp4"), mime=["video/*"]) is True
    assert verdict("type", event("a.png"), mime=["image/png"]) is True
    result = verdict("type", event("a.txt"), extensions=["jpg"], mime=["video/*"])
    assert result == "type .txt (text/plain) not accepted"
    assert "without extension" in str(verdict("type", event("README"), extensions=["jpg"]))


def test_size() -> None:
    assert verdict("size", event("a", size=1), min="1B") is True
    assert verdict("size", event("a", size=0), min="1B") == "0 B is below the minimum of 1 B"
    assert verdict("size", event("a", size=2_000_000), max="1MB") == (
        "2.0 MB is above the maximum of 1.0 MB"
    )
    assert verdict("size", event("a", size=1024**3), max="1GiB") is True


def test_age() -> None:
    assert verdict("age", event("a", age=60), min="30s") is True
    assert "younger than 30s" in str(verdict("age", event("a", age=5), min="30s"))
    assert "older than 86400s" in str(verdict("age", event("a", age=2 * 86400), max="1d"))
    assert verdict("age", event("a", age=3600), max="1d") is True
