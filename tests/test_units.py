from __future__ import annotations

import pytest

from skyframe.units import format_size, parse_duration, parse_size


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


def test_format_size() -> None:
    assert format_size(12) == "12 B"
    assert format_size(1500) == "1.5 KB"
    assert format_size(2_500_000_000) == "2.5 GB"
