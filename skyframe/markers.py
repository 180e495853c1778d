"""Markers: ``@rule``, ``@process`` and pluggy's ``hookimpl`` / ``hookspec``.

The decorators only mark a function; nothing is registered at import time. The plugin manager
later finds marked functions in every registered module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

import pluggy

PROJECT = "skyframe"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

MARK_ATTRIBUTE = "_skyframe_kind"
StepKind = Literal["rule", "process"]

F = TypeVar("F", bound=Callable[..., object])


def _mark(func: F, kind: StepKind) -> F:
    prefix = f"{kind}_"
    name = getattr(func, "__name__", "")
    if not callable(func) or not name.startswith(prefix) or name == prefix:
        raise TypeError(
            f"@{kind} functions must be named '{prefix}<name>' (the YAML name is <name>); "
            f"got {name or func!r}"
        )
    setattr(func, MARK_ATTRIBUTE, kind)
    return func


def rule(func: F) -> F:
    """Mark ``rule_<name>(event, **options)``: True accepts; False or a reason rejects."""
    return _mark(func, "rule")


def process(func: F) -> F:
    """Mark ``process_<name>(job, **options)``: a processing step run before delivery."""
    return _mark(func, "process")


def marked_kind(obj: object) -> StepKind | None:
    """Return ``"rule"`` or ``"process"`` for a marked function, else None."""
    kind = getattr(obj, MARK_ATTRIBUTE, None)
    return kind if kind in ("rule", "process") else None
