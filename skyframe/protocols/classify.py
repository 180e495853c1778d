"""Reading a protocol's errors: what caused them, their message on one line, and whether they
mean the server cannot be reached now.

Each protocol's ``classify`` (an :class:`~skyframe.protocols.endpoint.Endpoint`'s) maps its
library's errors to :class:`~skyframe.errors.SinkUnavailableError` (retried when the link is
back) or :class:`~skyframe.errors.SinkRefusedError` (a fix is needed) with these.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

#: errno values that mean "the other end cannot be reached now".
_UNREACHABLE_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.EHOSTUNREACH,
    errno.EHOSTDOWN,
    errno.ETIMEDOUT,
    errno.EPIPE,
}


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (servers put newlines in theirs)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def unreachable(exc: BaseException, extra: tuple[type[BaseException], ...] = ()) -> bool:
    """True when ``exc`` (or what caused it) means the server cannot be reached right now."""
    for item in exception_chain(exc):
        if isinstance(item, ConnectionError | TimeoutError | socket.gaierror):
            return True
        if isinstance(item, OSError) and item.errno in _UNREACHABLE_ERRNOS:
            return True
        if extra and isinstance(item, extra):
            return True
    return False
