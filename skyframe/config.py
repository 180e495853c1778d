"""The YAML config: safe loading with positions, ``${VAR}`` interpolation, pydantic models.

Every error raised from here is a :class:`ConfigError` naming file, line and column, on one
line, without a URL password or a value taken from the environment.
"""

from __future__ import annotations

import difflib
import errno
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import SplitResult, urlsplit, urlunsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from skyframe.bandwidth import Schedule, parse_schedule_entry
from skyframe.display import is_utf8
from skyframe.errors import ConfigError, Location
from skyframe.events import LifecycleKind
from skyframe.units import Duration, Rate, Size, expand_home, local_url_path

YamlPath = tuple[str | int, ...]

DEFAULT_CONFIG_NAME = "skyframe.yaml"

#: The most values (scalars, lists, mappings) a config may hold once its aliases are expanded:
#: real configs hold a few hundred; a "billion laughs" of nested aliases holds billions.
MAX_VALUES = 100_000
#: The largest config file read: a config is a few kilobytes, this is another file.
MAX_CONFIG_BYTES = 10_000_000
#: The shortest API token accepted when the API listens on anything but loopback.
MIN_TOKEN_LENGTH = 16

#: Values from the environment at least this long are hidden wherever they appear in an error.
_MIN_HIDDEN = 4
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _home_known(value: str) -> str:
    if value.startswith("~"):
        expand_home(value)  # a ~user this machine does not have: refused here, with its place
    return value


def _local_url(value: str) -> str:
    _home_known(local_url_path(value))  # a file:// URL with a host (not on Windows): refused
    return value  # as written: the sink's name, and its records, follow it


#: A path (or URL) that may start with ``~`` or ``~user``.
HomePath = Annotated[str, AfterValidator(_home_known)]
#: A sink's URL: a path as HomePath, or a ``file://`` URL whose path is one.
SinkURL = Annotated[str, AfterValidator(_local_url)]


def _not_bool(value: Any) -> Any:
    # pydantic takes true for 1: "workers: true" is a mistake, not a count.
    if isinstance(value, bool):
        raise ValueError(f"expected a whole number, not {str(value).lower()}")
    return value


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be longer than 0 (e.g. 1s or 500ms)")
    return seconds


#: An integer that refuses booleans (numbers written as strings, from ``${VAR}``, still pass).
Count = Annotated[int, BeforeValidator(_not_bool)]
#: A duration where 0 makes no sense (an interval, a timeout, a delay between retries).
PositiveDuration = Annotated[Duration, AfterValidator(_positive)]

#: RFC 7230 ``token``: the characters a header name may hold.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Control characters other than tab: CR and LF would split the request, NUL cuts it.
_HEADER_VALUE_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _header_name(name: str) -> str:
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError(
            f"invalid header name {name!r}: use letters, digits and !#$%&'*+-.^_`|~ only"
        )
    return name


def _header_value(value: str) -> str:
    # The value is often a secret: say what is wrong with it, never what it is.
    if _HEADER_VALUE_CONTROL.search(value):
        raise ValueError(
            "the header value contains a control character (CR, LF, NUL...): "
            "no request could carry it"
        )
    return value


def _schedule_entry(value: Any) -> Any:
    parse_schedule_entry(value)  # each entry's own error, at its own line
    return value


class BandwidthConfig(_Model):
    """An upload rate limit that follows the local time of day (and weekday), and what to do
    on a metered link."""

    schedule: list[Annotated[str, BeforeValidator(_schedule_entry)]] | None = Field(
        None,
        description="entries '[Ddd-]HH:MM RATE' (RATE: a rate, or off for no limit); the "
        "latest at or before the local time is in force",
    )
    metered: Literal["pause", "ignore"] = Field(
        "ignore",
        description="pause: hold uploads while the system says its link is metered "
        "(top level only)",
    )
    check_every: PositiveDuration = Field(
        60.0, description="how often to ask the system whether its link is metered"
    )

    @field_validator("schedule", mode="before")
    @classmethod
    def _a_list(cls, entries: Any) -> Any:
        if isinstance(entries, str):
            raise ValueError(
                f"expected a list of entries, such as [{entries!r}, '19:00 off'], not one string"
            )
        return entries

    @field_validator("schedule")
    @classmethod
    def _whole_schedule(cls, entries: list[str] | None) -> list[str] | None:
        if entries is not None:
            Schedule.parse(entries)  # not empty, no two entries for one time
        return entries

    def timetable(self) -> Schedule | None:
        """The schedule, parsed; None without one."""
        return None if self.schedule is None else Schedule.parse(self.schedule)


def _not_both_limits(
    bandwidth: BandwidthConfig | None, info: ValidationInfo
) -> BandwidthConfig | None:
    # bwlimit is validated first (it comes first in the model): both at one level is a mistake.
    has_schedule = bandwidth is not None and bandwidth.schedule is not None
    if has_schedule and info.data.get("bwlimit") is not None:
        raise ValueError(
            "set either bwlimit or bandwidth.schedule here, not both (a schedule of one "
            "entry, such as ['00:00 2MB/s'], is a limit at all hours)"
        )
    return bandwidth


def upload_limit(level: Config | SinkConfig) -> float | Schedule | None:
    """The upload limit the top level or a sink sets: its ``bwlimit``, its
    ``bandwidth.schedule``, or None."""
    schedule = level.bandwidth.timetable() if level.bandwidth is not None else None
    return schedule if schedule is not None else level.bwlimit


class SourceConfig(_Model):
    """Where files land."""

    follow_symlinks: Literal["inside", "all", "none"] = Field(
        "inside",
        description=(
            "symbolic links to files that are sent: those whose target is inside the source, "
            "all, or none"
        ),
    )
    path: HomePath = Field(description="folder to watch, relative to the config file")
    recursive: bool = Field(True, description="include sub-folders")
    settle: Duration = Field(2.0, description="seconds a file must be unchanged to be ready")
    rescan: PositiveDuration = Field(600.0, description="full catch-up scan interval in watch mode")
    polling: bool = Field(False, description="poll instead of inotify (network mounts)")
    poll_interval: PositiveDuration = Field(5.0, description="seconds between polls when polling")


