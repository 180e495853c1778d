"""A small protocol-faithful GCS server for tests of the resumable-upload protocol.

NOT an emulator of the whole API. It exists because fake-gcs-server answers a resumable-session
status query (`PUT` with an empty body and `Content-Range: bytes */TOTAL`) with 200 and
finalizes the object, whereas GCS answers 308 with `Range: bytes=0-N` (no `Range` header when
nothing is persisted) and leaves the upload open.

What it serves (JSON API v1 paths, on http://127.0.0.1:PORT):

- `POST /upload/storage/v1/b/{bucket}/o?uploadType=resumable[&name=...]` with an optional JSON
  body (`name`, `metadata`, `contentType`): opens a session; 200 with an absolute `Location`.
- On the session URI (`...?uploadType=resumable&upload_id=ID`):
  - `PUT`/`POST` with `Content-Range: bytes A-B/TOTAL` (TOTAL may be `*`) and the bytes A..B:
    a chunk. A must be at most the persisted size (else 400); bytes below the persisted size are
    discarded; a non-final chunk must end on a 256 KiB boundary, (B+1) % 262144 == 0 (else 400).
    Answers 308 with `Range: bytes=0-{persisted-1}` (no `Range` when nothing is persisted), or
    finalizes the object and answers 200 with its resource when TOTAL bytes are persisted.
  - `PUT` with an empty body and `Content-Range: bytes */TOTAL` or `bytes */*`: status query;
    308 as above without changing anything. The one exception is GCS's own: `bytes */TOTAL`
    with exactly TOTAL bytes already persisted (sent earlier with a `*` total) finalizes.
  - `PUT`/`POST` without `Content-Range`: the body is the whole object (a one-request upload).
  - `DELETE`: cancels; 499 with an empty body.
  - A finalized session answers every `PUT`/`POST` (and `DELETE`) with 200 and the same
    resource; a cancelled or unknown one answers 404; an expired one (see `expire()`) 410.
- Other `uploadType`s (media, multipart) answer 400: they are not served. With
  `ifGenerationMatch=0`, opening a session on an existing object answers 412.
- `GET /storage/v1/b/{bucket}/o/{name}`: the object resource; with `?alt=media`, the bytes
  (also at `/download/storage/v1/b/{bucket}/o/{name}?alt=media`; a single `Range: bytes=...`
  gives 206). `DELETE /storage/v1/b/{bucket}/o/{name}`: 204.

This server's own choices where the protocol leaves room: a chunk is stored whole or not at
all (never a partial prefix), a chunk that starts past the persisted size gets 400, and
`lose_next_reply()` drops the connection after storing a chunk, without answering.

Errors carry a GCS-style JSON body `{"error": {"code", "message", "errors": [...]}}`.
Other paths and methods get aiohttp's plain 404/405. Buckets exist only through `create_bucket()`.

The server runs aiohttp.web on its own event loop in a daemon thread. Test controls
(`expire`, `persisted`, `sessions`, `session_state`, `lose_next_reply`, `object_bytes`) and the
counters (`bytes_received`, `requests`) are used from the test's thread.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote

import google_crc32c
from aiohttp import web
from aiohttp.typedefs import Handler

LOOPBACK = "127.0.0.1"
CHUNK_QUANTUM = 256 * 1024
"""Non-final chunks must end on a multiple of this many bytes."""
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0

_CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")

SessionState = Literal["active", "final", "cancelled", "expired"]
RequestRecord = tuple[str, str, str | None]
"""(method, path with query string, Content-Range header or None)."""


@dataclass
class _Session:
    """One resumable upload: its target and the bytes persisted so far."""

    id: str
    bucket: str
    name: str
    content_type: str
    metadata: dict[str, str] | None
    data: bytearray = field(default_factory=bytearray)
    total: int | None = None
    state: SessionState = "active"
    resource: dict[str, Any] | None = None


@dataclass
class _Object:
    """A finalized object: its bytes and its JSON resource."""

    data: bytes
    resource: dict[str, Any]


def _error(status: int, message: str, reason: str = "invalid") -> web.Response:
    """A GCS-style JSON error response."""
    body = {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
        }
    }
    return web.json_response(body, status=status)


def _range_headers(persisted: int) -> dict[str, str]:
    """The `Range` header of a 308: absent when nothing is persisted."""
    return {"Range": f"bytes=0-{persisted - 1}"} if persisted else {}


def _rfc3339(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class FaithfulGCS:
    """In-memory GCS JSON API subset for resumable uploads, served on 127.0.0.1.

    `start()` binds a free port and serves from a background thread; `close()` stops it
    (idempotent). Usable as a context manager. `endpoint_url` is "http://127.0.0.1:PORT".
    """

    def __init__(self) -> None:
        self.endpoint_url = ""
        self.port = 0
        self.bytes_received = 0
        """Body bytes received by session PUT/POSTs, overlap included."""
        self.requests: list[RequestRecord] = []
        """Every request, in arrival order: (method, raw path with query, Content-Range or None)."""
        self._lock = threading.Lock()
        self._buckets: set[str] = set()
        self._objects: dict[tuple[str, str], _Object] = {}
        self._sessions: dict[str, _Session] = {}
        self._lose_replies = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._closed = False

    # ----------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> Self:
        """Bind a free loopback port and serve from a daemon thread; returns self."""
        if self._thread is not None:
            raise RuntimeError("FaithfulGCS already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, 0))
        self.port = sock.getsockname()[1]
        self.endpoint_url = f"http://{LOOPBACK}:{self.port}"
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name=f"FaithfulGCS:{self.port}", daemon=True
        )
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._serve(sock), loop)
        try:
            future.result(timeout=START_TIMEOUT)
        except BaseException:
            sock.close()
            self.close()
            raise
        return self

    async def _serve(self, sock: socket.socket) -> None:
        app = web.Application(middlewares=[self._log_middleware], client_max_size=1 << 30)
        app.router.add_route("*", "/upload/storage/v1/b/{bucket}/o", self._upload)
        app.router.add_get("/storage/v1/b/{bucket}/o/{name:.+}", self._get_object)
        app.router.add_get("/download/storage/v1/b/{bucket}/o/{name:.+}", self._get_object)
        app.router.add_delete("/storage/v1/b/{bucket}/o/{name:.+}", self._delete_object)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        self._runner = runner
        await web.SockSite(runner, sock).start()

    def close(self) -> None:
        """Stop serving, then stop the loop and join the thread. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        loop, thread, runner = self._loop, self._thread, self._runner
        if loop is not None and thread is not None and thread.is_alive():
            if runner is not None:
                cleanup = asyncio.run_coroutine_threadsafe(runner.cleanup(), loop)
                try:
                    cleanup.result(timeout=STOP_TIMEOUT)
                except Exception:
                    cleanup.cancel()
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=STOP_TIMEOUT)
        if loop is not None and not loop.is_running():
            loop.close()
        self._runner = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------
    # Test controls

    def create_bucket(self, name: str) -> None:
        """Make bucket `name` exist (empty); no-op if it already does."""
        with self._lock:
            self._buckets.add(name)

    def sessions(self) -> list[str]:
        """Ids of every session ever opened, in creation order, whatever their state."""
        with self._lock:
            return list(self._sessions)

    def session_state(self, session_id: str) -> SessionState:
        """ "active", "final", "cancelled" or "expired"; KeyError for an unknown id."""
        with self._lock:
            return self._sessions[session_id].state

    def persisted(self, session_id: str) -> int:
        """Bytes persisted by the session; KeyError for an unknown id."""
        with self._lock:
            return len(self._sessions[session_id].data)

    def expire(self, session_id: str = "all") -> None:
        """Make one session (or every non-final one, with "all") answer 410 Gone from now on."""
        with self._lock:
            if session_id == "all":
                targets = [s for s in self._sessions.values() if s.state == "active"]
            else:
                targets = [self._sessions[session_id]]
            for session in targets:
                session.state = "expired"
                session.data = bytearray()

    def lose_next_reply(self, times: int = 1) -> None:
        """Persist each of the next `times` accepted chunks, then drop the connection unanswered.

        Simulates a link drop after the server stored the data: the client sees a disconnect
        although the bytes (or the whole object, for a final chunk) are committed.
        """
        with self._lock:
            self._lose_replies += times

    def object_bytes(self, bucket: str, name: str) -> bytes | None:
        """The finalized object's bytes, or None if there is no such object."""
        with self._lock:
            obj = self._objects.get((bucket, name))
            return None if obj is None else obj.data

    def object_resource(self, bucket: str, name: str) -> dict[str, Any] | None:
        """A copy of the finalized object's JSON resource, or None."""
        with self._lock:
            obj = self._objects.get((bucket, name))
            return None if obj is None else dict(obj.resource)

    # ----------------------------------------------------------------------------------------
    # Handlers

    @web.middleware
    async def _log_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        with self._lock:
            self.requests.append(
                (request.method, request.raw_path, request.headers.get("Content-Range"))
            )
        return await handler(request)

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        upload_id = request.query.get("upload_id")
        if upload_id is not None:
            return await self._session_request(request, upload_id)
        if request.method != "POST":
            return _error(405, f"{request.method} needs an upload_id", "methodNotAllowed")
        upload_type = request.query.get("uploadType")
        if upload_type != "resumable":
            return _error(400, f"uploadType={upload_type} is not served by FaithfulGCS")
        return await self._initiate(request)

    async def _initiate(self, request: web.Request) -> web.Response:
        bucket = request.match_info["bucket"]
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return _error(400, "Parse Error", "parseError")
        if not isinstance(body, dict):
            return _error(400, "Parse Error", "parseError")
        name = request.query.get("name") or body.get("name")
        if not name:
            return _error(400, "Required", "required")
        metadata = body.get("metadata")
        content_type = (
            body.get("contentType")
            or request.headers.get("X-Upload-Content-Type")
            or "application/octet-stream"
        )
        with self._lock:
            if bucket not in self._buckets:
                return _error(404, "The specified bucket does not exist.", "notFound")
            if request.query.get("ifGenerationMatch") == "0" and (bucket, name) in self._objects:
                return _error(
                    412,
                    "At least one of the pre-conditions you specified did not hold.",
                    "conditionNotMet",
                )
            session = _Session(
                id=uuid.uuid4().hex,
                bucket=bucket,
                name=name,
                content_type=content_type,
                metadata=dict(metadata) if isinstance(metadata, dict) else None,
            )
            self._sessions[session.id] = session
        location = (
            f"{self.endpoint_url}/upload/storage/v1/b/{quote(bucket, safe='')}/o"
            f"?uploadType=resumable&name={quote(name, safe='')}&upload_id={session.id}"
        )
        return web.Response(status=200, headers={"Location": location})

    async def _session_request(self, request: web.Request, upload_id: str) -> web.StreamResponse:
        if request.method not in ("PUT", "POST", "DELETE"):
            return _error(405, f"{request.method} is not allowed here", "methodNotAllowed")
        body = await request.read()
        header = request.headers.get("Content-Range")
        with self._lock:
            if request.method in ("PUT", "POST"):
                self.bytes_received += len(body)
            session = self._sessions.get(upload_id)
            if session is None or session.state == "cancelled":
                return _error(404, "No such upload session.", "notFound")
            if session.state == "expired":
                return _error(410, "The upload session has expired.", "gone")
            if request.method == "DELETE":
                if session.state == "final":
                    return web.json_response(session.resource)
                session.state = "cancelled"
                session.data = bytearray()
                return web.Response(status=499)
            if session.state == "final":
                return web.json_response(session.resource)
            response = self._apply(session, header, body)
            lose = response.status in (200, 308) and bool(body) and self._lose_replies > 0
            if lose:
                self._lose_replies -= 1
        if lose:
            # Everything is stored; close the socket instead of answering.
            request.protocol.force_close()
        return response

    def _apply(self, session: _Session, header: str | None, body: bytes) -> web.Response:
        """Apply one chunk or status query to an active session (lock held)."""
        persisted = len(session.data)
        if header is None:  # a one-request upload: the body is the whole object
            if body and persisted:
                return _error(400, "Content-Range is required to resume an upload.")
            header = f"bytes 0-{len(body) - 1}/{len(body)}" if body else "bytes */0"
        match = _CONTENT_RANGE.fullmatch(header.strip())
        if match is None:
            return _error(400, f"Malformed Content-Range: {header!r}")
        first_s, last_s, total_s = match.groups()
        total = None if total_s == "*" else int(total_s)
        if total is not None:
            if session.total is not None and total != session.total:
                return _error(400, f"Total size {total} differs from {session.total}.")
            if total < persisted:
                return _error(400, f"Total size {total} is below the {persisted} bytes stored.")
        if first_s is None:
            return self._status_query(session, total, body)
        return self._chunk(session, int(first_s), int(last_s), total, body)

    def _status_query(self, session: _Session, total: int | None, body: bytes) -> web.Response:
        """`bytes */TOTAL` or `bytes */*`: 308 with the persisted range (lock held).

        As on GCS, `bytes */TOTAL` with exactly TOTAL bytes persisted finalizes the object
        (how a stream of `*`-total chunks is committed).
        """
        if body:
            return _error(400, "A status query must have an empty body.")
        if total is not None and total == len(session.data):
            return self._finalize(session)
        return web.Response(status=308, headers=_range_headers(len(session.data)))

    def _chunk(
        self, session: _Session, first: int, last: int, total: int | None, body: bytes
    ) -> web.Response:
        """`bytes FIRST-LAST/TOTAL` with its bytes: store what is new (lock held)."""
        persisted = len(session.data)
        if last < first or len(body) != last - first + 1:
            return _error(400, f"Content-Range {first}-{last} does not match {len(body)} bytes.")
        if total is not None and last >= total:
            return _error(400, f"Content-Range {first}-{last} goes past the total {total}.")
        if first > persisted:
            return _error(400, f"Chunk starts at {first}; only {persisted} bytes are stored.")
        final = total is not None and last + 1 == total
        if not final and (last + 1) % CHUNK_QUANTUM:
            return _error(
                400,
                f"A non-final chunk must end on a multiple of {CHUNK_QUANTUM} bytes; "
                f"this one ends at {last + 1}.",
            )
        if total is not None:
            session.total = total
        if last + 1 > persisted:
            session.data += body[persisted - first :]  # bytes already persisted are discarded
        if final:
            return self._finalize(session)
        return web.Response(status=308, headers=_range_headers(len(session.data)))

    def _finalize(self, session: _Session) -> web.Response:
        """Commit the session's bytes as the object (lock held); 200 with its resource."""
        data = bytes(session.data)
        now = time.time()
        generation = str(time.time_ns() // 1000)
        name_q = quote(session.name, safe="")
        base = f"{self.endpoint_url}/storage/v1/b/{session.bucket}/o/{name_q}"
        resource: dict[str, Any] = {
            "kind": "storage#object",
            "id": f"{session.bucket}/{session.name}/{generation}",
            "selfLink": base,
            "mediaLink": f"{self.endpoint_url}/download/storage/v1/b/{session.bucket}/o/"
            f"{name_q}?generation={generation}&alt=media",
            "name": session.name,
            "bucket": session.bucket,
            "generation": generation,
            "metageneration": "1",
            "contentType": session.content_type,
            "storageClass": "STANDARD",
            "size": str(len(data)),
            "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode(),
            "crc32c": base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode(),
            "etag": base64.b64encode(generation.encode()).decode(),
            "timeCreated": _rfc3339(now),
            "updated": _rfc3339(now),
        }
        if session.metadata is not None:
            resource["metadata"] = dict(session.metadata)
        session.state = "final"
        session.resource = resource
        session.data = bytearray()
        self._objects[(session.bucket, session.name)] = _Object(data, resource)
        return web.json_response(resource)

    def _lookup(self, request: web.Request) -> _Object | web.Response:
        bucket, name = request.match_info["bucket"], request.match_info["name"]
        with self._lock:
            if bucket not in self._buckets:
                return _error(404, "The specified bucket does not exist.", "notFound")
            obj = self._objects.get((bucket, name))
        if obj is None:
            return _error(404, f"No such object: {bucket}/{name}", "notFound")
        return obj

    async def _get_object(self, request: web.Request) -> web.StreamResponse:
        found = self._lookup(request)
        if isinstance(found, web.Response):
            return found
        media = request.query.get("alt") == "media"
        if request.path.startswith("/download/") and not media:
            return _error(400, "The download path needs alt=media.")
        if not media:
            return web.json_response(found.resource)
        headers = {
            "Content-Type": found.resource["contentType"],
            "X-Goog-Generation": found.resource["generation"],
        }
        wanted = request.headers.get("Range")
        if wanted is None:
            return web.Response(body=found.data, headers=headers)
        match = _RANGE.fullmatch(wanted.strip())
        size = len(found.data)
        if match is None or match.groups() == ("", ""):
            return _error(400, f"Unsupported Range: {wanted!r}")
        start_s, end_s = match.groups()
        if start_s:
            start, end = int(start_s), min(int(end_s) if end_s else size - 1, size - 1)
        else:
            start, end = max(size - int(end_s), 0), size - 1
        if start >= size or start > end:
            return _error(
                416, "The requested range cannot be satisfied.", "requestedRangeNotSatisfiable"
            )
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return web.Response(status=206, body=found.data[start : end + 1], headers=headers)

    async def _delete_object(self, request: web.Request) -> web.StreamResponse:
        found = self._lookup(request)
        if isinstance(found, web.Response):
            return found
        with self._lock:
            self._objects.pop((request.match_info["bucket"], request.match_info["name"]), None)
        return web.Response(status=204)
