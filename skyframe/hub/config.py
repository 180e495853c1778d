"""``hub.yaml``: the hub's config, read like the daemon's (positions, ``${VAR}``, pydantic).

Every error is a :class:`~skyframe.errors.ConfigError` naming file, line and column, on one
line, without a value taken from the environment or a URL password.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from skyframe.config import (
    MIN_TOKEN_LENGTH,
    PositiveDuration,
    YamlPath,
    format_key,
    interpolate,
    is_loopback,
    load_yaml,
    redact_urls,
)
from skyframe.errors import ConfigError, Location
from skyframe.units import expand_home

DEFAULT_HUB_CONFIG = "hub.yaml"
DEFAULT_LISTEN = "127.0.0.1:8740"
DEFAULT_DATABASE_NAME = "hub.db"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OperatorsConfig(_Model):
    """Who may use the web page and the JSON API."""

    token: str | None = Field(
        None,
        description="the operators' token, from the environment (${SKYFRAME_HUB_TOKEN}); "
        "required when listening on anything but loopback",
    )


class AlertsConfig(_Model):
    """What the hub watches for, and where it says so."""

    webhook: str | None = Field(None, description="http(s) URL each alert is POSTed to")
    silent_after: PositiveDuration = Field(
        600.0, description="a station that sent nothing for this long is silent (offline)"
    )
    dead_letters_above: int = Field(
        0, ge=0, description="alert when a station's dead letters grow past this count"
    )
    sink_offline_after: PositiveDuration = Field(
        900.0, description="alert when a sink has been offline or refusing for this long"
    )
    check_every: PositiveDuration = Field(30.0, description="seconds between two looks")

    @field_validator("webhook")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and urlsplit(url).scheme not in ("http", "https"):
            raise ValueError("the webhook must be an http:// or https:// URL")
        return url


class TlsConfig(_Model):
    """HTTPS served by the hub itself (or leave TLS to a reverse proxy: docs/hub.md)."""

    cert: str = Field(description="PEM certificate chain, relative to hub.yaml")
    key: str = Field(description="PEM private key, relative to hub.yaml")


class HubConfig(_Model):
    """The whole ``hub.yaml``."""

    listen: str = Field(DEFAULT_LISTEN, description="host:port (port 0 picks a free one)")
    database: str | None = Field(
        None,
        description="SQLAlchemy URL: sqlite:///PATH or postgresql://...; "
        f"default {DEFAULT_DATABASE_NAME} beside hub.yaml",
    )
    operators: OperatorsConfig = Field(default_factory=OperatorsConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    tls: TlsConfig | None = Field(None, description="cert and key to serve HTTPS")

    @field_validator("listen")
    @classmethod
    def _host_port(cls, listen: str) -> str:
        split_listen(listen)
        return listen

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of ``listen``."""
        return split_listen(self.listen)


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); IPv6 hosts may be written in brackets."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"listen must be host:port, e.g. {DEFAULT_LISTEN}, not {listen!r}")
    return host.strip("[]"), int(port)


class LoadedHubConfig:
    """A validated ``hub.yaml`` with where it came from and what must never be shown."""

    def __init__(self, config: HubConfig, file: Path, secrets: set[str]) -> None:
        self.config = config
        self.file = file
        self._secrets = secrets

    @property
    def base_dir(self) -> Path:
        """The folder relative paths are resolved against."""
        return self.file.parent

    def database_url(self) -> str:
        """The database URL, the default SQLite file beside hub.yaml when none is set."""
        url = self.config.database
        if not url:
            return f"sqlite:///{self.base_dir / DEFAULT_DATABASE_NAME}"
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            relative = url.removeprefix("sqlite:///")
            if relative and relative != ":memory:":
                return f"sqlite:///{(self.base_dir / relative).resolve()}"
        return url

    def resolve_path(self, value: str) -> Path:
        """A path of the config, relative to hub.yaml."""
        return (self.base_dir / expand_home(value)).resolve()

    def redact(self, text: str) -> str:
        """``text`` without environment values or URL passwords."""
        for value in sorted(self._secrets, key=len, reverse=True):
            if len(value) >= 4:
                text = text.replace(value, "***")
        return redact_urls(text)