class SinkConfig(_Model):
    """One destination: a local folder or any fsspec URL."""

    url: SinkURL = Field(description="a path relative to the config file, or an fsspec URL")
    name: str | None = Field(None, description="a stable name; defaults to the URL")
    options: dict[str, Any] = Field(default_factory=dict, description="fsspec storage options")
    concurrency: Count | None = Field(
        None,
        ge=1,
        le=64,
        description="files sent to this sink at once (default: 4 local, 8 SFTP, 16 S3/GCS)",
    )
    on_delete: Literal["keep", "delete"] = Field(
        "keep", description="delete the remote copy when the local file is deleted"
    )
    bwlimit: Rate | None = Field(
        None, description="upload rate limit for this sink (e.g. 2MB/s, 10Mbit/s)"
    )
    bandwidth: BandwidthConfig | None = Field(
        None, description="this sink's upload rate limit by the clock (instead of bwlimit)"
    )

    @field_validator("bandwidth")
    @classmethod
    def _one_limit(
        cls, bandwidth: BandwidthConfig | None, info: ValidationInfo
    ) -> BandwidthConfig | None:
        if bandwidth is not None and "metered" in bandwidth.model_fields_set:
            raise ValueError("metered is about the machine's link: set it at the top level")
        return _not_both_limits(bandwidth, info)

    @field_validator("url")
    @classmethod
    def _not_empty(cls, url: str) -> str:
        # An empty path is the config's own folder: refuse it rather than guess.
        if not url.strip():
            raise ValueError("the sink url is empty (is a variable it names set but empty?)")
        typo = url_typo(url)
        if typo:
            raise ValueError(typo)
        return url

    @property
    def key(self) -> str:
        """The name deliveries are recorded under (manifest, events): never holds a password."""
        if self.name:
            return self.name
        return url_without_password(self.url)


class RetryConfig(_Model):
    """Exponential backoff with jitter, then the dead-letter list."""

    max_attempts: Count = Field(5, ge=1, description="attempts before a job is dead-lettered")
    initial: PositiveDuration = Field(1.0, description="first delay")
    max: PositiveDuration = Field(300.0, description="longest delay")

    @model_validator(mode="after")
    def _initial_within_max(self) -> RetryConfig:
        given = {"initial", "max"} <= self.model_fields_set  # max alone: its delays are max
        if given and self.initial > self.max:  # every delay would be max: a slip
            raise ValueError(
                f"initial ({self.initial:g} s) is longer than max ({self.max:g} s), the longest "
                "delay"
            )
        return self


class StepConfig(_Model):
    """A rule or process: a bare name, or a one-key mapping of name to options."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value, "options": {}}
        if isinstance(value, Mapping) and set(value) != {"name", "options"}:
            if len(value) != 1:
                raise ValueError("expected a name, or a one-key mapping of name to its options")
            ((name, options),) = value.items()
            if options is None:
                options = {}
            if not isinstance(options, Mapping):
                raise ValueError(f"the options of {name!r} must be a mapping of option: value")
            return {"name": name, "options": dict(options)}
        return value


class GroupConfig(_Model):
    """Files that belong together (a flight): which ones, and when the group is complete."""

    name: str = Field(
        pattern=r"^[a-z][a-z0-9_-]*$",
        description="the group's name (flight); its completion is the event NAME-complete",
    )
    by: Literal["folder", "time_gap"] = Field(
        "folder",
        description="folder: the files of one folder; time_gap: files captured (or modified) "
        "less than gap apart",
    )
    quiet: PositiveDuration = Field(
        600.0, description="complete when no file of the group has arrived for this long"
    )
    gap: PositiveDuration = Field(300.0, description="by: time_gap: a longer pause starts a group")
    report: bool = Field(True, description="deliver the built-in report with the group")

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        if isinstance(value, Mapping) and "name" not in value:
            if len(value) != 1:
                raise ValueError("expected a name, or a one-key mapping of name to its options")
            ((name, options),) = value.items()
            if options is None:
                options = {}
            if not isinstance(options, Mapping):
                raise ValueError(f"the options of {name!r} must be a mapping of option: value")
            return {"name": name, **options}
        return value


PriorityLevel = Literal["high", "normal", "low"]
SMALL_FIRST = 16 * 1000**2  #: the default ``small_first``: photos, flight logs, sidecars


class PriorityConfig(_Model):
    """Which files go first: small ones by default, and any the globs name."""

    small_first: Size | None = Field(
        SMALL_FIRST,
        ge=0,
        description="files up to this size are high priority; null: all normal",
    )
    paths: dict[str, PriorityLevel] = Field(
        default_factory=dict,
        description="glob -> high, normal or low; the first glob matching a file decides "
        "(before small_first)",
    )


class PipelineConfig(_Model):
    """A source, its rules and processes, and the sinks it delivers to."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="unique name")
    source: SourceConfig
    rules: list[StepConfig] = Field(default_factory=list, description="all must accept")
    processes: list[StepConfig] = Field(default_factory=list, description="run in order")
    sinks: list[SinkConfig] = Field(min_length=1, description="destinations")
    retry: RetryConfig | None = Field(None, description="overrides the top-level retry")
    groups: list[GroupConfig] = Field(
        default_factory=list, description="files that belong together, such as flights"
    )
    priority: PriorityConfig = Field(
        default_factory=PriorityConfig, description="which files are delivered first"
    )

    @field_validator("groups")
    @classmethod
    def _unique_groups(cls, groups: list[GroupConfig]) -> list[GroupConfig]:
        names = [g.name for g in groups]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two groups named {name!r}")
        return groups


