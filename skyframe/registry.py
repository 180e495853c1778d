"""The rules and processes plugins registered, and how YAML options are checked against them."""

from __future__ import annotations

import difflib
import inspect
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, UnionType
from typing import Any

import pluggy
from pydantic import (
    BaseModel,
    ConfigDict,
    PydanticUserError,
    TypeAdapter,
    ValidationError,
    create_model,
)

from skyframe.config import Config, StepConfig, YamlPath, format_key
from skyframe.errors import ConfigError, PluginError
from skyframe.markers import StepKind, options_check
from skyframe.protocols import Protocols
from skyframe.units import Label


@dataclass(frozen=True)
class StepSpec:
    """A registered rule or process."""

    kind: StepKind
    name: str
    func: Callable[..., Any]
    origin: str  #: the module or file it came from
    options_model: type[BaseModel]

    @property
    def qualname(self) -> str:
        """``origin:function`` for messages."""
        return f"{self.origin}:{self.func.__name__}"

    @property
    def summary(self) -> str:
        """The first line of the docstring."""
        doc = inspect.getdoc(self.func) or ""
        return doc.splitlines()[0] if doc else ""

    def describe_options(self) -> list[str]:
        """``name: type = default`` for each option."""
        out = []
        hints = typing.get_type_hints(self.func, include_extras=True)
        for param in list(inspect.signature(self.func).parameters.values())[1:]:
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                out.append(f"**{param.name}")
                continue
            annotation = type_name(hints.get(param.name, Any))
            default = "" if param.default is inspect.Parameter.empty else f" = {param.default!r}"
            out.append(f"{param.name}: {annotation}{default}")
        return out

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check options against the signature; raises pydantic's ValidationError."""
        instance = self.options_model.model_validate(dict(options))
        # Every option, defaults included: a default such as `min: Size = "1MB"` is parsed too.
        values = {name: getattr(instance, name) for name in type(instance).model_fields}
        values.update(instance.model_extra or {})
        return values


@dataclass(frozen=True)
class BoundStep:
    """A step with its validated options, ready to call."""

    spec: StepSpec
    options: Mapping[str, Any]
    #: the ``executors:`` entry a process runs on (its ``executor`` option); None: here
    executor: str | None = None

    @property
    def name(self) -> str:
        """The step's YAML name."""
        return self.spec.name

    def __call__(self, subject: Any) -> Any:
        return self.spec.func(subject, **self.options)


def type_name(annotation: Any) -> str:
    """A short, readable name for an option's type: ``Size | None``, ``list[str]``."""
    if annotation is Any:
        return "any"
    if annotation is type(None):
        return "None"
    metadata = getattr(annotation, "__metadata__", None)
    if metadata is not None:
        labels = [m.name for m in metadata if isinstance(m, Label)]
        return labels[0] if labels else type_name(annotation.__origin__)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _origin_of(func: Callable[..., Any]) -> str:
    module = sys.modules.get(func.__module__)
    file = getattr(module, "__file__", None)
    if func.__module__.startswith("_skyframe_user") and file:
        path = Path(file)
        try:
            return str(path.relative_to(Path.cwd()))
        except ValueError:
            return str(path)
    return func.__module__


def _options_model(kind: StepKind, name: str, func: Callable[..., Any]) -> type[BaseModel]:
    where = f"{_origin_of(func)}:{getattr(func, '__name__', func)}"
    try:
        signature = inspect.signature(func)
        hints = typing.get_type_hints(func, include_extras=True)
    except (TypeError, ValueError, NameError) as exc:
        raise PluginError(f"{kind} {name!r} ({where}): cannot read its signature: {exc}") from None
    params = list(signature.parameters.values())
    if not params or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        subject = "event" if kind == "rule" else "job"
        raise PluginError(f"{kind} {name!r} ({where}): its first parameter must take the {subject}")
    fields: dict[str, Any] = {}
    extra = "forbid"
    for param in params[1:]:
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            extra = "allow"
            continue
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            raise PluginError(f"{kind} {name!r} ({where}): *{param.name} cannot take options")
        annotation = hints.get(param.name, Any)
        if param.default is inspect.Parameter.empty:
            fields[param.name] = (annotation, ...)
            continue
        try:
            adapter: TypeAdapter[Any] = TypeAdapter(
                annotation, config=ConfigDict(arbitrary_types_allowed=True)
            )
            adapter.validate_python(param.default)
        except (ValidationError, PydanticUserError, TypeError) as exc:
            raise PluginError(
                f"{kind} {name!r} ({where}): the default of option {param.name!r} "
                f"({param.default!r}) does not fit its type {type_name(annotation)}"
            ) from exc
        fields[param.name] = (annotation, param.default)
    try:
        model: type[BaseModel] = create_model(
            f"{kind}_{name}_options",
            __config__=ConfigDict(extra=extra, arbitrary_types_allowed=True, validate_default=True),  # type: ignore[typeddict-item]
            **fields,
        )
    except Exception as exc:
        raise PluginError(f"{kind} {name!r} ({where}): unusable options: {exc}") from None
    return model


