"""The daemon's HTTP API and dashboard (aiohttp), in a thread of its own: docs/api.md.

Uploads never depend on it: the server runs its own event loop beside the engine's threads,
and anything that touches the databases runs in its executor. The address it listens on is
written to ``<state_dir>/api.json`` for the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from skyframe.config import ApiConfig
from skyframe.errors import SkyframeError
from skyframe.events import LifecycleEvent
from skyframe.httpguard import (
    Refused,
    address,
    check_token,
    cross_site,
    error,
    foreign_host,
    harden,
    json_object,
    same_secret,
    shown,
    static_missing,
    too_many,
)
from skyframe.metrics import Metrics
from skyframe.state import API_FILE, write_json_atomic
from skyframe.units import parse_since

if TYPE_CHECKING:
    from skyframe.queue import JobRecord
    from skyframe.reload import ReloadPlan

log = logging.getLogger(__name__)

COOKIE = "skyframe_session_{port}"  #: one per daemon: browsers share cookies across ports
WEB_ROOT = Path(__file__).resolve().parent / "web"
STATUS_EVERY = 2.0  #: seconds between two status documents on the event stream
STREAM_BUFFER = 1000  #: events waiting for one slow event-stream client before it loses some
MAX_LIMIT = 5000
START_TIMEOUT = 10.0
MAX_BODY = 64 * 1024  #: bytes a request body may have: the API's bodies are a few dozen

# Wrong tokens, counted per client address (docs/api.md#authentication).
FREE_FAILURES = 5  #: wrong tokens an address may send before it has to wait
FIRST_WAIT = 1.0  #: seconds it then waits; doubled by each further wrong token
LONGEST_WAIT = 300.0
FORGET_AFTER = 600.0  #: seconds after its last wrong token that an address starts afresh
LOG_EVERY = 60.0  #: seconds between two log lines about the wrong tokens of one address
TRACKED = 10_000  #: addresses remembered at most

_WHOLE_NUMBER = re.compile(r"0*([0-9]{1,9})")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class _Failures:
    count: int = 0
    first: float = 0.0  #: monotonic times of the first and the latest wrong token
    last: float = 0.0
    blocked_until: float = 0.0
    unlogged: int = 0  #: wrong tokens not in a log line yet
    logged_at: float = -math.inf


class TokenThrottle:
    """Slows down guessing the token: after FREE_FAILURES wrong tokens from one address, that
    address must wait before each further try, twice as long after each wrong one. While it
    waits, even the right token is refused, so that guesses tell nothing meanwhile.

    The first wrong token of an address is logged (info), then a warning with their count
    when it has to wait, and then at most one line every LOG_EVERY seconds. Only the event
    loop's thread uses it.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._by_address: dict[str, _Failures] = {}

    def wait(self, address: str) -> float:
        """Seconds the address must still wait before its token is looked at (0: none)."""
        failures = self._by_address.get(address)
        return max(failures.blocked_until - self._clock(), 0.0) if failures else 0.0

    def failed(self, address: str, what: str) -> None:
        """Count a wrong token from ``address`` (``what``: the request, for the log)."""
        now = self._clock()
        failures = self._by_address.get(address)
        if failures is None or now - failures.last > FORGET_AFTER:
            self._forget_old(now)
            failures = self._by_address[address] = _Failures(first=now)
        failures.count += 1
        failures.unlogged += 1
        failures.last = now
        extra = failures.count - FREE_FAILURES
        if extra >= 0:
            failures.blocked_until = now + min(FIRST_WAIT * 2 ** min(extra, 32), LONGEST_WAIT)
        if failures.count == 1:  # a mistake, most likely: a warning once it goes on
            log.info(
                "API: wrong token from %s (%s); more from it are counted, and logged at most "
                "once a minute",
                address,
                what,
            )
        elif failures.count == FREE_FAILURES or now - failures.logged_at >= LOG_EVERY:
            wait = f"; it now waits {math.ceil(self.wait(address))} s per try" if extra >= 0 else ""
            log.warning(
                "API: %d more wrong token(s) from %s (latest: %s), %d since %.0f s ago%s",
                failures.unlogged,
                address,
                what,
                failures.count,
                now - failures.first,
                wait,
            )
        else:
            return
        failures.unlogged = 0
        failures.logged_at = now

    def _forget_old(self, now: float) -> None:
        by_address = self._by_address
        for old in [a for a, f in by_address.items() if now - f.last > FORGET_AFTER]:
            del by_address[old]
        while len(by_address) >= TRACKED:  # many addresses at once: the oldest go first
            del by_address[min(by_address, key=lambda a: by_address[a].last)]


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (a line too long, a bad chunk) as an error with
    a traceback; the client has its 400: one debug line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        log.debug("malformed HTTP request: %s: %s", type(exc).__name__, exc.message)
        return False