def is_loopback(host: str) -> bool:
    """True for a name or address of this machine only: localhost, 127.0.0.0/8, ::1."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class ApiConfig(_Model):
    """The daemon's HTTP API and dashboard."""

    enabled: bool = Field(True, description="serve the API and dashboard while the daemon runs")
    listen: str = Field(
        "127.0.0.1:8765",
        description="host:port to listen on (port 0 picks a free one); "
        "anything but loopback needs a token",
    )
    token: str | None = Field(
        None,
        description="bearer token every request must carry; take it from the environment "
        f"(${{SKYFRAME_API_TOKEN}}); at least {MIN_TOKEN_LENGTH} characters off loopback",
        validate_default=True,
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, listen: str) -> str:
        _split_listen(listen)
        return listen

    @field_validator("token")
    @classmethod
    def _token_off_loopback(cls, token: str | None, info: ValidationInfo) -> str | None:
        if not info.data.get("enabled", True) or "listen" not in info.data:
            return token  # disabled, or listen is wrong and reported on its own
        host, _port = _split_listen(info.data["listen"])
        if is_loopback(host):
            return token
        if not token:
            raise ValueError(
                f"listening on {host} (not loopback) needs a token: set api.token "
                "(e.g. token: ${SKYFRAME_API_TOKEN})"
            )
        if len(token) < MIN_TOKEN_LENGTH:
            # Anyone who can reach the port could guess a short one: say so, never show it.
            raise ValueError(
                f"listening on {host} (not loopback) needs a token of at least "
                f"{MIN_TOKEN_LENGTH} characters, this one has {len(token)} "
                "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(24))')"
            )
        return token

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of ``listen``; IPv6 hosts may be written in brackets."""
        return _split_listen(self.listen)


def _host_and_port(parts: SplitResult) -> bool:
    """Whether a URL names a host, and a port that can be (or none)."""
    try:
        port = parts.port  # ValueError beyond 65535 or not a number
    except ValueError:
        return False
    return bool(parts.hostname) and port != 0


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"listen must be host:port, e.g. 127.0.0.1:8765, not {listen!r}")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed or "[" in host or "]" in host or ":" in host:
        try:  # an IPv6 address, which goes in brackets: [::1]:8765
            if not bracketed:
                raise ValueError(host)
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(
                f"listen must be host:port, with an IPv6 address in brackets "
                f"([::1]:8765), not {listen!r}"
            ) from None
        return host[1:-1], int(port)
    return host, int(port)


#: A scheme of two letters or more (one is a Windows drive) and a colon without "//", or
#: "//" without the colon.
_SCHEME_TYPO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+)(?::(?!//)|//)(.*)", re.DOTALL)


def url_typo(url: str) -> str | None:
    """What is wrong with a sink URL that reads as a local folder but was meant as a URL of a
    known scheme (``s3:bucket``, ``s3//bucket``): the files would stay on this machine."""
    typo = _SCHEME_TYPO.fullmatch(url)
    if typo is None or typo.group(1).lower() not in _known_schemes():
        return None
    scheme, rest = typo.group(1), typo.group(2).lstrip("/")
    return (
        f"{url!r} would be a local folder of that name; a URL of {scheme} is "
        f"{scheme}://{rest or 'BUCKET/PATH'}"
    )


def _known_schemes() -> frozenset[str]:
    """The URL schemes fsspec knows (the protocols skyframe and its plugins use among them)."""
    from fsspec.registry import known_implementations, registry

    return frozenset({*known_implementations, *registry, "file", "local"})


#: A Dask scheduler's address: an optional scheme (tcp://, tls://...), a host, a port.
_DASK_ADDRESS = re.compile(
    r"(?:[a-z][a-z0-9+.-]*://)?(?:\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(\d{1,5})/?"
)


def _dask_address(value: str) -> str:
    # Checked here: a client given a wrong one fails each call, then hangs the exit.
    found = _DASK_ADDRESS.fullmatch(value)
    if value != "local" and (found is None or not 0 < int(found.group(1)) < 65536):
        raise ValueError(
            f"{value!r} is not a scheduler's address: expected tcp://HOST:PORT "
            "(tcp://10.0.0.5:8786), or local"
        )
    return value


class ExecutorConfig(_Model):
    """Where processes marked ``executor: NAME`` run: a Dask cluster."""

    dask: Annotated[str, AfterValidator(_dask_address)] = Field(
        min_length=1,
        description="the scheduler's address (tcp://host:8786), or local: a cluster of "
        "worker processes on this machine",
    )
    workers: Count = Field(2, ge=1, le=64, description="dask: local: its worker processes")
    timeout: PositiveDuration = Field(
        600.0, description="how long one call may take before it is given up and retried"
    )
    ship: Literal["bytes", "path"] = Field(
        "bytes",
        description="bytes: the file's content goes with the call; path: its path (the "
        "workers see the same storage)",
    )
    max_ship: Size = Field(
        512 * 1024 * 1024,
        ge=1,
        description="ship: bytes: the largest file sent with a call (held in memory on the way)",
    )


class LogFileConfig(_Model):
    """The daemon's log, also in a file that rotates (``log_file``)."""

    path: HomePath = Field(
        "skyframe.log", min_length=1, description="the file; relative to the state directory"
    )
    max_size: Size = Field(10 * 1024 * 1024, ge=10_000, description="the size at which it rotates")
    count: Count = Field(5, ge=1, le=100, description="rotated files kept (NAME.1 to NAME.N)")
    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="the least important lines it keeps"
    )


def _log_file(value: Any) -> Any:
    """``log_file: true`` is the defaults; ``false`` none."""
    if value is True:
        return {}
    if value is False:
        return None
    return value


