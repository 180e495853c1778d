"""The hub's HTTP defences: the same rules as the daemon's API (docs/api.md#authentication).

Operator tokens compared in constant time, guesses slowed per address (the daemon's
:class:`~skyframe.api.TokenThrottle`), DNS rebinding refused when no token is set, ``POST``
only as JSON from the same origin, bodies bounded. The few lines that mirror private helpers
of :mod:`skyframe.api` (``_same``, ``_host_name``, ``_json_body``) are kept to those.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
from typing import Any

from aiohttp import web

from skyframe.config import is_loopback

BODY_TIMEOUT = 10.0  #: seconds a client has to send its body
SESSION_COOKIE = "skyframe_hub_session"


class Refused(Exception):
    """Answered ``{"error": message}`` with this status by the hub's middleware."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """The JSON error answer."""
    return web.json_response({"error": message}, status=status, headers=headers)


def shown(value: object, width: int = 60) -> str:
    """A value a client sent, quoted for a message and cut short."""
    text = repr(value)
    return text if len(text) <= width else f"{text[: width - 3]}..."


def same_secret(given: str, secret: str) -> bool:
    """Whether a client's value is the secret, in constant time whatever their lengths."""

    def digest(value: str) -> bytes:
        return hmac.new(b"skyframe hub", value.encode("utf-8", "surrogatepass"), "sha256").digest()

    return hmac.compare_digest(digest(given), digest(secret))


def session_value(token: str) -> str:
    """The page's cookie: derived from the operators' token, never the token itself."""
    return hmac.new(token.encode(), b"skyframe hub session", "sha256").hexdigest()


def host_name(host_header: str) -> str:
    """The host of a ``Host`` header, without its port (IPv6 in brackets kept whole)."""
    if host_header.startswith("["):
        return host_header[: host_header.find("]") + 1]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def foreign_host(request: web.Request) -> bool:
    """True when the ``Host`` is not a loopback name (a DNS-rebinding page's, or a proxy's)."""
    return not is_loopback(host_name(request.host))


def cross_site(request: web.Request) -> web.Response | None:
    """The refusal of a POST that is not JSON or comes from another origin; None when fine."""
    if request.content_type != "application/json":
        return error(415, "send a JSON body (Content-Type: application/json)")
    origin = request.headers.get("Origin")
    if origin and origin.split("://", 1)[-1] != request.host:
        return error(403, f"cross-site request from {shown(origin)} refused")
    return None


def bearer(request: web.Request) -> str | None:
    """The token of ``Authorization: Bearer ...``, if there is one."""
    header = request.headers.get("Authorization", "")
    return header[7:] if header.startswith("Bearer ") else None


def too_many(wait: float) -> web.Response:
    """429 with Retry-After."""
    seconds = math.ceil(wait)
    return error(
        429,
        f"too many wrong tokens from this address: try again in {seconds} s",
        headers={"Retry-After": str(seconds)},
    )


def address(request: web.Request) -> str:
    """The client's address, for the throttle."""
    return request.remote or "unknown"


async def json_body(request: web.Request, limit: int, status: int = 400) -> Any:
    """The body as JSON (``status`` when it is not JSON; 413 beyond ``limit`` bytes)."""
    size = request.content_length
    too_large = f"the body is larger than {limit // 1024} KiB"
    if size is not None and size > limit:
        raise Refused(413, too_large)
    try:
        raw = await asyncio.wait_for(_read(request, limit), BODY_TIMEOUT)
    except TimeoutError:
        raise Refused(408, f"the body did not come within {BODY_TIMEOUT:.0f} s") from None
    except ConnectionError:
        raise Refused(400, "the body was cut off") from None
    if raw is None:  # sent without a Content-Length, or longer than it said
        raise Refused(413, too_large)
    try:
        return json.loads(raw)
    except RecursionError:
        raise Refused(status, "the body is not valid JSON: nested too deep") from None
    except ValueError as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise Refused(status, f"the body is not valid JSON: {detail}") from None


async def _read(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None once it is longer than ``limit`` (the rest is not read)."""
    chunks, total = [], 0
    while chunk := await request.content.read(64 * 1024):
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def json_object(request: web.Request, limit: int, status: int = 400) -> dict[str, Any]:
    """The body as a JSON object."""
    body = await json_body(request, limit, status)
    if not isinstance(body, dict):
        raise Refused(status, "the body must be a JSON object")
    return body
