"""What may reach a terminal or a log: names escaped, passwords in URLs and credentials removed.

File names come from cameras, SD cards and other people's machines: a name may hold bytes
that are not UTF-8 (kept by Python as lone surrogates), newlines that would forge a log
line, or terminal escape sequences. Error messages of libraries may quote a URL with its
password, and their debug lines a session token. Everything shown goes through
:func:`shown`; the log records through :class:`SafeLogFilter`, which also removes those
tokens (:func:`redact_secrets`).
"""

from __future__ import annotations

import logging
import re
import threading
import time

#: ``scheme://user:password@`` (the password is what goes)
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@")
#: A credential as libraries' debug lines quote it: in a header, a signed request's canonical
#: form, a query, a field or an XML element (``name: value``, ``name=value``, ``'Name':
#: b'value'``, ``<Name>value<``); botocore logs the session token of temporary credentials so,
#: and the body of an STS answer. A quoted value goes to its closing quote.
_SECRET_FIELD = re.compile(
    r"(?i)(?P<head>(?<![a-z0-9])(?:x-amz-security-token|security[-_]?token|session[-_]?token"
    r"|access[-_]?token|refresh[-_]?token|client[-_]?secret|secret[-_]?access[-_]?key"
    r"|password|passphrase|sig)['\"]?\s*(?:[:=]|>)\s*b?)"
    r"(?P<value>\"[^\"\n]*\"|'[^'\n]*'|[^'\"\s&,;<]+)"
)
#: ``Authorization: Bearer <token>`` (an OAuth access token)
_BEARER = re.compile(
    r"(?i)(?P<head>authorization['\"]?\s*[:=]\s*b?['\"]?bearer\s+)[A-Za-z0-9._~+/=-]+"
)
#: What a line must hold for the two above to be tried (most lines hold none of it).
_SECRET_HINTS = ("token", "secret", "password", "passphrase", "authorization", "sig")


def _hidden(match: re.Match[str]) -> str:
    value = match.group("value")
    quote = value[0] if value[0] in "'\"" else ""
    return f"{match.group('head')}{quote}***{quote}"


#: C0 and C1 control characters, DEL, and lone surrogates (undecodable bytes of a file name)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    if "://" not in text:
        return text
    return _URL_PASSWORD.sub(r"\g<head>***@", text)


def redact_secrets(text: str) -> str:
    """``text`` with the credentials libraries quote in their debug lines (session tokens,
    bearer tokens, fields named as secrets) replaced by ``***``; for log records, not names."""
    lowered = text.lower()
    if not any(hint in lowered for hint in _SECRET_HINTS):
        return text
    return _BEARER.sub(r"\g<head>***", _SECRET_FIELD.sub(_hidden, text))


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code > 0xFF:
        return f"\\u{code:04x}"
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char, f"\\x{code:02x}")


def escape(text: str) -> str:
    """``text`` with control characters and undecodable bytes written as escapes (``\\n``,
    ``\\x1b``, ``\\xff``): one line, inert on a terminal."""
    return _UNPRINTABLE.sub(_escape, text)


def shown(text: object) -> str:
    """A name or message as it may be shown: escaped, and without URL passwords."""
    return escape(redact(str(text)))


def is_utf8(name: str) -> bool:
    """Whether a file name (as Python decoded it) is valid UTF-8 and can be stored as text."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class SafeLogFilter(logging.Filter):
    """Escapes and redacts the message of every record it sees (attach it to handlers).

    The message is formatted once here; the traceback of ``exc_info`` is left as it is.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: let the handler report it as usual
            return True
        safe = shown(redact_secrets(message))
        if safe != message or record.args:
            record.msg, record.args = safe, None
        return True


class RepeatedLog:
    """Logs an error the first time, then the same error at most once per ``every`` seconds,
    with how often it came meanwhile: a failing step retried every tick (a full disk, a state
    database gone) gives a line a minute, not a traceback per tick. The traceback is logged
    at debug level, the first time only."""

    def __init__(self, logger: logging.Logger, every: float = 60.0) -> None:
        self._log = logger
        self._every = every
        self._seen: dict[str, tuple[float, int]] = {}  #: message -> (last logged, repeats)
        self._lock = threading.Lock()

    def error(self, message: str, exc: BaseException | None = None) -> None:
        """Log ``message`` (with ``exc`` on one line) unless it was logged lately."""
        if exc is not None:
            message = f"{message}: {type(exc).__name__}: {' '.join(str(exc).split())}"
        now = time.monotonic()
        with self._lock:
            last, repeats = self._seen.get(message, (None, 0))
            if last is not None and now - last < self._every:
                self._seen[message] = (last, repeats + 1)
                return
            if len(self._seen) > 1000:
                self._seen.clear()
            self._seen[message] = (now, 0)
        if repeats and last is not None:
            message = f"{message} (and {repeats} time(s) more in the last {now - last:.0f} s)"
        self._log.error("%s", message)
        if exc is not None and last is None:
            self._log.debug("the first of these errors", exc_info=exc)
