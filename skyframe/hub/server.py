"""The hub's HTTP side (aiohttp): station ingest, the operators' JSON API and page, and the
alerts loop. Every database call runs in the executor; the event loop only moves bytes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from skyframe.api import TokenThrottle
from skyframe.display import is_utf8
from skyframe.httpguard import (
    Refused,
    address,
    bearer,
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
from skyframe.hub import alerts, commands, queries
from skyframe.hub.config import LoadedHubConfig
from skyframe.hub.db import DATABASE_THREADS, describe
from skyframe.hub.guard import SESSION_COOKIE, session_value
from skyframe.hub.ingest import MAX_BODY, SHA256_HEX, Arrival, InvalidBatch, parse_batch
from skyframe.hub.tokens import station_of_token, token_hash
from skyframe.hub.writer import IngestWriter
from skyframe.units import parse_since

log = logging.getLogger(__name__)

WEB_ROOT = Path(__file__).resolve().parent / "web"
OPERATOR_BODY = 64 * 1024  #: bytes of an operator's request body at most
KNOWN_FOR = 30.0  #: seconds a token found is trusted before its body is read
KNOWN_MAX = 10_000  #: tokens remembered at most
CLOSE_WAIT = 10.0  #: seconds closing waits for the database threads' queries to end
MAX_LIMIT = 5000
_WHOLE_NUMBER = re.compile(r"0*([0-9]{1,19})")  # 2**63 has 19 digits: no longer ones
PUBLIC = ("/", "/healthz", "/api/login", "/api/v1/ingest")
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


def _a_name(value: object, longest: int) -> bool:
    """Whether ``value`` is text a name column holds: 1 to ``longest`` characters, UTF-8 (JSON
    can carry a lone surrogate)."""
    return isinstance(value, str) and 0 < len(value) <= longest and is_utf8(value)


def _number(request: web.Request, name: str, default: int, top: int) -> int:
    value = request.query.get(name, str(default))
    match = _WHOLE_NUMBER.fullmatch(value)
    number = int(match[1]) if match else -1
    if not 0 <= number <= top:
        raise Refused(400, f"{name} must be a whole number from 0 to {top}, not {shown(value)}")
    return number


def _limit(request: web.Request, default: int = 200) -> int:
    limit = _number(request, "limit", default, MAX_LIMIT)
    if limit < 1:
        raise Refused(400, "limit must be at least 1")
    return limit


class HubServer:
    """One hub process's server: ``await start()`` binds, ``await close()`` stops."""

    def __init__(self, loaded: LoadedHubConfig, engine: Engine) -> None:
        self.loaded = loaded
        self.config = loaded.config
        self.engine = engine
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._throttle = TokenThrottle()
        self._database_threads = ThreadPoolExecutor(DATABASE_THREADS, "skyframe-hub-db")
        self._writer = IngestWriter(engine, self._run)
        #: stations whose token was found lately, by the token's hash: (id, name, until). It
        #: only spares the check before a body is read; each batch is stored after the token
        #: is checked again in its own transaction, so a revoked token is refused at once.
        self._known: dict[str, tuple[int, str, float]] = {}
        self._notifier: alerts.AlertNotifier | None = None
        self._alerts_task: asyncio.Task[None] | None = None

    # --- life cycle --------------------------------------------------------------------------

    async def start(self) -> str:
        """Listen (OSError when the address cannot be used); the URL it answers on."""
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY)
        app.router.add_get("/", self._index)
        app.router.add_static("/static/", WEB_ROOT / "static", follow_symlinks=False)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_post("/api/v1/ingest", self._ingest)
        app.router.add_post("/api/login", self._login)
        app.router.add_get("/api/stations", self._stations)
        app.router.add_get("/api/files", self._files)
        app.router.add_get("/api/flights", self._flights)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/api/alerts", self._alerts)
        app.router.add_get("/api/commands", self._commands)
        app.router.add_post("/api/stations/{name}/pause", self._pause)
        app.router.add_post("/api/stations/{name}/resume", self._resume)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0, lingering_time=0
        )
        await self._runner.setup()
        host, port = self.config.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, port), family=family, backlog=128)
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror or exc} ({host}:{port})") from None
        context = self._tls()
        try:
            await web.SockSite(self._runner, sock, ssl_context=context).start()
        except BaseException:
            sock.close()
            raise
        scheme = "https" if context else "http"
        shown_host = f"[{host}]" if ":" in host else host
        self.url = f"{scheme}://{shown_host}:{sock.getsockname()[1]}"
        if self.config.alerts.webhook:
            self._notifier = alerts.AlertNotifier(self.config.alerts.webhook, self.engine)
            self._notifier.start()
        self._alerts_task = asyncio.create_task(self._watch(), name="skyframe-hub-watch")
        return self.url

    def _tls(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        if tls is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(
            self.loaded.resolve_path(tls.cert), self.loaded.resolve_path(tls.key)
        )
        return context

    async def close(self) -> None:
        """Stop the alerts and close every connection."""
        if self._alerts_task is not None:
            self._alerts_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._alerts_task
        if self._notifier is not None:
            await self._notifier.close()
        if self._runner is not None:
            await self._runner.cleanup()
        await self._writer.close()
        if self._writer.groups:
            log.info(
                "hub: %d batches stored in %d transactions",
                self._writer.batches,
                self._writer.groups,
            )
        # A request cut off above may still hold a connection on a database thread: wait for
        # it to give it back, so that disposing of the engine closes every connection (one
        # left to the garbage collector is closed by nobody). A query stuck past the bound is
        # left to finish on its own.
        waiting = asyncio.to_thread(self._database_threads.shutdown, True, cancel_futures=True)
        try:
            await asyncio.wait_for(waiting, CLOSE_WAIT)
        except TimeoutError:
            log.warning("hub: a database query still runs after %.0f s; closing anyway", CLOSE_WAIT)

    async def _run(self, func: Callable[[], T]) -> T:
        """``func`` on a database thread (requests mostly wait for the database there: enough
        threads that those waits overlap, as many as the engine's pool has connections)."""
        return await asyncio.get_running_loop().run_in_executor(self._database_threads, func)

    async def _watch(self) -> None:
        """The alerts loop: every ``check_every`` seconds, whatever happens meanwhile."""
        every = self.config.alerts.check_every
        while True:
            try:
                changes = await self._run(lambda: alerts.evaluate(self.engine, self.config.alerts))
            except SQLAlchemyError as exc:
                log.warning("hub: alerts not checked: %s", describe(exc))
                changes = []
            for change in changes:
                log.warning("hub: alert %s: %s", change.state, change.message)
                if self._notifier is not None:
                    self._notifier.put(change)
            await asyncio.sleep(every)

    # --- security ----------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        return harden(await self._answer(request, handler))

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        token = self.config.operators.token
        ingest = path == "/api/v1/ingest"  # stations: their own tokens, from anywhere
        if not token and not ingest and foreign_host(request):
            return error(403, f"unexpected Host {shown(request.host)}: use http://127.0.0.1")
        public = path in PUBLIC or path.startswith("/static/")
        if token and not public:
            refusal = self._check_operator(request, token)
            if refusal is not None:
                return refusal
        if request.method == "POST":
            refusal = cross_site(request)
            if refusal is not None:
                return refusal
        try:
            return await handler(request)
        except Refused as exc:
            return error(exc.status, exc.message)
        except web.HTTPException as exc:
            if exc.content_type == "application/json":
                raise
            return error(exc.status, exc.reason)
        except SQLAlchemyError as exc:
            log.error("hub: %s %s: database error: %s", request.method, path, describe(exc))
            return error(503, "the hub database is unavailable; try again")
        except Exception as exc:
            if (missing := static_missing(path, exc)) is not None:
                return missing
            log.exception("hub: %s %s failed", request.method, path)
            return error(500, f"{type(exc).__name__}: {exc}")

    def _check_operator(self, request: web.Request, token: str) -> web.Response | None:
        return check_token(
            request,
            token,
            self._throttle,
            cookie=SESSION_COOKIE,
            session=session_value(token),
            wrong="wrong operator token",
            missing="this hub needs the operators' token (Authorization: Bearer ...)",
        )

    # --- stations ----------------------------------------------------------------------------

    async def _ingest(self, request: web.Request) -> web.StreamResponse:
        token = bearer(request)
        if not token:
            return error(401, "send the station's token (Authorization: Bearer ...)")
        wait = self._throttle.wait(address(request))
        if wait:
            return too_many(wait)
        station = self._known.get(token_hash(token))
        if station is None or station[2] < time.monotonic():
            found = await self._run(lambda: self._station_of(token))
            station = None if found is None else (*found, time.monotonic() + KNOWN_FOR)
            if station is not None:
                self._remember(token_hash(token), station)
        if station is None:
            self._throttle.failed(address(request), "ingest")
            return error(401, "unknown or revoked station token")
        body = await json_object(request, MAX_BODY, status=422)
        try:
            batch = parse_batch(body)
        except InvalidBatch as exc:
            # Where, too, so that a station can set aside the one event refused.
            return web.json_response({"error": str(exc), "where": exc.where}, status=422)
        station_id, name, _ = station
        if batch.station != name:
            return error(403, f"this token belongs to another station, not {shown(batch.station)}")

        # Stored with the batches of other requests waiting meanwhile (one transaction), after
        # the token is checked again there.
        result = await self._writer.store(Arrival(station_id, token_hash(token), batch))
        if result is None:  # revoked since it was remembered: forget it, and count a guess
            self._known.pop(token_hash(token), None)
            self._throttle.failed(address(request), "ingest")
            return error(401, "unknown or revoked station token")
        return web.json_response(result.to_json())

    def _remember(self, key: str, station: tuple[int, str, float]) -> None:
        if len(self._known) >= KNOWN_MAX:
            self._known.clear()  # many stations, or a flood of tokens: start afresh
        self._known[key] = station

    def _station_of(self, token: str) -> tuple[int, str] | None:
        with self.engine.connect() as connection:
            return station_of_token(connection, token)

    # --- operators ---------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.StreamResponse:
        response = web.FileResponse(WEB_ROOT / "index.html")
        response.headers["Content-Security-Policy"] = CSP
        return response

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def _login(self, request: web.Request) -> web.StreamResponse:
        token = self.config.operators.token
        if not token:
            return web.json_response({"ok": True, "token_required": False})
        wait = self._throttle.wait(address(request))
        if wait:
            return too_many(wait)
        body = await json_object(request, OPERATOR_BODY)
        given = body.get("token")
        if not isinstance(given, str) or not same_secret(given, token):
            self._throttle.failed(address(request), "hub sign-in")
            return error(401, "wrong token")
        response = web.json_response({"ok": True, "token_required": True})
        response.set_cookie(
            SESSION_COOKIE,
            session_value(token),
            httponly=True,
            samesite="Strict",
            secure=self.config.tls is not None,
            path="/",
        )
        return response

    async def _stations(self, request: web.Request) -> web.StreamResponse:
        silent_after = self.config.alerts.silent_after
        found = await self._run(lambda: queries.stations_overview(self.engine, silent_after))
        return web.json_response({"stations": found, "now": time.time()})

    async def _files(self, request: web.Request) -> web.StreamResponse:
        name, digest = request.query.get("name"), request.query.get("sha256")
        if (name is None) == (digest is None):
            return error(400, "give one of name (a file name or a glob) or sha256")
        if digest is not None and not SHA256_HEX.fullmatch(digest):
            return error(400, f"sha256 must be 64 hexadecimal digits, not {shown(digest)}")
        if name is not None and not name.strip():
            return error(400, "name is empty")
        limit = _limit(request)
        found = await self._run(
            lambda: queries.find_files(self.engine, name=name, sha256=digest, limit=limit)
        )
        return web.json_response({"files": found})

    async def _flights(self, request: web.Request) -> web.StreamResponse:
        value = request.query.get("day")
        try:
            day = date.fromisoformat(value) if value else datetime.now(UTC).date()
        except ValueError:
            return error(400, f"day must be YYYY-MM-DD, not {shown(value)}")
        found = await self._run(lambda: queries.flights_of_day(self.engine, day))
        return web.json_response({"day": day.isoformat(), "flights": found})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        since = None
        if "since" in request.query:
            try:
                since = parse_since(request.query["since"])
            except ValueError:
                return error(
                    400,
                    "since must be a duration (90m, 2h, 7d) or a date (2026-11-29 08:00), "
                    f"not {shown(request.query['since'])}",
                )
        after = _number(request, "after", 0, 2**62)
        limit = _limit(request)
        station = request.query.get("station")
        found, cursor = await self._run(
            lambda: queries.list_events(
                self.engine, station=station, since=since, after=after, limit=limit
            )
        )
        return web.json_response({"events": found, "next": cursor})

    async def _alerts(self, request: web.Request) -> web.StreamResponse:
        limit = _limit(request, 100)
        return web.json_response(
            {"alerts": await self._run(lambda: queries.list_alerts(self.engine, limit))}
        )

    async def _commands(self, request: web.Request) -> web.StreamResponse:
        station = request.query.get("station")
        limit = _limit(request, 100)
        found = await self._run(lambda: commands.list_commands(self.engine, station, limit))
        return web.json_response({"commands": found})

    async def _pause(self, request: web.Request) -> web.StreamResponse:
        return await self._command(request, "pause")

    async def _resume(self, request: web.Request) -> web.StreamResponse:
        return await self._command(request, "resume")

    async def _command(self, request: web.Request, action: commands.Action) -> web.StreamResponse:
        body = await json_object(request, OPERATOR_BODY)
        pipeline = body.get("pipeline")
        if pipeline is not None and not _a_name(pipeline, 200):
            return error(400, "pipeline must be a pipeline's name (1 to 200 characters)")
        name = request.match_info["name"]
        try:
            created = await self._run(
                lambda: commands.create_command(self.engine, name, action, pipeline)
            )
        except commands.UnknownStation:
            return error(404, f"no station named {shown(name)}")
        log.info("hub: %s %s%s (command %s)", action, name,
                 f" {pipeline}" if pipeline else "", created["id"])  # fmt: skip
        return web.json_response(created, status=201)


async def serve(server: HubServer, stop: asyncio.Event, ready: Callable[[str], Any]) -> None:
    """Start, call ``ready(url)``, run until ``stop`` is set, close."""
    url = await server.start()
    try:
        ready(url)
        await stop.wait()
    finally:
        await server.close()
