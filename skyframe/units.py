"""Human-friendly sizes (``5MB``, ``1GiB``), durations (``2s``, ``10m``, ``1h30m``) and rates
(``2MB/s``, ``10Mbit/s``).

``Size``, ``Duration`` and ``Rate`` are annotated types: use them in a rule's or a process's
signature and YAML options are parsed and checked with the same messages as skyframe's own keys.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

from pydantic import BeforeValidator

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", re.IGNORECASE)
#: The longest duration accepted: 100 years (longer waits overflow the clocks' timeouts).
MAX_DURATION = 36500 * 86400.0


def parse_size(value: Any) -> int:
    """Return a byte count from ``1024``, ``"5MB"`` (decimal) or ``"1GiB"`` (binary)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 5MB or 1GiB, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            number, unit = match.groups()
            factor = _SIZE_UNITS.get(unit.lower())
            if factor is not None:
                size = float(number) * factor
                if not math.isfinite(size):  # "9999...9" beyond what a float holds
                    raise ValueError(f"invalid size {value!r}: too large")
                return int(size)
    raise ValueError(
        f"invalid size {value!r}: use bytes or a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
    )


def parse_duration(value: Any) -> float:
    """Return seconds from ``2``, ``"500ms"``, ``"2s"``, ``"10m"``, ``"1h30m"`` or ``"1d"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 2s or 10m, not a boolean")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return _finite_duration(value, value)
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", text):  # "5" from ${VAR}: seconds
            return _finite_duration(float(text), value)
        if text and _DURATION_PART_RE.sub("", text) == "":
            seconds = sum(
                float(number) * _DURATION_UNITS[unit.lower()]
                for number, unit in _DURATION_PART_RE.findall(text)
            )
            return _finite_duration(seconds, value)
    raise ValueError(
        f"invalid duration {value!r}: use seconds or units, e.g. 500ms, 2s, 10m, 1h30m"
    )


def _finite_duration(seconds: float, value: object) -> float:
    # YAML's .nan and .inf are floats, and so is "9" * 400 once read: neither is a duration.
    if isinstance(seconds, float) and not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r}: not a finite number")
    if seconds > MAX_DURATION:  # a huge int is compared exactly, never converted
        raise ValueError(f"invalid duration {value!r}: longer than 100 years")
    return float(seconds)


# Bits per second: 10Mbit/s, 10Mbps. The "b" of "bps" must be lowercase ("MBps" is not accepted).
_BIT_UNITS = {
    "bit": 1,
    "kbit": 1000,
    "mbit": 1000**2,
    "gbit": 1000**3,
    "tbit": 1000**4,
}
_RATE_RE = re.compile(
    r"^\s*([-+]?\d+(?:\.\d+)?)\s*"
    r"(?:([a-zA-Z]*?)\s*/\s*[sS]|([kKmMgGtT]?)bps)\s*$"
)
# "Mb/s" means megabits to network people but megabytes to parse_size: refuse the guess.
_AMBIGUOUS_RATE_UNIT = re.compile(r"^[kKmMgGtT]?b$")
_RATE_HINT = "use a size per second such as 2MB/s, 512KiB/s or 10Mbit/s"


def parse_rate(value: Any) -> float:
    """Return bytes per second from ``2000000``, ``"2MB/s"``, ``"512KiB/s"`` or ``"10Mbit/s"``.

    Strings must say ``/s`` (or ``bps``): ``"2MB"`` is a size, not a rate. ``kbit``, ``Mbit``,
    ``Gbit`` and ``kbps``, ``Mbps``, ``Gbps`` are decimal *bits* per second (``10Mbit/s`` is
    1.25 MB/s). A lowercase ``b`` after a decimal prefix (``Mb/s``) is refused as ambiguous.
    """
    if isinstance(value, bool):
        raise ValueError("expected a rate such as 2MB/s or 10Mbit/s, not a boolean")
    rate: float | None = None
    if isinstance(value, int | float):
        rate = float(value) if abs(value) < 1e300 else None  # a huge int overflows a float
    elif isinstance(value, str):
        match = _RATE_RE.match(value)
        if match:
            number, size_unit, bit_prefix = match.groups()
            factor: float | None
            if bit_prefix is not None:
                factor = _BIT_UNITS[bit_prefix.lower() + "bit"] / 8
            elif _AMBIGUOUS_RATE_UNIT.match(size_unit):
                factor = None
            elif size_unit.lower() in _BIT_UNITS:
                factor = _BIT_UNITS[size_unit.lower()] / 8
            else:
                factor = _SIZE_UNITS.get(size_unit.lower())
            if factor is not None:
                rate = float(number) * factor
    if rate is None or math.isnan(rate) or math.isinf(rate):
        raise ValueError(f"invalid rate {value!r}: {_RATE_HINT}")
    if rate <= 0:
        raise ValueError(f"a rate must be positive, not {value!r}")
    return rate


def parse_since(value: str, now: float | None = None) -> float:
    """A point in time (epoch seconds) given as a duration back (``90m``, ``2h``, ``7d``) or as
    an ISO date or date and time (``2026-11-29``, ``2026-11-29 08:00``, local time)."""
    try:
        return (time.time() if now is None else now) - parse_duration(value)
    except ValueError:
        pass
    try:
        # Only the extended form: fromisoformat also reads basic ones (20261129T0800), where
        # a slip of the keyboard (a run of digits) is a date of the year 1111.
        if not _ISO_DATE.fullmatch(value):
            raise ValueError(value)
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ValueError(
            f"{value!r} is neither a duration (90m, 2h, 7d) nor a date (2026-11-29 08:00)"
        ) from None


#: ``2026-11-29``, with a time (``08:00``, ``08:00:30``, ``08:00:30.5``) after ``T`` or a space,
#: and a UTC offset (``Z``, ``+02:00``) after the time.
_ISO_DATE = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?(?:Z|[+-]\d{2}:\d{2})?)?"
)


def expand_home(value: str | os.PathLike[str]) -> Path:
    """A path with ``~`` and ``~user`` expanded; ValueError naming the user when this machine
    has no such user (pathlib raises RuntimeError)."""
    path = Path(value)
    try:
        return path.expanduser()
    except RuntimeError:
        raise ValueError(f"{value}: no user {path.parts[0][1:]!r} on this machine") from None


def local_url_path(url: str) -> str:
    """The path a ``file://`` or ``local://`` URL names (``url`` itself when it is neither).

    ``file:///C:/survey`` is ``C:\\survey`` on Windows and ``file://nas/share`` the share
    ``\\\\nas\\share``; elsewhere a ``file://`` URL with a host is refused (ValueError):
    dropping the host would write into a folder of the same name at the root of this machine.
    After ``local://`` (fsspec's name for the same) comes the path, as fsspec reads it."""
    if url.startswith("local://"):
        return url.removeprefix("local://")
    if not url.startswith("file://"):
        return url
    parts = urlsplit(url)
    path = url2pathname(parts.path)
    if parts.netloc in ("", "localhost"):
        return path
    if os.name == "nt":
        return f"\\\\{parts.netloc}{path}"
    raise ValueError(
        f"{url}: a URL with a host ({parts.netloc}) names a Windows share; give the folder "
        "where it is mounted here"
    )


def format_size(n: float) -> str:
    """Render a byte count for people: ``1.5 MB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_rate(bytes_per_s: float) -> str:
    """Render bytes per second for people: ``2.0 MB/s``."""
    return f"{format_size(bytes_per_s)}/s"


@dataclass(frozen=True)
class Label:
    """The name an annotated option type is shown under in ``skyframe plugins``."""

    name: str


Size = Annotated[int, BeforeValidator(parse_size), Label("Size")]
Duration = Annotated[float, BeforeValidator(parse_duration), Label("Duration")]
Rate = Annotated[float, BeforeValidator(parse_rate), Label("Rate")]