def load_hub_config(
    file: str | os.PathLike[str],
    environ: Mapping[str, str] | None = None,
    *,
    listen: str | None = None,
    database: str | None = None,
) -> LoadedHubConfig:
    """Read, interpolate and validate ``hub.yaml``; ``listen`` and ``database`` override it."""
    shown = str(file)
    try:
        path = expand_home(file).absolute()
    except ValueError as exc:  # ~user, of no user here
        raise ConfigError(f"hub config file {exc}") from None
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"hub config file not found: {shown}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read hub config file {shown}: {exc}") from None
    data, marks = load_yaml(text, shown)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the hub config must be a mapping of keys (listen, database...)",
                          Location(shown, 1, 1))  # fmt: skip
    secrets: set[str] = set()
    data = _interpolate(data, (), os.environ if environ is None else environ, marks, shown, secrets)
    if listen is not None:
        data["listen"] = listen
    if database is not None:
        data["database"] = database
    try:
        config = HubConfig.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, marks, shown, secrets) from None
    loaded = LoadedHubConfig(config, path, secrets)
    _check_exposure(config, marks, shown)
    return loaded


def _locate(marks: dict[YamlPath, tuple[int, int]], path: YamlPath, file: str) -> Location:
    for end in range(len(path), -1, -1):
        mark = marks.get(path[:end])
        if mark is not None:
            return Location(file, *mark)
    return Location(file, 1, 1)


def _interpolate(  # noqa: PLR0917 (recursive, its context passed down)
    value: Any,
    path: YamlPath,
    environ: Mapping[str, str],
    marks: dict[YamlPath, tuple[int, int]],
    file: str,
    secrets: set[str],
) -> Any:
    if isinstance(value, str):
        found: list[str] = []
        try:
            result = interpolate(value, environ, found)
        except ValueError as exc:
            raise ConfigError(str(exc), _locate(marks, path, file), format_key(path)) from None
        if found:
            secrets.update((*found, result))
        return result
    if isinstance(value, dict):
        return {
            k: _interpolate(v, (*path, k), environ, marks, file, secrets) for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            _interpolate(v, (*path, i), environ, marks, file, secrets) for i, v in enumerate(value)
        ]
    return value


def _first_error(
    exc: ValidationError, marks: dict[YamlPath, tuple[int, int]], file: str, secrets: set[str]
) -> ConfigError:
    errors = []
    for error in exc.errors(include_url=False, include_input=False):
        path: YamlPath = tuple(
            p for p in error["loc"] if isinstance(p, int) or not str(p).startswith("function-")
        )
        if error["type"] == "extra_forbidden":
            message = f"unknown key {path[-1]!r}"
        elif error["type"] == "missing":
            message = f"missing required key {path[-1]!r}"
            path = path[:-1]
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
        for value in sorted(secrets, key=len, reverse=True):
            if len(value) >= 4:
                message = message.replace(value, "***")
        errors.append(
            ConfigError(redact_urls(message), _locate(marks, path, file), format_key(path))
        )
    errors.sort(key=lambda e: (e.location.line, e.location.column) if e.location else (0, 0))
    return ConfigError(errors[0].message, errors[0].location, errors[0].key, errors[1:])


def _check_exposure(config: HubConfig, marks: dict[YamlPath, tuple[int, int]], file: str) -> None:
    """Anything but loopback needs the operators' token: the page can pause every station."""
    host, _port = config.address
    if is_loopback(host):
        return
    token = config.operators.token
    where = _locate(marks, ("operators", "token"), file)
    if not token:
        raise ConfigError(
            f"listening on {host} (not loopback) needs the operators' token: set "
            "operators.token (e.g. token: ${SKYFRAME_HUB_TOKEN})",
            where,
            "operators.token",
        )
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"listening on {host} (not loopback) needs an operators' token of at least "
            f"{MIN_TOKEN_LENGTH} characters, this one has {len(token)}",
            where,
            "operators.token",
        )
