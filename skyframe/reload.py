"""Live reload: what a new config changes, and the watch on the config's files.

:func:`plan_reload` compares the running pipelines with those of a freshly loaded project
(``load_project``: the checks of a start) and returns the set to run from now on: an
unchanged pipeline keeps its very objects (its watcher, sinks and connections); a new or
changed one runs the new objects, keeping each sink whose settings did not change. The engine
applies the plan (:meth:`skyframe.engine.Engine.reload`): see docs/cli.md, "Reloading the
config".

:class:`ConfigWatch` notices that the config file, ``rules.py``, ``processes.py`` or a plugin
file changed, and asks for a reload once they have been quiet for a moment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from skyframe.config import Config, PipelineConfig, SinkConfig, format_key
from skyframe.errors import ConfigError
from skyframe.pipeline import Pipeline, Project
from skyframe.plugin_manager import PROJECT_FILES

log = logging.getLogger(__name__)

QUIET = 1.0  #: seconds the config's files must stay unchanged before a reload
POLL_INTERVAL = 0.25  #: seconds between two looks at the config's files
#: Top-level settings read once at the start: a change is applied by a restart.
RESTART_ONLY = ("workers", "api", "history", "log_file", "notify", "hub", "executors")


@dataclass
class ReloadPlan:
    """The pipelines to run after a reload, and what changed."""

    pipelines: dict[str, Pipeline]
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    #: new or changed pipelines whose rules may judge files otherwise
    new_rules: list[Pipeline] = field(default_factory=list)
    #: settings that changed in the file but apply only at the next start
    restart_needed: list[str] = field(default_factory=list)

    @property
    def changes(self) -> bool:
        """Whether any pipeline was added, changed or removed."""
        return bool(self.added or self.changed or self.removed)

    def describe(self) -> str:
        """``added a, changed b, removed c``, or ``no change``."""
        parts = [
            f"{verb} {', '.join(names)}"
            for verb, names in (
                ("added", self.added),
                ("changed", self.changed),
                ("removed", self.removed),
            )
            if names
        ]
        return ", ".join(parts) or "no change"

    def to_json(self) -> dict[str, list[str]]:
        """What the API answers."""
        return {
            "added": self.added,
            "changed": self.changed,
            "removed": self.removed,
            "restart_needed": self.restart_needed,
        }


def project_files(config: Config) -> list[Path]:
    """The files a project is loaded from: the config, its plugin files, rules.py and
    processes.py (whether they exist or not: one may appear)."""
    files = [config.file]
    for value in config.plugins:
        path = config.resolve_path(value)
        if path.is_dir():
            files += sorted(p for p in path.glob("*.py") if not p.name.startswith("_"))
        else:
            files.append(path)
    files += [config.base_dir / name for name in PROJECT_FILES]
    return files


def _code_digest(config: Config, *, plugins_only: bool = False) -> str:
    """The content of the project's Python files (a change may change any rule or process);
    ``plugins_only``: of the ``plugins:`` files alone."""
    files = project_files(config)[1:]
    digest = hashlib.sha256()
    for path in files[: -len(PROJECT_FILES)] if plugins_only else files:
        digest.update(str(path).encode())
        try:
            digest.update(path.read_bytes())
        except OSError:
            digest.update(b"\0missing")
    return digest.hexdigest()


def _dump(value: object) -> str:
    """A comparable text of settings (kept in memory only: it may hold secrets)."""
    return json.dumps(value, sort_keys=True, default=str)


def _bandwidth(config: Config) -> object:
    """The top-level ``bandwidth`` (its schedule, as written), compared like ``bwlimit``."""
    return config.bandwidth.model_dump(mode="json") if config.bandwidth is not None else None


def _pipeline_key(config: Config, spec: PipelineConfig, code: str) -> str:
    return _dump(
        {
            "pipeline": spec.model_dump(mode="json"),
            "retry": config.retry_for(spec).model_dump(mode="json"),
            "bwlimit": config.bwlimit,  # the budget all sinks share
            "bandwidth": _bandwidth(config),
            "code": code,
        }
    )


def _rules_key(spec: PipelineConfig, code: str) -> str:
    return _dump({"rules": [step.model_dump(mode="json") for step in spec.rules], "code": code})


def _sink_key(config: Config, spec: PipelineConfig, sink: SinkConfig) -> str:
    return _dump(
        {
            "sink": sink.model_dump(mode="json"),
            "retry": config.retry_for(spec).model_dump(mode="json"),
            "bwlimit": config.bwlimit,
            "bandwidth": _bandwidth(config),
        }
    )


def plan_reload(old: Config, running: Mapping[str, Pipeline], project: Project) -> ReloadPlan:
    """The pipelines to run with ``project`` instead of ``old``; raises ConfigError for a
    change that cannot be made while running (the state directory). The sinks of ``project``
    that the plan does not use are closed."""
    new = project.config
    if new.state_path != old.state_path:
        where = ("state_dir",)
        raise ConfigError(
            f"the state directory cannot change while skyframe runs ({old.state_path} -> "
            f"{new.state_path}): restart skyframe to use it",
            new.locate(where),
            format_key(where),
        )
    old_code, new_code = _code_digest(old), _code_digest(new)
    old_specs = {spec.name: spec for spec in old.pipelines}
    new_specs = {spec.name: spec for spec in new.pipelines}
    # Sinks whose settings did not change are kept (their connections and health).
    kept_sinks = {
        (name, sink.key): (_sink_key(old, spec, config), sink)
        for name, spec in old_specs.items()
        if name in running
        for config, sink in zip(spec.sinks, running[name].sinks, strict=True)
    }
    plan = ReloadPlan(pipelines={})
    for built in project.pipelines:
        spec = new_specs[built.name]
        before = old_specs.get(built.name)
        current = running.get(built.name)
        if before is None or current is None:
            plan.added.append(built.name)
        elif _pipeline_key(old, before, old_code) == _pipeline_key(new, spec, new_code):
            plan.pipelines[built.name] = current  # untouched: its watcher, sinks, everything
            continue
        else:
            plan.changed.append(built.name)
        for index, (config, sink) in enumerate(zip(spec.sinks, built.sinks, strict=True)):
            same = kept_sinks.get((built.name, sink.key), ("", sink))
            built.sinks[index] = same[1] if same[0] == _sink_key(new, spec, config) else sink
        if before is None or _rules_key(before, old_code) != _rules_key(spec, new_code):
            plan.new_rules.append(built)
        elif current is not None:
            built.accepted_since = current.accepted_since
        plan.pipelines[built.name] = built
    plan.removed = [name for name in running if name not in new_specs]
    used = {id(s) for p in plan.pipelines.values() for s in p.sinks}
    for built in project.pipelines:
        for sink in built.sinks:
            if id(sink) not in used:
                sink.close()
    plan.restart_needed = restart_needed(old, new)
    return plan


def restart_needed(old: Config, new: Config) -> list[str]:
    """The settings that changed but apply only at the next start."""
    names = [
        name for name in RESTART_ONLY if _dump(getattr(old, name)) != _dump(getattr(new, name))
    ]
    if old.plugins != new.plugins or _code_digest(old, plugins_only=True) != _code_digest(
        new, plugins_only=True
    ):
        names.append("plugins (their hooks other than rules and processes)")
    return names


Stamp = tuple[tuple[str, int, int, int], ...]


def stamp(files: list[Path]) -> Stamp:
    """What identifies the files' current versions (a missing one counts too)."""
    out = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            out.append((str(path), -1, -1, -1))
        else:
            out.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


class ConfigWatch:
    """Calls ``reload`` when the project's files changed and then stayed unchanged for
    ``quiet`` seconds (an editor's several writes make one reload). Polls: a few ``stat``
    calls each ``interval``, on every platform alike."""

    def __init__(
        self,
        files: Callable[[], list[Path]],
        reload: Callable[[], None],
        *,
        quiet: float = QUIET,
        interval: float = POLL_INTERVAL,
    ) -> None:
        self._files = files
        self._reload = reload
        self._quiet = quiet
        self._interval = interval
        self._seen = stamp(files())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="skyframe-config-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(10)

    def loaded(self, seen: Stamp) -> None:
        """A reload (whatever asked for it) read the files as ``seen``."""
        self._seen = seen

    def _run(self) -> None:
        pending: Stamp | None = None
        since = 0.0
        while not self._stop.wait(self._interval):
            try:
                now = stamp(self._files())
            except Exception as exc:  # never end the watch: the next look tries again
                log.debug("cannot look at the config's files: %s", exc)
                continue
            if now == self._seen:
                pending = None
                continue
            if now != pending:
                pending, since = now, time.monotonic()
                continue
            if time.monotonic() - since >= self._quiet:
                pending = None
                self._seen = now
                self._reload()
