"""The HTTP defences the daemon's API and the hub share (docs/api.md#authentication).

Secrets compared in constant time whatever their lengths, the ``Host`` a request names (a
DNS-rebinding page's is not a loopback name), ``POST`` only as JSON from the same origin,
bodies bounded in size and in time, and refusals as one JSON line: ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
from typing import Any, Protocol

from aiohttp import web

from skyframe.config import is_loopback

BODY_TIMEOUT = 10.0  #: seconds a client has to send its body


class Refused(Exception):
    """Raised by a helper: the server's middleware answers ``{"error": message}`` with this
    status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """The JSON refusal."""
    return web.json_response({"error": message}, status=status, headers=headers)


def static_missing(path: str, exc: Exception) -> web.Response | None:
    """A 404 for a path under ``/static/`` whose lookup the file system refused (a name too
    long for it): there is no such file. None for anything else."""
    if isinstance(exc, OSError) and path.startswith("/static/"):
        return error(404, "Not Found")
    return None


def harden(response: web.StreamResponse) -> web.StreamResponse:
    """The headers every answer carries: not cached, not sniffed, not framed, no referrer."""
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response


def shown(value: object, width: int = 60) -> str:
    """A value a client sent, quoted for a message and cut short."""
    text = repr(value)
    return text if len(text) <= width else f"{text[: width - 3]}..."


def _digest(secret: str) -> bytes:
    """A secret as bytes of fixed length, whatever a client sent (lone surrogates included)."""
    return hmac.new(b"skyframe token", secret.encode("utf-8", "surrogatepass"), "sha256").digest()


def same_secret(given: str, secret: str) -> bool:
    """Whether a client's value is the secret, in constant time whatever their lengths."""
    return hmac.compare_digest(_digest(given), _digest(secret))


def host_name(host_header: str) -> str:
    """The host of a ``Host`` header, without its port (IPv6 in brackets kept whole)."""
    if host_header.startswith("["):
        return host_header[: host_header.find("]") + 1]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def foreign_host(request: web.Request) -> bool:
    """True when the request's ``Host`` is not a loopback name: a page of another site that
    resolved its own name to 127.0.0.1 (DNS rebinding), or a proxy in front."""
    return not is_loopback(host_name(request.host))


def address(request: web.Request) -> str:
    """The client's address (for counting its wrong tokens)."""
    return request.remote or "unknown"


def bearer(request: web.Request) -> str | None:
    """The token of ``Authorization: Bearer ...``, if the request has one."""
    header = request.headers.get("Authorization", "")
    return header[7:] if header.startswith("Bearer ") else None


def cross_site(request: web.Request) -> web.Response | None:
    """The refusal of a ``POST`` that is not JSON or comes from another origin (what a form
    of another site can send); None when it is fine."""
    if request.content_type != "application/json":
        return error(415, "send a JSON body (Content-Type: application/json)")
    origin = request.headers.get("Origin")
    if origin and origin.split("://", 1)[-1] != request.host:
        return error(403, f"cross-site request from {shown(origin)} refused")
    return None


def too_many(wait: float) -> web.Response:
    """429 with ``Retry-After``: too many wrong tokens from one address."""
    seconds = math.ceil(wait)
    return error(
        429,
        f"too many wrong tokens from this address: try again in {seconds} s",
        headers={"Retry-After": str(seconds)},
    )


async def json_body(request: web.Request, limit: int, status: int = 400) -> Any:
    """The body as JSON; raises :class:`Refused`: 413 beyond ``limit`` bytes (announced or
    sent), 408 when it does not come within BODY_TIMEOUT, ``status`` when it is not JSON."""
    too_large = f"the body is larger than {limit // 1024} KiB"
    size = request.content_length
    if size is not None and size > limit:  # refused before it is sent
        raise Refused(413, too_large)
    try:
        raw = await asyncio.wait_for(_read(request, limit), BODY_TIMEOUT)
    except TimeoutError:
        raise Refused(408, f"the body did not come within {BODY_TIMEOUT:.0f} s") from None
    except ConnectionError:  # the client went away in the middle of its body
        raise Refused(400, "the body was cut off") from None
    if raw is None:  # sent without a Content-Length, or longer than it said
        raise Refused(413, too_large)
    try:
        # JSON is UTF-8 (RFC 8259): a charset in the Content-Type is not looked at.
        return json.loads(raw, parse_constant=_not_a_number)
    except RecursionError:
        raise Refused(status, "the body is not valid JSON: nested too deep") from None
    except ValueError as exc:
        if isinstance(exc, json.JSONDecodeError):
            detail = exc.msg
        elif isinstance(exc, UnicodeDecodeError):
            detail = "not UTF-8"
        elif isinstance(exc, _NotJSON):
            detail = str(exc)
        else:  # Python's limit on the digits of an integer it converts
            detail = "a number with too many digits"
        raise Refused(status, f"the body is not valid JSON: {detail}") from None


class _NotJSON(ValueError):
    """What Python's json module reads but JSON has not."""


def _not_a_number(name: str) -> Any:
    """``NaN``, ``Infinity`` and ``-Infinity``: Python writes them, JSON has no such thing."""
    raise _NotJSON(f"{name} is not a JSON number")


async def json_object(request: web.Request, limit: int, status: int = 400) -> dict[str, Any]:
    """The body as a JSON object (see :func:`json_body`)."""
    body = await json_body(request, limit, status)
    if not isinstance(body, dict):
        raise Refused(status, "the body must be a JSON object")
    return body


async def _read(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None once it is longer than ``limit`` (the rest is not read)."""
    chunks, total = [], 0
    while chunk := await request.content.read(64 * 1024):
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class Throttle(Protocol):
    """What :func:`check_token` asks of the counter of wrong tokens (``api.TokenThrottle``)."""

    def wait(self, address: str) -> float: ...

    def failed(self, address: str, what: str) -> None: ...


def check_token(
    request: web.Request,
    token: str,
    throttle: Throttle,
    *,
    cookie: str,
    session: str,
    wrong: str,
    missing: str,
) -> web.Response | None:
    """None when the request carries ``token`` (``Authorization: Bearer``) or the page's
    cookie (``cookie`` holding ``session``); else the refusal (``wrong``, ``missing``: its
    words). Only a token counts as a guess: the cookie is an HMAC of it, which nobody guesses.
    """
    given = bearer(request)
    if given is not None:
        wait = throttle.wait(address(request))
        if wait:
            return too_many(wait)
        if same_secret(given, token):
            return None
        throttle.failed(address(request), f"{request.method} {request.path}")
        return error(401, wrong)
    value = request.cookies.get(cookie)
    if value is not None and same_secret(value, session):
        return None
    return error(401, missing)
