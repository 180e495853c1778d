from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest

from skyframe.units import format_size, local_url_path, parse_duration, parse_since, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (1024, 1024),
        ("1B", 1),
        ("5MB", 5_000_000),
        ("5 mb", 5_000_000),
        ("1.5KB", 1500),
        ("1GiB", 1024**3),
        ("100GB", 100 * 1000**3),
        ("2TiB", 2 * 1024**4),
        ("7", 7),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "MB", "5XB", "-1", -1, True, "1.5.5GB", [1]])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (2, 2.0),
        (0.5, 0.5),
        ("500ms", 0.5),
        ("2s", 2.0),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("1d", 86400.0),
        ("1h 30m", 5400.0),
        ("5", 5.0),
        ("1H", 3600.0),
        ("250MS", 0.25),
    ],
)
def test_parse_duration(text: object, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("bad", ["", "s", "2x", "10 minutes", "-1s", -3, False, "2s5"])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2h", 1_000_000.0 - 7200),
        ("2026-11-29", datetime(2026, 11, 29).timestamp()),
        ("2026-11-29 08:00", datetime(2026, 11, 29, 8).timestamp()),
        ("2026-11-29T08:00:30.5", datetime(2026, 11, 29, 8, 0, 30, 500_000).timestamp()),
        ("2025-11-29T15:26:42+00:00", datetime(2025, 11, 29, 15, 26, 42, tzinfo=UTC).timestamp()),
        ("2026-11-29T08:00Z", datetime(2026, 11, 29, 8, tzinfo=UTC).timestamp()),
    ],
)
def test_parse_since(text: str, expected: float) -> None:
    assert parse_since(text, now=1_000_000.0) == pytest.approx(expected)


# A run of digits is no date (fromisoformat alone reads 41 ones as 1111-11-11 11:11:11).
@pytest.mark.parametrize(
    "bad", ["1" * 41, "yesterday", "2026-11-29T", "2026-13-01", "2026-11-29 8:00", "29.11.2026"]
)
def test_parse_since_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since(bad)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("outbox", "outbox"),
        ("file:///data/survey%20raw", "/data/survey raw"),
        ("file://localhost/data/x", "/data/x"),
        ("local://outbox", "outbox"),  # fsspec's reading: the rest is the path
        ("local:///data/x", "/data/x"),
        ("s3://bucket/x", "s3://bucket/x"),
    ],
)
def test_local_url_path(url: str, expected: str) -> None:
    assert local_url_path(url) == expected


@pytest.mark.skipif(os.name == "nt", reason="a host is a share there")
def test_a_file_url_with_a_host_is_refused_rather_than_dropped() -> None:
    # Dropped, file://nas/share/x wrote into /share/x of this machine.
    with pytest.raises(ValueError, match=r"a URL with a host \(nas\) names a Windows share"):
        local_url_path("file://nas/share/x")


def test_format_size() -> None:
    assert format_size(12) == "12 B"
    assert format_size(1500) == "1.5 KB"
    assert format_size(2_500_000_000) == "2.5 GB"