class HistoryConfig(_Model):
    """The durable record of what happened to each file (``skyframe history``)."""

    retention: PositiveDuration = Field(30 * 86400.0, description="how long events are kept")
    max_events: Count = Field(
        500_000,
        ge=1000,
        le=1_000_000_000,
        description="the most events kept (the oldest go first)",
    )


STATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class HubLinkConfig(_Model):
    """The hub this station reports to (docs/hub.md)."""

    url: str = Field(description="the hub's address, https:// (http:// on loopback only)")
    token: str = Field(description="this station's token, from the environment: ${VAR}")
    station: str = Field(description="this station's name, as the token was made for")
    interval: PositiveDuration = Field(10.0, description="seconds between two heartbeats")
    batch_size: Count = Field(500, ge=1, le=1000, description="the most events in one request")
    outbox: Count = Field(
        1_000_000, ge=1000, description="events kept while the hub is away (the oldest go first)"
    )
    timeout: PositiveDuration = Field(30.0, description="seconds one request may take")

    @field_validator("url")
    @classmethod
    def _secure_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not _host_and_port(parts):
            raise ValueError(
                f"expected an http(s) URL such as https://hub.example.org, not {url!r}"
            )
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError("give the hub's address only: the token goes in hub.token")
        if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
            raise ValueError(
                f"use https:// for {parts.hostname}: over http:// the token would cross the "
                "network in clear"
            )
        return url

    @field_validator("station")
    @classmethod
    def _station_name(cls, station: str) -> str:
        if not STATION_NAME.fullmatch(station):
            raise ValueError(
                "a station name is 1 to 64 letters, digits, '.', '_' or '-', starting with a "
                f"letter or digit, not {station!r}"
            )
        return station


class WebhookConfig(_Model):
    """A notifier that POSTs lifecycle events, in batches, to a URL."""

    url: str = Field(description="http(s) URL the events are POSTed to")
    headers: dict[
        Annotated[str, AfterValidator(_header_name)], Annotated[str, AfterValidator(_header_value)]
    ] = Field(default_factory=dict, description="extra request headers (secrets from ${VAR})")
    events: list[str] | None = Field(
        None, description="only these event kinds (default: all but progress)"
    )
    batch_size: Count = Field(100, ge=1, le=10_000, description="the most events in one POST")
    flush_interval: PositiveDuration = Field(2.0, description="longest wait before a batch is sent")
    buffer: Count = Field(
        10_000, ge=1, description="events kept while the receiver is down (the oldest go first)"
    )
    timeout: PositiveDuration = Field(10.0, description="seconds one POST may take")
    retry: RetryConfig = Field(
        default_factory=lambda: RetryConfig(initial=1.0, max=60.0),
        description="backoff between failed POSTs (max_attempts is not used: it retries "
        "until the buffer overflows)",
    )

    @model_validator(mode="after")
    def _http_url(self) -> WebhookConfig:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not _host_and_port(parts):
            raise ValueError(
                "a webhook URL is http:// or https://, a host and a path: "
                f"https://ops.example.org/events, not {url_without_password(self.url, '***')!r}"
            )
        if self.events is not None and not self.events:
            raise ValueError("events is empty: nothing would be sent (leave it out for all)")
        known = get_args(LifecycleKind)
        unknown = [kind for kind in self.events or () if kind not in known]
        if unknown:
            raise ValueError(
                f"unknown event kind(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}"
            )
        return self


class NotifyConfig(_Model):
    """One notifier; today there is one kind, ``webhook``."""

    webhook: WebhookConfig