class Registry:
    """Every rule and process, by YAML name. Read-only mappings."""

    def __init__(self, protocols: Protocols | None = None) -> None:
        self._steps: dict[StepKind, dict[str, StepSpec]] = {"rule": {}, "process": {}}
        self.rules: Mapping[str, StepSpec] = MappingProxyType(self._steps["rule"])
        self.processes: Mapping[str, StepSpec] = MappingProxyType(self._steps["process"])
        #: the storage protocols, by URL scheme
        self.protocols = protocols if protocols is not None else Protocols()

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> Registry:
        """Collect through ``skyframe_register_rules``, ``skyframe_register_processes`` and
        ``skyframe_register_protocols``."""
        registry = cls(Protocols.from_plugin_manager(pm))
        pm.hook.skyframe_register_rules(register=registry._registrar("rule"))
        pm.hook.skyframe_register_processes(register=registry._registrar("process"))
        return registry

    def _registrar(self, kind: StepKind) -> Callable[..., None]:
        def register(func: Callable[..., Any], name: str | None = None) -> None:
            self.add(kind, func, name)

        return register

    def add(self, kind: StepKind, func: Callable[..., Any], name: str | None = None) -> StepSpec:
        """Register ``func`` as a rule or process; duplicates are an error naming both."""
        if not callable(func):
            raise PluginError(f"cannot register {func!r} as a {kind}: not callable")
        if name is None:
            prefix = f"{kind}_"
            func_name = getattr(func, "__name__", "")
            if not func_name.startswith(prefix) or func_name == prefix:
                raise PluginError(
                    f"{_origin_of(func)}:{func_name}: a {kind} must be named '{prefix}<name>' "
                    "or registered with register(func, name=...)"
                )
            name = func_name.removeprefix(prefix)
        table = self._steps[kind]
        if name in table:
            first = table[name]
            raise PluginError(
                f"two {'processes' if kind == 'process' else f'{kind}s'} are named {name!r}: "
                f"{first.qualname} and "
                f"{_origin_of(func)}:{getattr(func, '__name__', func)}"
            )
        spec = StepSpec(kind, name, func, _origin_of(func), _options_model(kind, name, func))
        table[name] = spec
        return spec

    def get(self, kind: StepKind, name: str) -> StepSpec:
        """The spec for a name; KeyError with a did-you-mean hint otherwise."""
        table = self._steps[kind]
        if name in table:
            return table[name]
        close = difflib.get_close_matches(name, table, n=1)
        hint = (
            f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(table))})"
        )
        raise KeyError(f"unknown {kind} {name!r}{hint}")

    def bind(self, kind: StepKind, step: StepConfig, config: Config, path: YamlPath) -> BoundStep:
        """Validate a step's YAML options; errors point at the step in the file."""
        try:
            spec = self.get(kind, step.name)
        except KeyError as exc:
            raise ConfigError(str(exc.args[0]), config.locate(path), format_key(path)) from None
        given = dict(step.options)
        executor = _executor_of(kind, given.pop("executor", None), config, (*path, step.name))
        try:
            options = spec.validate_options(given)
        except ValidationError as exc:
            raise _option_error(exc, spec, config, (*path, step.name)) from None
        check = options_check(spec.func)
        if check is not None:
            where = (*path, step.name)
            try:
                check(MappingProxyType(options))
            except ValueError as exc:
                raise ConfigError(
                    f"{spec.kind} {spec.name!r} ({spec.qualname}): {exc}",
                    config.locate(where),
                    format_key(where),
                ) from None
            except Exception as exc:
                raise PluginError(
                    f"{spec.kind} {spec.name!r} ({spec.qualname}): its options check failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        return BoundStep(spec, MappingProxyType(options), executor)


def _executor_of(kind: StepKind, name: Any, config: Config, path: YamlPath) -> str | None:
    """The ``executor`` option of a step: an ``executors:`` entry, for a process only."""
    if name is None:
        return None
    where = (*path, "executor")
    if kind != "process":
        raise ConfigError(
            "rules always run at the station: executor is for processes",
            config.locate(where),
            format_key(where),
        )
    if not isinstance(name, str) or name not in config.executors:
        known = ", ".join(sorted(config.executors)) or "none: add them under executors:"
        raise ConfigError(
            f"no executor {name!r} (executors: {known})", config.locate(where), format_key(where)
        )
    return name


def _option_error(
    exc: ValidationError, spec: StepSpec, config: Config, path: YamlPath
) -> ConfigError:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    loc = tuple(first["loc"])
    option = str(loc[0]) if loc else ""
    if first["type"] == "extra_forbidden":
        accepted = ", ".join(spec.options_model.model_fields) or "none"
        message = f"unknown option {option!r} (accepted: {accepted})"
    elif first["type"] == "missing":
        message = f"missing required option {option!r}"
        loc = ()
    else:
        detail = str(first["msg"]).removeprefix("Value error, ")
        message = f"option {option!r}: {detail}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    where = (*path, *loc)
    return ConfigError(
        f"{spec.kind} {spec.name!r} ({spec.qualname}): {message}",
        config.locate(where),
        format_key(where),
    )
