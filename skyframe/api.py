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
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from skyframe.config import ApiConfig, is_loopback
from skyframe.events import LifecycleEvent
from skyframe.metrics import Metrics
from skyframe.state import API_FILE, write_json_atomic
from skyframe.units import parse_since

if TYPE_CHECKING:
    from skyframe.engine import Engine

log = logging.getLogger(__name__)

COOKIE = "skyframe_session_{port}"  #: one per daemon: browsers share cookies across ports
WEB_ROOT = Path(__file__).resolve().parent / "web"
STATUS_EVERY = 2.0  #: seconds between two status documents on the event stream
STREAM_BUFFER = 1000  #: events waiting for one slow event-stream client before it loses some
MAX_LIMIT = 5000
START_TIMEOUT = 10.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _host_name(host_header: str) -> str:
    """The host of a ``Host`` header, without its port (IPv6 in brackets kept whole)."""
    if host_header.startswith("["):
        return host_header[: host_header.find("]") + 1]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def _limit(request: web.Request, default: int = 200) -> int:
    value = request.query.get("limit", str(default))
    if not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"limit must be 1 to {MAX_LIMIT}, not {value!r}"}),
            content_type="application/json",
        )
    return int(value)


class ApiServer:
    """Serves the API for one engine; ``start()`` binds, ``stop()`` closes."""

    def __init__(self, engine: Engine, config: ApiConfig, state_dir: Path) -> None:
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
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._index)
        app.router.add_static("/static/", WEB_ROOT / "static", follow_symlinks=False)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/api/jobs", self._jobs)
        app.router.add_get("/api/history", self._history)
        app.router.add_post("/api/pause", self._pause)
        app.router.add_post("/api/resume", self._resume)
        app.router.add_post("/api/retry", self._retry)
        app.router.add_post("/api/login", self._login)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
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
        path = request.path
        token = self.config.token
        if not token and not is_loopback(_host_name(request.host)):
            # A page of another site that resolved its own name to 127.0.0.1 (DNS rebinding).
            return _error(403, f"unexpected Host {request.host!r}: use http://127.0.0.1")
        public = path in ("/", "/healthz", "/api/login") or path.startswith("/static/")
        if token and not public and not self._authorised(request, token):
            return _error(401, "this daemon needs its API token (Authorization: Bearer ...)")
        if request.method == "POST":
            if request.content_type != "application/json":
                return _error(415, "send a JSON body (Content-Type: application/json)")
            origin = request.headers.get("Origin")
            if origin and origin.split("://", 1)[-1] != request.host:
                return _error(403, f"cross-site request from {origin} refused")
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own 404, 405...: JSON like ours
            if exc.content_type == "application/json":
                raise
            return _error(exc.status, exc.reason)
        except Exception as exc:
            log.exception("API request %s %s failed", request.method, path)
            return _error(500, f"{type(exc).__name__}: {exc}")
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    def _authorised(self, request: web.Request, token: str) -> bool:
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            return hmac.compare_digest(header[7:].encode(), token.encode())
        cookie = request.cookies.get(self._cookie_name(), "")
        return hmac.compare_digest(cookie.encode(), self._session(token).encode())

    def _cookie_name(self) -> str:
        return COOKIE.format(port=self.url.rsplit(":", 1)[-1])

    @staticmethod
    def _session(token: str) -> str:
        """The dashboard's cookie value: derived from the token, never the token itself."""
        return hmac.new(token.encode(), b"skyframe dashboard session", "sha256").hexdigest()

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "the body is not valid JSON"}),
                content_type="application/json",
            ) from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "the body must be a JSON object"}),
                content_type="application/json",
            )
        return body

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
            return _error(400, f"state must be pending, leased, waiting or dead, not {state!r}")
        limit = _limit(request)
        records = await self._run(lambda: self.engine.queue.records(state, limit))
        counts = await self._run(self.engine.queue.counts)
        total = counts[state] if state is not None else sum(counts.values())
        jobs = [
            {
                "pipeline": r["pipeline"],
                "relpath": r["relpath"],
                "state": r["state"],
                "action": r["payload"].get("action", "upload"),
                "attempts": r["attempts"],
                "queued_at": r["queued_at"],
                "not_before": r.get("not_before"),
                "errors": r["errors"],
            }
            for r in records
        ]
        return web.json_response({"jobs": jobs, "total": total})

    async def _history(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        since = None
        if "since" in query:
            try:
                since = parse_since(query["since"])
            except ValueError as exc:
                return _error(400, f"since: {exc}")
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
            return _error(400, "pipeline must be a string")
        try:
            state = await self._run(
                lambda: self.engine.set_paused(paused, pipeline, reason="through the API")
            )
        except KeyError:
            return _error(404, f"no pipeline named {pipeline!r}")
        return web.json_response(state)

    async def _retry(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        pipeline, path = body.get("pipeline"), body.get("path")
        if body.get("all") is not True and not isinstance(path, str):
            return _error(400, 'name a dead-lettered job ({"pipeline", "path"}) or {"all": true}')
        if pipeline is not None and not isinstance(pipeline, str):
            return _error(400, "pipeline must be a string")
        if pipeline is not None and pipeline not in self.engine.pipelines:
            return _error(404, f"no pipeline named {pipeline!r}")
        if body.get("all") is True:
            path = None
        retried = await self._run(lambda: self.engine.retry_dead(pipeline, path))
        if path is not None and not retried:
            return _error(404, f"no dead-lettered job for {path!r}")
        return web.json_response({"retried": retried})

    async def _login(self, request: web.Request) -> web.StreamResponse:
        token = self.config.token
        if not token:
            return web.json_response({"ok": True})
        body = await self._json_body(request)
        given = body.get("token")
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), token.encode()):
            return _error(401, "wrong token")
        response = web.json_response({"ok": True})
        response.set_cookie(
            self._cookie_name(), self._session(token), httponly=True, samesite="Strict", path="/"
        )
        return response


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