class Config(_Model):
    """The whole ``skyframe.yaml``."""

    state_dir: HomePath = Field(".skyframe", description="queue, manifest and journals")
    plugins: list[HomePath] = Field(default_factory=list, description="plugin files or folders")
    workers: Count = Field(4, ge=1, le=64, description="files processed at once")
    shutdown_grace: Duration = Field(
        5.0, description="on stop, how long in-flight transfers may finish before being cut"
    )
    retry: RetryConfig = Field(default_factory=RetryConfig)
    bwlimit: Rate | None = Field(
        None, description="upload rate limit of all sinks together (e.g. 2MB/s, 10Mbit/s)"
    )
    bandwidth: BandwidthConfig | None = Field(
        None,
        description="upload rate limit of all sinks together by the clock (instead of bwlimit)",
    )
    api: ApiConfig = Field(default_factory=ApiConfig)
    history: HistoryConfig = Field(default_factory=HistoryConfig)
    executors: dict[str, ExecutorConfig] = Field(
        default_factory=dict, description="named Dask clusters that processes may run on"
    )
    log_file: Annotated[LogFileConfig | None, BeforeValidator(_log_file)] = Field(
        None, description="also log to a file that rotates, in the state directory"
    )
    notify: list[NotifyConfig] = Field(
        default_factory=list, description="notifiers that receive every lifecycle event"
    )
    hub: HubLinkConfig | None = Field(None, description="the hub this station reports to")
    pipelines: list[PipelineConfig] = Field(min_length=1)

    _file: Path = PrivateAttr(default=Path(DEFAULT_CONFIG_NAME))
    _marks: dict[YamlPath, tuple[int, int]] = PrivateAttr(default_factory=dict)
    #: values read from the environment, and the strings they were put into: never shown
    _from_env: set[str] = PrivateAttr(default_factory=set)

    @field_validator("bandwidth")
    @classmethod
    def _one_limit(
        cls, bandwidth: BandwidthConfig | None, info: ValidationInfo
    ) -> BandwidthConfig | None:
        return _not_both_limits(bandwidth, info)

    @model_validator(mode="after")
    def _unique_pipeline_names(self) -> Config:
        seen: set[str] = set()
        for pipeline in self.pipelines:
            if pipeline.name in seen:
                raise ValueError(f"two pipelines are named {pipeline.name!r}")
            seen.add(pipeline.name)
        return self

    @property
    def file(self) -> Path:
        """The config file this was loaded from (absolute)."""
        return self._file

    @property
    def base_dir(self) -> Path:
        """The folder relative paths are resolved against: the config file's."""
        return self._file.parent

    def resolve_path(self, value: str) -> Path:
        """An absolute path for a config value (``~`` expanded, relative to the config file)."""
        return (self.base_dir / expand_home(value)).resolve()

    @property
    def state_path(self) -> Path:
        """The absolute state directory."""
        return self.resolve_path(self.state_dir)

    @property
    def log_path(self) -> Path | None:
        """The log file of ``log_file`` (absolute), if any."""
        if self.log_file is None:
            return None
        return (self.state_path / expand_home(self.log_file.path)).resolve()

    def check_log_file(self, sources: list[Path], sink_folders: list[Path]) -> None:
        """Refuse a log file (or its rotated copies) that would write over the config, its
        project files or a plugin, or that lies in a source (it would be delivered, again and
        again) or a local sink folder."""
        path = self.log_path
        if path is None or self.log_file is None:
            return
        where: YamlPath = ("log_file", "path")
        names = {path.name, *(f"{path.name}.{n}" for n in range(1, self.log_file.count + 1))}
        problem = None
        kept = [self._file, self.base_dir / "rules.py", self.base_dir / "processes.py"]
        for file in kept:
            if file.resolve().parent == path.parent and file.name in names:
                problem = f"would write over {file}"
        for value in self.plugins:
            plugin = self.resolve_path(value)
            if path.is_relative_to(plugin) or (
                plugin.parent == path.parent and plugin.name in names
            ):
                problem = f"would write over the plugin {plugin}"
        for folder in sources:
            if path.is_relative_to(folder.resolve()):
                problem = f"is inside the source folder {folder}: it would be sent as data"
        for folder in sink_folders:
            if path.is_relative_to(folder.resolve()):
                problem = f"is inside the sink folder {folder}, among delivered files"
        if problem:
            raise ConfigError(
                f"the log file {path} {problem}", self.locate(where), format_key(where)
            )

    def retry_for(self, pipeline: PipelineConfig) -> RetryConfig:
        """The retry policy in force for a pipeline."""
        return pipeline.retry or self.retry

    def locate(self, path: YamlPath) -> Location:
        """The position of a key path in the file, or of its nearest existing parent."""
        for end in range(len(path), -1, -1):
            mark = self._marks.get(path[:end])
            if mark is not None:
                return Location(self._display_name(), *mark)
        return Location(self._display_name(), 1, 1)

    def _display_name(self) -> str:
        try:
            return str(self._file.relative_to(Path.cwd()))
        except ValueError:
            return str(self._file)

    def redact_text(self, text: str) -> str:
        """``text`` without values from the environment or URL passwords, on one line."""
        for value in sorted(self._from_env, key=len, reverse=True):
            # A quoted input is hidden whatever its length; a bare one from 4 characters on,
            # so that a variable holding "4" does not mangle "64" in a message.
            text = text.replace(repr(value), "'***'")
            if len(value) >= _MIN_HIDDEN:
                text = text.replace(value, "***")
        return _one_line(redact_urls(text))

    def redact(self, error: ConfigError) -> ConfigError:
        """The same error, with its message passed through :meth:`redact_text`."""
        message = self.redact_text(error.message)
        more = [self.redact(e) for e in error.more]
        if message == error.message and all(a is b for a, b in zip(more, error.more, strict=True)):
            return error
        return ConfigError(message, error.location, error.key, more)

    def check_sink_folder(self, folder: Path, where: YamlPath) -> None:
        """Refuse a local sink folder that could overwrite the config, its project files
        (``rules.py``, ``processes.py``), a plugin or the state directory."""
        folder = folder.resolve()
        problem = self._sink_folder_problem(folder)
        if problem:
            raise ConfigError(
                f"sink folder {folder} {problem}", self.locate(where), format_key(where)
            )

    def _sink_folder_problem(self, folder: Path) -> str | None:
        # Folders inside the config's own are fine (an outbox beside the config): only the
        # folder itself and those above it could receive a file named like skyframe.yaml.
        for config_dir in dict.fromkeys((self.base_dir.resolve(), self._file.resolve().parent)):
            if config_dir.is_relative_to(folder):
                what = "is the folder of the config file"
                if folder != config_dir:
                    what = f"contains the folder of the config file ({config_dir})"
                return (
                    f"{what}: a delivered file could replace "
                    f"{self._file.name}, rules.py or processes.py, and run at the next start"
                )
        for value in self.plugins:
            plugin = self.resolve_path(value)
            kind = "file" if plugin.is_file() else "folder"
            near = _relation(folder, plugin, kind == "file")
            if near:
                return f"{near} the plugin {kind} {plugin}: a delivered file could run as a plugin"
        near = _relation(folder, self.state_path, False)
        if near:
            return (
                f"{near} the state directory {self.state_path}: delivered files could "
                "overwrite the queue and the manifest"
            )
        return None


def _relation(folder: Path, other: Path, other_is_file: bool) -> str | None:
    """How a sink folder stands to a path it must keep away from, if too close."""
    if other_is_file:
        return "contains" if other.is_relative_to(folder) else None
    if folder == other:
        return "is"
    if folder.is_relative_to(other):
        return "is inside"
    if other.is_relative_to(folder):
        return "contains"
    return None


def local_sink_folder(url: str, base_dir: Path) -> Path | None:
    """The folder a sink writes into when it is local (a path or a ``file://`` URL), else None.

    The same reading as :mod:`skyframe.storage` and :mod:`skyframe.protocols.generic.local` make.
    """
    if not is_local_url(url):
        return None
    return (base_dir / expand_home(local_url_path(url))).resolve()