_http_log = logging.getLogger(f"{__name__}.http")  #: aiohttp's own messages
_http_log.addFilter(_MalformedRequests())


def _limit(request: web.Request, default: int = 200) -> int:
    value = request.query.get("limit", str(default))
    # Not int(value): it reads other scripts' digits, and raises on "²" and on 5,000 digits.
    match = _WHOLE_NUMBER.fullmatch(value)
    number = int(match[1]) if match else 0
    if not 1 <= number <= MAX_LIMIT:
        raise Refused(
            400, f"limit must be a whole number from 1 to {MAX_LIMIT}, not {shown(value)}"
        )
    return number


class DaemonControl(Protocol):
    """What the API may ask of a running daemon (:class:`skyframe.engine.Engine` answers)."""

    def status(self) -> dict[str, Any]:
        """The status document of ``GET /api/status``."""

    def alive(self) -> bool:
        """True while the daemon runs and has not been asked to stop."""

    def readiness(self) -> tuple[bool, list[dict[str, Any]]]:
        """Whether every sink answers, and each sink's health."""

    def pipeline_names(self) -> Collection[str]:
        """The configured pipelines."""

    def groups_overview(self) -> list[dict[str, Any]]:
        """The latest groups (flights): counts, bytes and photo positions."""

    def jobs(self, state: str | None, limit: int | None) -> tuple[list[JobRecord], int]:
        """Queued jobs (of one state, at most ``limit``, oldest first) and how many there are."""

    def history_query(self, **criteria: Any) -> list[dict[str, Any]]:
        """Recorded events, newest first."""

    def set_paused(
        self, paused: bool, pipeline: str | None = None, *, reason: str = ""
    ) -> dict[str, Any]:
        """Pause or resume everything or one pipeline; the pause state after the change."""

    def retry_dead(self, pipeline: str | None = None, relpath: str | None = None) -> int:
        """Move dead-lettered jobs back into the queue; how many."""

    def reload(self, trigger: str = "reload") -> ReloadPlan:
        """Load the config file again and run it; SkyframeError when it is refused."""


