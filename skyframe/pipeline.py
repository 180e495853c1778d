"""Pipelines as the engine runs them: config bound to rules, processes and opened sinks."""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView
from dataclasses import dataclass, field
from pathlib import Path

import pluggy
from pydantic import ValidationError

from skyframe.builtin.rules import matching_pattern
from skyframe.config import (
    Config,
    GroupConfig,
    PipelineConfig,
    PriorityConfig,
    RetryConfig,
    SourceConfig,
    StepConfig,
    YamlPath,
    format_key,
    load_config,
)
from skyframe.errors import ConfigError, RuleError
from skyframe.events import FileEvent
from skyframe.jobs import HIGH, NORMAL, PRIORITIES
from skyframe.plugin_manager import get_plugin_manager
from skyframe.registry import BoundStep, Registry
from skyframe.storage import Sink, open_sink

log = logging.getLogger(__name__)


@dataclass
class Pipeline:
    """A pipeline from the config, with its steps bound and its sinks opened."""

    name: str
    source_root: Path
    recursive: bool
    rules: list[BoundStep]
    processes: list[BoundStep]
    sinks: list[Sink]
    retry: RetryConfig
    source: SourceConfig
    groups: list[GroupConfig] = field(default_factory=list)  #: files that belong together
    #: Jobs queued before this time (epoch seconds) were accepted by rules a reload replaced:
    #: delivery runs the rules again for them (0: the rules are those of the start).
    accepted_since: float = 0.0
    priority: PriorityConfig = field(default_factory=PriorityConfig)  #: which files go first

    def priority_of(self, event: FileEvent) -> int:
        """The priority level of a file: the first of ``priority.paths`` that matches it,
        else high for a small file (``priority.small_first``), else normal."""
        if self.priority.paths:
            hit = matching_pattern(event.relpath, self.priority.paths, case_sensitive=False)
            if hit is not None:
                return PRIORITIES[self.priority.paths[hit]]
        small = self.priority.small_first
        return HIGH if small is not None and event.size <= small else NORMAL


class PipelineSet(Mapping[str, Pipeline]):
    """The configured pipelines by name, shared by every part of the engine.

    A reload swaps the whole snapshot at once (:meth:`replace`); a snapshot is never changed,
    so iterating ``values()`` or ``items()`` is safe while another thread reloads.
    """

    def __init__(self, pipelines: Mapping[str, Pipeline] | None = None) -> None:
        self._current: dict[str, Pipeline] = dict(pipelines or {})

    def replace(self, pipelines: Mapping[str, Pipeline]) -> None:
        """Make ``pipelines`` the configured set."""
        self._current = dict(pipelines)

    def snapshot(self) -> dict[str, Pipeline]:
        """The configured pipelines now (a copy)."""
        return dict(self._current)

    def __getitem__(self, name: str) -> Pipeline:
        return self._current[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current)

    def __len__(self) -> int:
        return len(self._current)

    def __contains__(self, name: object) -> bool:
        return name in self._current

    def keys(self) -> KeysView[str]:
        return self._current.keys()

    def values(self) -> ValuesView[Pipeline]:
        return self._current.values()

    def items(self) -> ItemsView[str, Pipeline]:
        return self._current.items()


def build_pipelines(config: Config, registry: Registry) -> list[Pipeline]:
    """Check every name, option, folder and sink URL; raises ConfigError at the first problem.

    The error never shows a value taken from the environment or a URL password.
    """
    try:
        pipelines = [
            _build_pipeline(config, registry, i, p) for i, p in enumerate(config.pipelines)
        ]
        config.check_log_file(
            [p.source_root for p in pipelines],
            [Path(s.root) for p in pipelines for s in p.sinks if s.protocol == "file"],
        )
    except ConfigError as exc:
        raise config.redact(exc) from None
    return pipelines