def is_local_url(url: str) -> bool:
    """Whether a sink's URL is a local folder (a path or a ``file://`` URL)."""
    if "://" in url or url.startswith(("s3:", "gs:", "gcs:")):
        head, sep, _ = url.partition("://")
        protocol = head if sep and len(head) > 1 else ""
        return protocol in ("", "file", "local")
    return True


def redact_urls(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""

    def hide(match: re.Match[str]) -> str:
        try:
            return url_without_password(match.group(), "***")
        except ValueError:  # a URL urllib cannot read (a bad IPv6 host...): cut by hand
            head, sep, rest = match.group().partition("://")
            userinfo, at, host = rest.rpartition("@")
            if not at or ":" not in userinfo:
                return match.group()
            return f"{head}{sep}{userinfo.split(':', 1)[0]}:***@{host}"

    return _URL.sub(hide, text) if "://" in text else text


def _one_line(text: str) -> str:
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def url_without_password(url: str, replacement: str = "") -> str:
    """The URL with the password of its user info removed (or replaced), all else untouched."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    secret = f":{replacement}" if replacement else ""
    return urlunsplit(parts._replace(netloc=f"{user}{secret}@{host}"))


def format_key(path: YamlPath) -> str:
    """``('pipelines', 0, 'sinks')`` -> ``pipelines[0].sinks``."""
    out = ""
    for part in path:
        if isinstance(part, int) or not part or not part.isprintable():
            out += f"[{part!r}]"  # a key with a newline or an escape stays on one line
        else:
            out += f".{part}" if out else part
    return out


# --- YAML with positions ---------------------------------------------------------------------


def _record_marks(node: yaml.Node, path: YamlPath, marks: dict[YamlPath, tuple[int, int]]) -> None:
    marks.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                raise ConfigError(
                    "duplicate key",
                    Location("", key_node.start_mark.line + 1, key_node.start_mark.column + 1),
                    format_key((*path, key)),
                )
            seen.add(key)
            # The key's own position is the most useful place to point at for its value too.
            marks[(*path, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _record_marks(value_node, (*path, key), marks)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_marks(item, (*path, index), marks)


class _Loader(yaml.SafeLoader):
    """The safe loader, noting each alias it meets and where (the node graph cannot say)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases: list[tuple[str, int, int]] = []  # anchor name, 1-based line and column

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event: yaml.AliasEvent = self.current_event  # what check_event just looked at
            mark = event.start_mark or self.get_mark()
            self.aliases.append((str(event.anchor), mark.line + 1, mark.column + 1))
        return super().compose_node(parent, index)


def _check_expansion(root: yaml.Node, aliases: list[tuple[str, int, int]], file: str) -> None:
    """Refuse a document that would hold more than MAX_VALUES values once its aliases are
    expanded, or that contains itself, before anything walks the expanded tree.

    An alias shares the node of its anchor, so the graph stays as small as the text. It is
    walked once in document order, where the first visit of a node is its anchor and every
    later one is the next alias; each alias counts for the whole size of its node, known by
    then (an anchor ends before its first alias).
    """
    sizes: dict[int, int] = {}  # id(node) -> values it stands for, capped at MAX_VALUES + 1
    open_nodes: set[int] = set()  # nodes whose children are being walked
    next_alias = iter(aliases)
    total = 0
    stack: list[tuple[yaml.Node, YamlPath, bool]] = [(root, (), False)]
    while stack:
        node, path, leaving = stack.pop()
        if leaving:
            open_nodes.discard(id(node))
            size = 1 + sum(sizes[id(child)] for child, _ in _children(node, path))
            sizes[id(node)] = min(size, MAX_VALUES + 1)
            continue
        if id(node) in sizes or id(node) in open_nodes:
            anchor, line, column = next(next_alias, ("?", 1, 1))
            where = Location(file, line, column)
            if id(node) in open_nodes:
                raise ConfigError(
                    f"alias *{anchor} refers to a value that contains it: "
                    "a config cannot contain itself",
                    where,
                    format_key(path),
                )
            total += sizes[id(node)]
            if total > MAX_VALUES:
                raise ConfigError(
                    f"alias *{anchor} makes the config hold more than {MAX_VALUES:,} values "
                    f"once aliases are expanded (it stands for {_count(sizes[id(node)])} "
                    "alone): refusing to load it",
                    where,
                    format_key(path),
                )
            continue
        total += 1
        if total > MAX_VALUES:
            where = Location(file, node.start_mark.line + 1, node.start_mark.column + 1)
            raise ConfigError(
                f"the config holds more than {MAX_VALUES:,} values: refusing to load it",
                where,
                format_key(path),
            )
        open_nodes.add(id(node))
        stack.append((node, path, True))
        stack.extend((child, at, False) for child, at in reversed(_children(node, path)))


def _children(node: yaml.Node, path: YamlPath) -> list[tuple[yaml.Node, YamlPath]]:
    """The nodes right under ``node``, in document order (a mapping's keys too), with the key
    path of each."""
    if isinstance(node, yaml.MappingNode):
        out: list[tuple[yaml.Node, YamlPath]] = []
        for key, value in node.value:
            out.append((key, path))
            out.append(
                (value, (*path, str(key.value)) if isinstance(key, yaml.ScalarNode) else path)
            )
        return out
    if isinstance(node, yaml.SequenceNode):
        return [(item, (*path, index)) for index, item in enumerate(node.value)]
    return []


def _count(size: int) -> str:
    return f"more than {MAX_VALUES:,}" if size > MAX_VALUES else f"{size:,}"


def load_yaml(text: str, file: str) -> tuple[Any, dict[YamlPath, tuple[int, int]]]:
    """Parse YAML text the way a config is parsed (safe, duplicate keys refused, the expansion
    bounded): the data, and the (line, column) of every key and item by its path. Errors are
    :class:`ConfigError` naming ``file`` and the position."""
    try:
        loader = _Loader(text)  # refuses a character YAML does not allow (a control character)
    except yaml.reader.ReaderError as exc:
        before = text[: exc.position]
        at = Location(file, before.count("\n") + 1, len(before) - before.rfind("\n"))
        raise ConfigError(f"invalid YAML: {exc.reason}: #x{exc.character:04x}", at) from None
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            deep = loader.get_mark()
            raise ConfigError(
                "invalid YAML: nested too deeply", Location(file, deep.line + 1, deep.column + 1)
            ) from None
        if node is None:
            return None, {}
        _check_expansion(node, loader.aliases, file)
        marks: dict[YamlPath, tuple[int, int]] = {}
        try:
            _record_marks(node, (), marks)
        except ConfigError as exc:
            line, column = (exc.location.line, exc.location.column) if exc.location else (1, 1)
            raise ConfigError(exc.message, Location(file, line, column), exc.key) from None
        try:
            data = loader.construct_document(node)
        except (ValueError, TypeError, OverflowError) as exc:  # a tagged value: !!int "zz"
            bad = _unconstructable(node) or node.start_mark
            at = Location(file, bad.line + 1, bad.column + 1)
            raise ConfigError(f"invalid YAML: {exc}", at) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Location(file, mark.line + 1, mark.column + 1) if mark else None
        problem = " ".join(filter(None, [exc.context, exc.problem]))
        raise ConfigError(f"invalid YAML: {problem}", where) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", Location(file, 1, 1)) from None
    finally:
        loader.dispose()
    return data, marks


def _unconstructable(root: yaml.Node) -> yaml.Mark | None:
    """Where the first value that no safe constructor can make stands (``!!int "zz"``)."""
    loader = yaml.SafeLoader("")
    try:
        stack = [root]
        seen: set[int] = set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, yaml.ScalarNode):
                try:
                    loader.construct_object(node)
                except (ValueError, TypeError, OverflowError, yaml.YAMLError):
                    return node.start_mark
            elif isinstance(node, yaml.SequenceNode):
                stack.extend(reversed(node.value))
            elif isinstance(node, yaml.MappingNode):
                for key, value in reversed(node.value):
                    stack.extend((value, key))
        return None
    finally:
        loader.dispose()


