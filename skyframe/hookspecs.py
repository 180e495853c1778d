"""The hooks a skyframe plugin may implement. Each docstring is that hook's contract."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from skyframe.markers import hookspec

if TYPE_CHECKING:
    from skyframe.config import Config
    from skyframe.events import LifecycleEvent
    from skyframe.groups import Group
    from skyframe.protocols import Protocol
    from skyframe.storage import BatchTransfer, Sink, TransferRequest, TransferResult

RegisterFn = Callable[..., None]


@hookspec
def skyframe_register_rules(register: RegisterFn) -> None:
    """Call ``register(func)`` (or ``register(func, name=...)``) for each rule this plugin adds."""


@hookspec
def skyframe_register_processes(register: RegisterFn) -> None:
    """Call ``register(func)`` (or ``register(func, name=...)``) for each process it adds."""


@hookspec
def skyframe_register_protocols(register: Callable[[Protocol], None]) -> None:
    """Call ``register(Protocol(...))`` for each storage protocol this plugin adds."""


@hookspec
def skyframe_startup(config: Config) -> None:
    """Called once the config is loaded and before any file is handled; may raise to abort."""


@hookspec
def skyframe_shutdown(config: Config) -> None:
    """Called once when a run ends, cleanly or not; must not raise."""


@hookspec
def skyframe_event(event: LifecycleEvent) -> None:
    """Receive every lifecycle event; errors are logged and never affect a transfer."""


@hookspec
def skyframe_group_complete(group: Group) -> None:
    """A group of files (a flight) is complete: every file arrived and none for ``quiet``.

    ``group.files`` holds each file with its metadata and where it landed on each sink;
    ``group.add_file(name, data)`` delivers a file into the group's folder on every sink (the
    built-in flight report does). Called once per completion; again, with the new files, when
    a file arriving later reopened the group. After a crash between its files' delivery and
    the record of the completion it may be called twice for the same group: act idempotently.
    An exception leaves the group open, to be completed again 30 s later.
    """


@hookspec(firstresult=True)
def skyframe_transfer(request: TransferRequest) -> TransferResult | None:
    """Deliver one local file to one sink atomically, or return None to let another plugin."""


@hookspec(firstresult=True)
def skyframe_transfer_batch(sink: Sink) -> BatchTransfer | None:
    """Return a function that delivers several small files to ``sink`` at once, or None to have
    each one go through ``skyframe_transfer``. Asked once per sink, before any connection.

    The function gets requests for this sink only, each for a file under 1 MiB, and returns one
    ``TransferResult`` or exception per request, in order; it raises only for what is not about
    one file. As in ``skyframe_transfer``, each upload is atomic, the file is checked unchanged
    after it was read, and ``pace`` is called before its bytes are sent. A file that fails is
    sent again through ``skyframe_transfer``, where its errors are classified and retried.
    """