class ApiServer:
    """Serves the API for one daemon; ``start()`` binds, ``stop()`` closes."""

    def __init__(self, engine: DaemonControl, config: ApiConfig, state_dir: Path) -> None:
        self.engine = engine
        self.config = config
        self.api_file = state_dir / API_FILE
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._streams: set[asyncio.Queue[tuple[str, dict[str, Any]]]] = set()
        #: Counted from the start of the API (the daemon's start): only served here.
        self.metrics = Metrics()
        self.metrics.set_status_source(engine.status)
        self._stopping: asyncio.Event | None = None
        self._throttle = TokenThrottle()

    # --- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Listen (raises OSError when the address cannot be used) and write ``api.json``."""
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._serve, args=(ready, failure), name="skyframe-api", daemon=True
        )
        self._thread.start()
        if not ready.wait(START_TIMEOUT):
            self.stop()  # it may still bind later: nobody would stop it then
            raise OSError(f"the API did not start within {START_TIMEOUT:.0f} s")
        if failure:
            self._thread.join()
            raise failure[0]
        write_json_atomic(self.api_file, {"url": self.url, "pid": os.getpid()})

    def _serve(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._bind())
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            loop.run_until_complete(self._cleanup())
            loop.close()
            return
        ready.set()
        try:
            loop.run_until_complete(self._wait_stop())
        finally:
            loop.run_until_complete(self._cleanup())
            loop.close()

    async def _bind(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY)
        app.router.add_get("/", self._index)
        app.router.add_static("/static/", WEB_ROOT / "static", follow_symlinks=False)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/api/jobs", self._jobs)
        app.router.add_get("/api/history", self._history)
        app.router.add_get("/api/groups", self._groups)
        app.router.add_post("/api/pause", self._pause)
        app.router.add_post("/api/resume", self._resume)
        app.router.add_post("/api/retry", self._retry)
        app.router.add_post("/api/reload", self._reload)
        app.router.add_post("/api/login", self._login)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=1.0,
            logger=_http_log,
            lingering_time=0,  # a body refused unread closes the connection: none is drained
        )
        await self._runner.setup()
        host, port = self.config.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, port), family=family, backlog=128)
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror or exc} ({host}:{port})") from None
        try:
            site = web.SockSite(self._runner, sock)
            await site.start()
        except BaseException:
            sock.close()
            raise
        bound_port = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound_port}"

    async def _wait_stop(self) -> None:
        assert self._stopping is not None
        await self._stopping.wait()

    async def _cleanup(self) -> None:
        for stream in list(self._streams):
            with contextlib.suppress(asyncio.QueueFull):
                stream.put_nowait(("close", {}))
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self) -> None:
        """Close every connection, stop the thread and remove ``api.json``."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended meanwhile
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(10)
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(self.api_file.read_text())
            if data.get("pid") == os.getpid():
                self.api_file.unlink()

    # --- events to the stream ----------------------------------------------------------------

    def publish(self, event: LifecycleEvent) -> None:
        """Called for every lifecycle event, in the emitting thread: count it for the metrics
        and hand it to the event streams' loop."""
        self.metrics.observe(event)
        loop = self._loop
        if not self._streams or loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._fan_out, ("lifecycle", event.to_json()))

    def _fan_out(self, message: tuple[str, dict[str, Any]]) -> None:
        for stream in self._streams:
            with contextlib.suppress(asyncio.QueueFull):  # a stalled client loses events
                stream.put_nowait(message)

    # --- security ----------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        return harden(await self._answer(request, handler))

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The handler's answer, or the refusal of the request; never an exception."""
        path = request.path
        token = self.config.token
        if not token and foreign_host(request):
            # A page of another site that resolved its own name to 127.0.0.1 (DNS rebinding).
            return error(403, f"unexpected Host {shown(request.host)}: use http://127.0.0.1")
        public = path in ("/", "/healthz", "/api/login") or path.startswith("/static/")
        if token and not public:
            refusal = self._check_token(request, token)
            if refusal is not None:
                return refusal
        if request.method == "POST" and (refusal := cross_site(request)) is not None:
            return refusal
        try:
            return await handler(request)
        except Refused as exc:
            return error(exc.status, exc.message)
        except web.HTTPException as exc:  # aiohttp's own 404, 405...: JSON like ours
            if exc.content_type == "application/json":
                raise
            return error(exc.status, exc.reason)
        except Exception as exc:
            if (missing := static_missing(path, exc)) is not None:
                return missing
            log.exception("API request %s %s failed", request.method, path)
            return error(500, f"{type(exc).__name__}: {exc}")

    def _check_token(self, request: web.Request, token: str) -> web.Response | None:
        """None when the request carries the token or the dashboard's cookie; else the answer."""
        return check_token(
            request,
            token,
            self._throttle,
            cookie=self._cookie_name(),
            session=self._session(token),
            wrong="wrong API token",
            missing="this daemon needs its API token (Authorization: Bearer ...)",
        )

    def _cookie_name(self) -> str:
        return COOKIE.format(port=self.url.rsplit(":", 1)[-1])

    @staticmethod
    def _session(token: str) -> str:
        """The dashboard's cookie value: derived from the token, never the token itself."""
        return hmac.new(token.encode(), b"skyframe dashboard session", "sha256").hexdigest()

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        """The body as a JSON object; raises Refused for anything else (never a 500)."""
        return await json_object(request, MAX_BODY)

    async def _run(self, func: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, func)

    # --- handlers ----------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.StreamResponse:
        response = web.FileResponse(WEB_ROOT / "index.html")
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
        )
        return response

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        alive = self.engine.alive()
        return web.json_response(
            {"status": "ok" if alive else "stopping"}, status=200 if alive else 503
        )

    async def _readyz(self, request: web.Request) -> web.StreamResponse:
        ready, sinks = self.engine.readiness()
        return web.json_response({"ready": ready, "sinks": sinks}, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        body, content_type = await self._run(self.metrics.render)
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def _status(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(await self._run(self.engine.status))

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await response.prepare(request)
        stream: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(STREAM_BUFFER)
        self._streams.add(stream)
        try:
            while True:
                status = await self._run(self.engine.status)
                await response.write(_sse("status", status))
                deadline = asyncio.get_running_loop().time() + STATUS_EVERY
                while True:
                    left = deadline - asyncio.get_running_loop().time()
                    if left <= 0:
                        break
                    try:
                        kind, data = await asyncio.wait_for(stream.get(), left)
                    except TimeoutError:
                        break
                    if kind == "close":
                        return response
                    await response.write(_sse(kind, data))
        except ConnectionResetError:  # the browser went away
            return response
        finally:
            self._streams.discard(stream)

    async def _jobs(self, request: web.Request) -> web.StreamResponse:
        state = request.query.get("state")
        if state not in (None, "pending", "leased", "waiting", "dead"):
            return error(400, f"state must be pending, leased, waiting or dead, not {shown(state)}")
        limit = _limit(request)
        records, total = await self._run(lambda: self.engine.jobs(state, limit))
        jobs = [
            {
                "pipeline": r.pipeline,
                "relpath": r.relpath,
                "state": r.state,
                "action": r.kind,
                "attempts": r.attempts,
                "queued_at": r.queued_at,
                "not_before": r.not_before,
                "errors": list(r.errors),
            }
            for r in records
        ]
        return web.json_response({"jobs": jobs, "total": total})

    async def _groups(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"groups": await self._run(self.engine.groups_overview)})

    async def _history(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        since = None
        if "since" in query:
            try:
                since = parse_since(query["since"])
            except ValueError:
                return error(
                    400,
                    "since must be a duration (90m, 2h, 7d) or a date (2026-11-29 08:00), "
                    f"not {shown(query['since'])}",
                )
        limit = _limit(request)
        failed = query.get("failed", "") in ("1", "true", "yes")
        events = await self._run(
            lambda: self.engine.history_query(
                failed=failed,
                since=since,
                pipeline=query.get("pipeline"),
                relpath=query.get("path"),
                limit=limit,
            )
        )
        return web.json_response({"events": events})

    async def _pause(self, request: web.Request) -> web.StreamResponse:
        return await self._switch(request, paused=True)

    async def _resume(self, request: web.Request) -> web.StreamResponse:
        return await self._switch(request, paused=False)

    async def _switch(self, request: web.Request, *, paused: bool) -> web.StreamResponse:
        body = await self._json_body(request)
        pipeline = body.get("pipeline")
        if pipeline is not None and not isinstance(pipeline, str):
            return error(400, "pipeline must be a string")
        try:
            state = await self._run(
                lambda: self.engine.set_paused(paused, pipeline, reason="through the API")
            )
        except KeyError:
            return error(404, f"no pipeline named {shown(pipeline)}")
        return web.json_response(state)

    async def _retry(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        pipeline, path = body.get("pipeline"), body.get("path")
        if body.get("all") is not True and not isinstance(path, str):
            return error(400, 'name a dead-lettered job ({"pipeline", "path"}) or {"all": true}')
        if pipeline is not None and not isinstance(pipeline, str):
            return error(400, "pipeline must be a string")
        if pipeline is not None and pipeline not in self.engine.pipeline_names():
            return error(404, f"no pipeline named {shown(pipeline)}")
        if body.get("all") is True:
            path = None
        retried = await self._run(lambda: self.engine.retry_dead(pipeline, path))
        if path is not None and not retried:
            return error(404, f"no dead-lettered job for {shown(path)}")
        return web.json_response({"retried": retried})

    async def _reload(self, request: web.Request) -> web.StreamResponse:
        await self._json_body(request)  # {}: a JSON body, like every POST (the CSRF check)
        try:
            plan = await self._run(lambda: self.engine.reload("through the API"))
        except SkyframeError as exc:
            # The running config goes on; the answer says why the new one was refused.
            return error(422, f"config not reloaded: {exc}")
        return web.json_response({"reloaded": True, "summary": plan.describe(), **plan.to_json()})

    async def _login(self, request: web.Request) -> web.StreamResponse:
        token = self.config.token
        if not token:
            return web.json_response({"ok": True})
        wait = self._throttle.wait(address(request))
        if wait:  # before the body is read: a guess now tells nothing
            return too_many(wait)
        body = await self._json_body(request)
        given = body.get("token")
        if not isinstance(given, str) or not same_secret(given, token):
            self._throttle.failed(address(request), "dashboard sign-in")
            return error(401, "wrong token")
        response = web.json_response({"ok": True})
        response.set_cookie(
            self._cookie_name(), self._session(token), httponly=True, samesite="Strict", path="/"
        )
        return response


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