# --- ${VAR} interpolation --------------------------------------------------------------------

_VAR_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}")


def interpolate(text: str, environ: Mapping[str, str], found: list[str] | None = None) -> str:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}``; ``$$`` is a literal ``$``.

    Raises ValueError naming the variable (never its value) when it is unset. Each value taken
    from ``environ`` is appended to ``found``, if given.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.groups()
        value = environ.get(name)
        if value:
            if found is not None:
                found.append(value)
            return value
        if op == ":-":
            return arg
        if value is not None and op is None:
            return value
        if op == ":?":
            raise ValueError(f"environment variable {name} is not set: {arg or 'required'}")
        raise ValueError(
            f"environment variable {name} is not set (use ${{{name}:-default}} for a default)"
        )

    return _VAR_RE.sub(replace, text)


def _interpolate_tree(
    value: Any, path: YamlPath, environ: Mapping[str, str], config: Config
) -> Any:
    if isinstance(value, str):
        found: list[str] = []
        try:
            result = interpolate(value, environ, found)
        except ValueError as exc:
            raise ConfigError(str(exc), config.locate(path), format_key(path)) from None
        if found:
            config._from_env.update((*found, result))
        if "\0" in result:  # YAML's "\0" escape: no path, URL, name or header can hold one
            raise ConfigError(
                "contains a NUL character (\\0)", config.locate(path), format_key(path)
            )
        return _whole_characters(result, path, config)
    if isinstance(value, dict):
        for key in value:
            if isinstance(key, str):
                _whole_characters(key, path, config)
        return {k: _interpolate_tree(v, (*path, k), environ, config) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate_tree(v, (*path, i), environ, config) for i, v in enumerate(value)]
    return value


def _whole_characters(text: str, path: YamlPath, config: Config) -> str:
    """``text`` with its escaped UTF-16 pairs made characters (YAML reads "\\ud83d\\ude00" as
    two halves); a lone half, or a variable's value that is not UTF-8, is refused (no file
    name, URL or header can hold it, and it cannot even be printed)."""
    if is_utf8(text):
        return text
    try:
        return text.encode("utf-16", "surrogatepass").decode("utf-16")
    except UnicodeDecodeError:
        raise ConfigError(
            "is not valid Unicode: a lone \\uD800-\\uDFFF escape (write the character itself, "
            "or \\U0001F600 for one beyond \\uFFFF), or a variable's value that is not UTF-8",
            config.locate(path),
            format_key(path),
        ) from None


# --- validation errors -----------------------------------------------------------------------


