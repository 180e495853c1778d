"""The YAML config: safe loading with positions, ``${VAR}`` interpolation, pydantic models.

Every error raised from here is a :class:`ConfigError` naming file, line and column.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from skyframe.errors import ConfigError, Location
from skyframe.events import LifecycleKind
from skyframe.units import Duration, Rate

YamlPath = tuple[str | int, ...]

DEFAULT_CONFIG_NAME = "skyframe.yaml"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Model):
    """Where files land."""

    path: str = Field(description="folder to watch, relative to the config file")
    recursive: bool = Field(True, description="include sub-folders")
    settle: Duration = Field(2.0, description="seconds a file must be unchanged to be ready")
    rescan: Duration = Field(600.0, description="full catch-up scan interval in watch mode")
    polling: bool = Field(False, description="poll instead of inotify (network mounts)")
    poll_interval: Duration = Field(5.0, description="seconds between polls when polling")


class SinkConfig(_Model):
    """One destination: a local folder or any fsspec URL."""

    url: str = Field(description="a path relative to the config file, or an fsspec URL")
    name: str | None = Field(None, description="a stable name; defaults to the URL")
    options: dict[str, Any] = Field(default_factory=dict, description="fsspec storage options")
    concurrency: int | None = Field(
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

    @property
    def key(self) -> str:
        """The name deliveries are recorded under (manifest, events): never holds a password."""
        if self.name:
            return self.name
        return url_without_password(self.url)


class RetryConfig(_Model):
    """Exponential backoff with jitter, then the dead-letter list."""

    max_attempts: int = Field(5, ge=1, description="attempts before a job is dead-lettered")
    initial: Duration = Field(1.0, description="first delay")
    max: Duration = Field(300.0, description="longest delay")


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


class PipelineConfig(_Model):
    """A source, its rules and processes, and the sinks it delivers to."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="unique name")
    source: SourceConfig
    rules: list[StepConfig] = Field(default_factory=list, description="all must accept")
    processes: list[StepConfig] = Field(default_factory=list, description="run in order")
    sinks: list[SinkConfig] = Field(min_length=1, description="destinations")
    retry: RetryConfig | None = Field(None, description="overrides the top-level retry")


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
        "(${SKYFRAME_API_TOKEN})",
    )

    @model_validator(mode="after")
    def _token_off_loopback(self) -> ApiConfig:
        host, _port = self.address
        if self.enabled and not is_loopback(host) and not self.token:
            raise ValueError(
                f"listening on {host} (not loopback) needs a token: set api.token "
                "(e.g. token: ${SKYFRAME_API_TOKEN})"
            )
        return self

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of ``listen``; IPv6 hosts may be written in brackets."""
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"listen must be host:port, e.g. 127.0.0.1:8765, not {self.listen!r}")
        return host.strip("[]"), int(port)


class HistoryConfig(_Model):
    """The durable record of what happened to each file (``skyframe history``)."""

    retention: Duration = Field(30 * 86400.0, description="how long events are kept")
    max_events: int = Field(
        500_000, ge=1000, description="the most events kept (the oldest go first)"
    )


class WebhookConfig(_Model):
    """A notifier that POSTs lifecycle events, in batches, to a URL."""

    url: str = Field(description="http(s) URL the events are POSTed to")
    headers: dict[str, str] = Field(
        default_factory=dict, description="extra request headers (secrets from ${VAR})"
    )
    events: list[str] | None = Field(
        None, description="only these event kinds (default: all but progress)"
    )
    batch_size: int = Field(100, ge=1, le=10_000, description="the most events in one POST")
    flush_interval: Duration = Field(2.0, description="longest wait before a batch is sent")
    buffer: int = Field(
        10_000, ge=1, description="events kept while the receiver is down (the oldest go first)"
    )
    timeout: Duration = Field(10.0, description="seconds one POST may take")
    retry: RetryConfig = Field(
        default_factory=lambda: RetryConfig(initial=1.0, max=60.0),
        description="backoff between failed POSTs (max_attempts is not used: it retries "
        "until the buffer overflows)",
    )

    @model_validator(mode="after")
    def _http_url(self) -> WebhookConfig:
        scheme = urlsplit(self.url).scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"a webhook URL must start with http:// or https://, not {self.url!r}")
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

    state_dir: str = Field(".skyframe", description="queue, manifest and journals")
    plugins: list[str] = Field(default_factory=list, description="plugin files or folders")
    workers: int = Field(4, ge=1, le=64, description="files processed at once")
    shutdown_grace: Duration = Field(
        5.0, description="on stop, how long in-flight transfers may finish before being cut"
    )
    retry: RetryConfig = Field(default_factory=RetryConfig)
    bwlimit: Rate | None = Field(
        None, description="upload rate limit of all sinks together (e.g. 2MB/s, 10Mbit/s)"
    )
    api: ApiConfig = Field(default_factory=ApiConfig)
    history: HistoryConfig = Field(default_factory=HistoryConfig)
    notify: list[NotifyConfig] = Field(
        default_factory=list, description="notifiers that receive every lifecycle event"
    )
    pipelines: list[PipelineConfig] = Field(min_length=1)

    _file: Path = PrivateAttr(default=Path(DEFAULT_CONFIG_NAME))
    _marks: dict[YamlPath, tuple[int, int]] = PrivateAttr(default_factory=dict)

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
        return (self.base_dir / Path(value).expanduser()).resolve()

    @property
    def state_path(self) -> Path:
        """The absolute state directory."""
        return self.resolve_path(self.state_dir)

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
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
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


def _load_yaml(text: str, file: str) -> tuple[Any, dict[YamlPath, tuple[int, int]]]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        marks: dict[YamlPath, tuple[int, int]] = {}
        try:
            _record_marks(node, (), marks)
        except ConfigError as exc:
            line, column = (exc.location.line, exc.location.column) if exc.location else (1, 1)
            raise ConfigError(exc.message, Location(file, line, column), exc.key) from None
        data = loader.construct_document(node)
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


# --- ${VAR} interpolation --------------------------------------------------------------------

_VAR_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}")


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}``; ``$$`` is a literal ``$``.

    Raises ValueError naming the variable (never its value) when it is unset.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.groups()
        value = environ.get(name)
        if value:
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
        try:
            return interpolate(value, environ)
        except ValueError as exc:
            raise ConfigError(str(exc), config.locate(path), format_key(path)) from None
    if isinstance(value, dict):
        return {k: _interpolate_tree(v, (*path, k), environ, config) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate_tree(v, (*path, i), environ, config) for i, v in enumerate(value)]
    return value


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


def _describe(error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = f" (expected one of: {', '.join(model.model_fields)})" if model else ""
        return f"unknown key {loc[-1]!r}{allowed}"
    if kind == "missing":
        return f"missing required key {loc[-1]!r}"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _clean_loc(loc: tuple[Any, ...]) -> YamlPath:
    # Union members and validator steps show up as str parts that are not YAML keys.
    return tuple(p for p in loc if isinstance(p, int) or not str(p).startswith("function-"))


def validation_error(exc: ValidationError, config: Config, prefix: YamlPath = ()) -> ConfigError:
    """Turn pydantic's errors into one ConfigError that points at the first one."""
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    path = (*prefix, *_clean_loc(tuple(first["loc"])))
    message = _describe({**first, "loc": path})
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    key_path = path[:-1] if first["type"] == "missing" else path
    return ConfigError(message, config.locate(path), format_key(key_path))


# --- entry point -----------------------------------------------------------------------------


def load_config(file: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate a config file."""
    path = Path(file).expanduser().absolute()
    shown = str(file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {shown}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a folder, not a file: {shown}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {shown}: {exc}") from None

    data, marks = _load_yaml(text, shown)
    holder = Config.model_construct(pipelines=[])
    holder._file = path
    holder._marks = marks
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
        raise validation_error(exc, holder) from None
    config._file = path
    config._marks = marks
    return config