def _build_pipeline(
    config: Config, registry: Registry, index: int, spec: PipelineConfig
) -> Pipeline:
    base: YamlPath = ("pipelines", index)
    rules = [
        registry.bind("rule", step, config, (*base, "rules", j))
        for j, step in enumerate(spec.rules)
    ]
    if not any(step.name == "ignore" for step in rules):
        # Swap, temp and partial files are never wanted; `ignore: {defaults: false}` opts out.
        rules.insert(
            0,
            registry.bind(
                "rule",
                StepConfig.model_construct(name="ignore", options={}),
                config,
                (*base, "rules"),
            ),
        )
    processes = [
        registry.bind("process", step, config, (*base, "processes", j))
        for j, step in enumerate(spec.processes)
    ]
    source_root = config.resolve_path(spec.source.path)
    where = (*base, "source", "path")
    if not source_root.is_dir():
        problem = "is not a folder" if source_root.exists() else "does not exist"
        raise ConfigError(
            f"source folder {source_root} {problem}", config.locate(where), format_key(where)
        )
    if config.state_path.is_relative_to(source_root):
        raise ConfigError(
            f"the state directory {config.state_path} is inside the source folder {source_root}",
            config.locate(where),
            format_key(where),
        )
    sinks = []
    for k, sink_config in enumerate(spec.sinks):
        where = (*base, "sinks", k, "url")
        try:
            protocol = registry.protocols.for_url(sink_config.url)
            sink = open_sink(
                sink_config, config.base_dir, config.retry_for(spec), registry.protocols
            )
        except ValidationError as exc:
            fields = list(protocol.options.model_fields) if protocol.options else []
            raise _options_error(exc, config, (*base, "sinks", k, "options"), fields) from None
        except (ValueError, ImportError, OSError) as exc:
            raise ConfigError(str(exc), config.locate(where), format_key(where)) from None
        for warning in sink.endpoint.warnings:
            log.warning("%s: %s", config.locate(where), config.redact_text(warning))
        if sink.protocol == "file" and Path(sink.root).is_relative_to(source_root):
            raise ConfigError(
                f"sink folder {sink.root} is inside the source folder {source_root}: "
                "delivered files would be picked up again",
                config.locate(where),
                format_key(where),
            )
        if sink.protocol == "file":
            # load_config checked the folder it read from the URL; this is the one the backend
            # will write to, should the two readings ever differ.
            config.check_sink_folder(Path(sink.root), where)
        sink.owner = spec.name
        sinks.append(sink)
    keys = [s.key for s in sinks]
    if len(set(keys)) != len(keys):
        where = (*base, "sinks")
        raise ConfigError(
            "two sinks share a URL; give them distinct names",
            config.locate(where),
            format_key(where),
        )
    return Pipeline(
        spec.name,
        source_root,
        spec.source.recursive,
        rules,
        processes,
        sinks,
        config.retry_for(spec),
        spec.source,
        list(spec.groups),
        priority=spec.priority,
    )


@dataclass
class Project:
    """A loaded config with its plugins, registry and checked pipelines."""

    config: Config
    pm: pluggy.PluginManager
    registry: Registry
    pipelines: list[Pipeline]


def load_project(config_file: str | os.PathLike[str]) -> Project:
    """Load a config and everything it names; raises ConfigError or PluginError."""
    config = load_config(config_file)
    plugin_paths = [config.resolve_path(p) for p in config.plugins]
    pm = get_plugin_manager(plugin_paths, project_dir=config.base_dir)
    registry = Registry.from_plugin_manager(pm)
    return Project(config, pm, registry, build_pipelines(config, registry))


def evaluate_rules(rules: list[BoundStep], event: FileEvent) -> tuple[str, str] | None:
    """None when every rule accepts, else (rule name, reason) of the first rejection."""
    for step in rules:
        try:
            verdict = step(event)
        except (Exception, SystemExit) as exc:  # sys.exit() in a rule is its failure too
            raise RuleError(f"rule {step.name!r} raised {type(exc).__name__}: {exc}") from exc
        if verdict is True:
            continue
        if verdict is False:
            return step.name, "rejected"
        if isinstance(verdict, str):
            return step.name, verdict
        raise RuleError(
            f"rule {step.name!r} returned {verdict!r}; return True to accept, "
            "False or a reason string to reject"
        )
    return None


def _options_error(
    exc: ValidationError, config: Config, where: YamlPath, fields: list[str]
) -> ConfigError:
    """A sink's backend options failed their model (whose keys are ``fields``): point at the
    first bad key."""
    first = exc.errors(include_url=False, include_input=False)[0]
    loc = tuple(str(p) for p in first["loc"] if isinstance(p, str | int))
    path = (*where, *loc)
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc[-1], fields, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        message = f"unknown option {loc[-1]!r} ({hint}expected one of: {', '.join(fields)})"
    else:
        message = str(first["msg"]).removeprefix("Value error, ")
    key = path if first["type"] != "missing" else where
    return ConfigError(message, config.locate(path), format_key(key))