def _model_at(path: YamlPath) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at ``path``, if there is one."""
    model: Any = Config
    for part in path:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _unwrap(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    while get_origin(annotation) in (list, Union, UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        annotation = args[0]
    return annotation


def _suggestion(loc: YamlPath) -> str | None:
    """The known key closest to an unknown one at ``loc``, if one is close."""
    model = _model_at(loc[:-1])
    if model is None:
        return None
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return close[0] if close else None


def _describe(error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = f" (expected one of: {', '.join(model.model_fields)})" if model else ""
        guess = _suggestion(loc)
        hint = f": did you mean {guess!r}?" if guess else ""
        return f"unknown key {loc[-1]!r}{hint}{allowed}"
    if kind == "missing":
        return f"missing required key {loc[-1]!r}"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _clean_loc(loc: tuple[Any, ...]) -> YamlPath:
    # Union members, validator steps and "[key]" (a bad mapping key) are not YAML keys.
    return tuple(
        p for p in loc if isinstance(p, int) or not (str(p).startswith("function-") or p == "[key]")
    )


#: Problems of one check reported, at most (the rest are counted).
MAX_ERRORS_SHOWN = 20


def validation_error(exc: ValidationError, config: Config, prefix: YamlPath = ()) -> ConfigError:
    """Turn pydantic's errors into a ConfigError per problem, each at its own place, in the
    order of the file; an unknown key comes before the missing key it probably causes (a
    typo: ``sorce`` for ``source``). The first is raised, the others are its ``more``."""
    found = []
    for error in exc.errors(include_url=False, include_input=False):
        path = (*prefix, *_clean_loc(tuple(error["loc"])))
        key_path = path[:-1] if error["type"] == "missing" else path
        location = config.locate(path)
        found.append((error["type"], path, location, ConfigError(
            _describe({**error, "loc": path}), location, format_key(key_path)
        )))  # fmt: skip
    # A missing key that an unknown key beside it looks like is reported right after it.
    typo_of: dict[tuple[YamlPath, str | int], Location] = {
        (path[:-1], guess): location
        for kind, path, location, _ in found
        if kind == "extra_forbidden" and (guess := _suggestion(path))
    }

    def order(item: tuple[str, YamlPath, Location, ConfigError]) -> tuple[int, int, int]:
        kind, path, location, _ = item
        typo = typo_of.get((path[:-1], path[-1])) if kind == "missing" and path else None
        where = typo or location
        return (where.line, where.column, 1 if kind == "missing" else 0)

    errors = [error for *_, error in sorted(found, key=order)]
    shown = errors[:MAX_ERRORS_SHOWN]
    if len(errors) > len(shown):
        last = shown[-1]
        extra = len(errors) - len(shown)
        shown[-1] = ConfigError(
            f"{last.message} (and {extra} more error{'s' if extra > 1 else ''})",
            last.location,
            last.key,
        )
    return ConfigError(shown[0].message, shown[0].location, shown[0].key, shown[1:])


# --- entry point -----------------------------------------------------------------------------


def load_config(file: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate a config file."""
    shown = str(file)
    try:
        path = expand_home(file).absolute()
    except ValueError as exc:  # ~user, of no user here
        raise ConfigError(f"config file {exc}") from None
    try:
        # A device or a pipe would be read without end, or waited on: a config is a file.
        if path.exists() and not path.is_dir() and not path.is_file():
            raise ConfigError(f"config path is not a regular file: {shown}")
        if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config file {shown} is over {MAX_CONFIG_BYTES // 1_000_000} MB: "
                "is it the right file?"
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {shown}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a folder, not a file: {shown}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {shown}: {exc}") from None

    holder = Config.model_construct(pipelines=[])
    holder._file = path
    try:
        data, holder._marks = load_yaml(text, shown)
    except ConfigError as exc:
        raise holder.redact(exc) from None
    if data is None:
        raise ConfigError("the config file is empty", holder.locate(()))
    if not isinstance(data, dict):
        raise ConfigError(
            "the config must be a mapping of keys (state_dir, pipelines...)", holder.locate(())
        )
    data = _interpolate_tree(data, (), os.environ if environ is None else environ, holder)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise holder.redact(validation_error(exc, holder)) from None
    config._file = path
    config._marks = holder._marks
    config._from_env = holder._from_env
    try:
        _check_paths(config)
        _check_local_sinks(config)
    except ConfigError as exc:
        raise config.redact(exc) from None
    if config.hub is not None and config.hub.token not in config._from_env:
        raise ConfigError(
            "hub.token: take it from the environment (token: ${SKYFRAME_HUB_TOKEN}): "
            "a token written in the file is readable by whoever can read the file",
            config.locate(("hub", "token")),
        )
    return config


def _check_paths(config: Config) -> None:
    """Refuse a path of the config that cannot be looked at (a loop of symbolic links, a name
    too long, a folder on the way that may not be entered), before anything resolves it."""
    paths: list[tuple[str, YamlPath]] = [(config.state_dir, ("state_dir",))]
    for i, pipeline in enumerate(config.pipelines):
        paths.append((pipeline.source.path, ("pipelines", i, "source", "path")))
        for k, sink in enumerate(pipeline.sinks):
            if is_local_url(sink.url):
                paths.append((local_url_path(sink.url), ("pipelines", i, "sinks", k, "url")))
    paths += [(value, ("plugins", j)) for j, value in enumerate(config.plugins)]
    if config.log_file is not None:
        paths.append((str(Path(config.state_dir) / config.log_file.path), ("log_file", "path")))
    for value, where in paths:
        problem = path_problem(config.base_dir / expand_home(value))
        if problem:
            raise ConfigError(problem, config.locate(where), format_key(where))


def path_problem(path: Path) -> str | None:
    """Why ``path`` (or a folder on its way) cannot be looked at, if it cannot."""
    path = Path(os.path.normpath(path))
    try:
        path.resolve()
        os.stat(path)
    except RuntimeError:  # Path.resolve() on a loop
        return f"{path}: a loop of symbolic links"
    except FileNotFoundError:
        return None  # said where it matters (a source must exist; a sink is made)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path}: a loop of symbolic links"
        if exc.errno == errno.ENAMETOOLONG:
            return f"{path}: the name is too long for this system"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return f"{path}: permission denied (a folder on the way may not be entered)"
        if exc.errno == errno.ENOTDIR:
            return None  # a file where a folder is expected: said where it matters
        return f"{path}: {exc.strerror or exc}"
    return None


def _check_local_sinks(config: Config) -> None:
    # Before any plugin is loaded: a sink delivering into the config's folder could already
    # have replaced rules.py, which the next start would run.
    for i, pipeline in enumerate(config.pipelines):
        for k, sink in enumerate(pipeline.sinks):
            folder = local_sink_folder(sink.url, config.base_dir)
            if folder is not None:
                config.check_sink_folder(folder, ("pipelines", i, "sinks", k, "url"))
