"""Markers: ``@rule``, ``@process`` and pluggy's ``hookimpl`` / ``hookspec``.

The decorators only mark a function; nothing is registered at import time. The plugin manager
later finds marked functions in every registered module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, overload

import pluggy

PROJECT = "skyframe"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

MARK_ATTRIBUTE = "_skyframe_kind"
CHECK_ATTRIBUTE = "_skyframe_check"
StepKind = Literal["rule", "process"]

F = TypeVar("F", bound=Callable[..., object])
#: Checks a step's options together, once each has been read: raises ValueError with what is
#: wrong (``min is above max``); the config is then refused, at the step's place in the file.
OptionsCheck = Callable[[Mapping[str, Any]], None]


def _mark(func: F, kind: StepKind, check: OptionsCheck | None = None) -> F:
    prefix = f"{kind}_"
    name = getattr(func, "__name__", "")
    if not callable(func) or not name.startswith(prefix) or name == prefix:
        raise TypeError(
            f"@{kind} functions must be named '{prefix}<name>' (the YAML name is <name>); "
            f"got {name or func!r}"
        )
    setattr(func, MARK_ATTRIBUTE, kind)
    if check is not None:
        setattr(func, CHECK_ATTRIBUTE, check)
    return func


@overload
def rule(func: F, /) -> F: ...
@overload
def rule(*, check: OptionsCheck) -> Callable[[F], F]: ...
def rule(func: F | None = None, /, *, check: OptionsCheck | None = None) -> F | Callable[[F], F]:
    """Mark ``rule_<name>(event, **options)``: True accepts; False or a reason rejects.

    ``@rule(check=fn)``: ``fn(options)`` checks the options together when the config is
    loaded (each option is checked on its own by its type)."""
    if func is None:
        return lambda f: _mark(f, "rule", check)
    return _mark(func, "rule")


@overload
def process(func: F, /) -> F: ...
@overload
def process(*, check: OptionsCheck) -> Callable[[F], F]: ...
def process(func: F | None = None, /, *, check: OptionsCheck | None = None) -> F | Callable[[F], F]:
    """Mark ``process_<name>(job, **options)``: a processing step run before delivery.

    ``@process(check=fn)``: as for :func:`rule`."""
    if func is None:
        return lambda f: _mark(f, "process", check)
    return _mark(func, "process")


def options_check(func: object) -> OptionsCheck | None:
    """The check a step was marked with, if any."""
    check = getattr(func, CHECK_ATTRIBUTE, None)
    return check if callable(check) else None


def marked_kind(obj: object) -> StepKind | None:
    """Return ``"rule"`` or ``"process"`` for a marked function, else None."""
    kind = getattr(obj, MARK_ATTRIBUTE, None)
    return kind if kind in ("rule", "process") else None
