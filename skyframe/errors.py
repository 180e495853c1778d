"""Exceptions raised by skyframe.

The tree::

    SkyframeError                 an error already explained in its message (no traceback)
    ├── ConfigError               bad YAML, option, name or path; carries a Location
    ├── PluginError               a plugin that cannot be loaded or registered
    ├── StateError                the state directory is locked or unusable
    └── DeliveryError             a job could not be delivered
        ├── UnsafePathError       a remote path would leave its sink root
        ├── SourceChangedError    the file changed while it was being read
        ├── SourceUnreadableError the file vanished or cannot be read
        ├── RuleError             a rule raised, or returned neither a bool nor a reason
        ├── ProcessError          a process failed in a way that waiting cannot fix
        ├── SinkUnavailableError  the sink cannot be reached now (connection, timeout, 5xx)
        ├── SinkRefusedError      the sink refuses us (credentials, host key, no bucket)
        └── RemoteConflictError   the remote path holds another pipeline's file

The CLI turns every ``SkyframeError`` into one line on stderr: exit 2 for ``ConfigError`` and
``PluginError``, exit 1 for the others.
"""

from __future__ import annotations

from dataclasses import dataclass

from skyframe.display import redact


@dataclass(frozen=True)
class Location:
    """A place in a config file: 1-based line and column."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class SkyframeError(Exception):
    """Base class: an error whose message is complete and meant for the user.

    A password in a URL quoted by the message (a library's error about an endpoint) is
    replaced by ``***`` here, before the message can reach a log, the queue or a terminal.
    """

    exit_code = 1

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class ConfigError(SkyframeError):
    """A configuration problem, with where it is and which key it concerns."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        location: Location | None = None,
        key: str = "",
        more: list[ConfigError] | None = None,
    ) -> None:
        self.message = message
        self.location = location
        self.key = key
        #: further problems found in the same check, in the order to report them
        self.more = list(more or [])
        prefix = f"{location}: " if location else ""
        where = f"{key}: " if key else ""
        super().__init__(f"{prefix}{where}{message}")

    def lines(self) -> list[str]:
        """Every problem, one line each: this one first."""
        return [str(self), *(str(e) for e in self.more)]


class PluginError(SkyframeError):
    """A plugin could not be imported, or registered something invalid."""

    exit_code = 2


class StateError(SkyframeError):
    """The state directory cannot be used (locked by another process, not writable)."""


class DeliveryError(SkyframeError):
    """A job could not be delivered to a sink."""

    #: False when retrying cannot help (the job goes straight to the dead-letter list).
    retryable = True


class UnsafePathError(DeliveryError, ValueError):
    """A remote name contains ``..``, an absolute path or control characters."""

    retryable = False


class SourceChangedError(DeliveryError):
    """The source file changed while it was read; it will be read again."""


class SourceUnreadableError(DeliveryError):
    """The source file vanished or cannot be read."""

    retryable = False


class SourceBusyError(DeliveryError):
    """Another program holds the source file open without sharing it, or has locked part of
    it (Windows: a copy or an export still under way, an app's open log): retried with
    backoff, as that program lets go of it."""


class RuleError(DeliveryError):
    """A rule crashed or misbehaved: a bug to fix, so the file waits in the dead-letter list."""

    retryable = False


class ProcessError(DeliveryError):
    """Raise it from a process for a failure that retrying cannot fix (bad data, a template
    field the file does not have): the file goes straight to the dead-letter list. Any other
    exception from a process is retried with backoff."""

    retryable = False


class SinkUnavailableError(DeliveryError):
    """The sink cannot be reached now: connection refused or lost, timeout, server error.

    The daemon keeps the file queued (without counting an attempt), rebuilds the connection
    and tries again with backoff until the sink is back.
    """


class SinkRefusedError(DeliveryError):
    """The sink answered and refused: bad credentials, unknown host key, missing bucket, no
    permission. Waiting cannot fix it: the file goes to the dead-letter list and the sink is
    reported unhealthy until a delivery succeeds again."""

    retryable = False


class RemoteConflictError(DeliveryError):
    """The remote path holds a file another pipeline delivered to the same storage: it is
    not replaced, and the file waits in the dead-letter list until the names are told apart."""

    retryable = False
