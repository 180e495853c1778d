"""Build the pluggy ``PluginManager("skyframe")`` and load every plugin, in a fixed order.

Load order: built-ins, then entry points of group ``skyframe`` (a broken one is reported and
skipped), then the config's ``plugins:`` files and folders, then the project's ``rules.py`` and
``processes.py`` beside the config file. Files are loaded by path under private module names.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import sys
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from skyframe import hookspecs
from skyframe.errors import PluginError
from skyframe.markers import PROJECT, StepKind, hookimpl, marked_kind

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "skyframe"
BUILTIN_PLUGINS = (
    "skyframe.builtin.rules",
    "skyframe.builtin.processes",
    "skyframe.builtin.drone",
    "skyframe.builtin.flights",
    "skyframe.protocols.generic.plugin",
    "skyframe.protocols.sftp.plugin",
    "skyframe.protocols.s3.plugin",
    "skyframe.protocols.gcs.plugin",
)
PROJECT_FILES = ("rules.py", "processes.py")
_PRIVATE_PACKAGE = "_skyframe_user"


@dataclass(frozen=True)
class BrokenPlugin:
    """An entry point that could not be loaded, and why."""

    name: str
    value: str
    error: str


class SkyframePluginManager(pluggy.PluginManager):
    """pluggy's manager plus the list of plugins that failed to load."""

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.broken: list[BrokenPlugin] = []


class MarkedFunctionCollector:
    """Registers the ``@rule`` / ``@process`` functions of every registered module."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm

    def _marked(self, kind: StepKind) -> Iterator[Any]:
        for _name, plugin in self._pm.list_name_plugin():
            if not isinstance(plugin, ModuleType):
                continue
            for value in vars(plugin).values():
                # A function imported from another module belongs to that module.
                if marked_kind(value) == kind and value.__module__ == plugin.__name__:
                    yield value

    @hookimpl
    def skyframe_register_rules(self, register: hookspecs.RegisterFn) -> None:
        for func in self._marked("rule"):
            register(func)

    @hookimpl
    def skyframe_register_processes(self, register: hookspecs.RegisterFn) -> None:
        for func in self._marked("process"):
            register(func)


def get_plugin_manager(
    plugin_paths: Iterable[Path] = (),
    project_dir: Path | None = None,
    *,
    load_entry_points: bool = True,
) -> SkyframePluginManager:
    """Create a manager with every plugin loaded, then ``check_pending()``."""
    pm = SkyframePluginManager()
    pm.add_hookspecs(hookspecs)
    pm.register(MarkedFunctionCollector(pm), name="skyframe.marked-functions")
    for name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if load_entry_points:
        _load_entry_points(pm)
    for path in plugin_paths:
        for file in _plugin_files(path):
            _register_file(pm, file)
    if project_dir is not None:
        for filename in PROJECT_FILES:
            file = project_dir / filename
            if file.is_file():
                _register_file(pm, file)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r}: {exc}") from None
    return pm


def _load_entry_points(pm: SkyframePluginManager) -> None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            log.warning(
                "skipping plugin %r (%s): that name is already registered", ep.name, ep.value
            )
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            pm.broken.append(BrokenPlugin(ep.name, ep.value, error))
            log.warning("skipping plugin %r (%s): %s", ep.name, ep.value, error)
            log.debug("%s", traceback.format_exc())


def _plugin_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.glob("*.py") if not p.name.startswith("_"))
        for file in files:  # a FIFO would block the import forever; a folder cannot be read
            if file.exists() and not file.is_file():
                raise PluginError(f"{file}: not a regular file")
        return files
    if path.is_file():
        return [path]
    if path.exists():
        raise PluginError(f"plugin path {path}: neither a file nor a folder")
    raise PluginError(f"plugin path not found: {path}")


def private_module_name(file: Path) -> str:
    """A stable module name for a file loaded by path; never a top-level ``rules``."""
    resolved = file.resolve()
    digest = hashlib.sha1(str(resolved).encode(), usedforsecurity=False).hexdigest()[:10]
    stem = "".join(c if c.isalnum() else "_" for c in resolved.stem)
    return f"{_PRIVATE_PACKAGE}.{stem}_{digest}"


def load_module_from_path(file: Path) -> ModuleType:
    """Import a Python file under a private module name."""
    name = private_module_name(file)
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise PluginError(f"{file}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        line = f":{exc.lineno}" if exc.lineno else ""  # none for a NUL byte in the file
        raise PluginError(f"{file}{line}: syntax error: {exc.msg}") from None
    except (Exception, SystemExit) as exc:  # sys.exit() in a plugin is a load failure too
        sys.modules.pop(name, None)
        line = _user_line(exc, file)
        raise PluginError(f"{file}{line}: cannot load: {type(exc).__name__}: {exc}") from exc
    return module


def _user_line(exc: BaseException, file: Path) -> str:
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if Path(frame.filename).resolve() == file.resolve():
            return f":{frame.lineno}"
    return ""


def _register_file(pm: SkyframePluginManager, file: Path) -> None:
    if pm.get_plugin(str(file.resolve())) is not None:
        return  # listed twice (in plugins: and beside the config): load it once
    module = load_module_from_path(file)
    try:
        pm.register(module, name=str(file.resolve()))
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{file}: {exc}") from None
