"""The light S3 client: signed PUT, HEAD and DELETE of small objects on a connection of its
own, beside s3fs (see :class:`DirectS3`); its requests are signed by
:mod:`skyframe.protocols.s3.sigv4`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import io
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from skyframe.protocols.classify import one_line, unreachable
from skyframe.protocols.endpoint import CLOSE_TIMEOUT
from skyframe.protocols.s3.sigv4 import SigV4Signer, host_of

if TYPE_CHECKING:
    from skyframe.protocols.s3.backend import S3Options

log = logging.getLogger(__name__)

#: Bodies larger than this go to aiohttp as a stream, not as bytes.
LARGE_BODY = 1024 * 1024


@dataclass(frozen=True)
class StaticCredentials:
    """Credentials given in the sink's options (``key``, ``secret``, ``token``)."""

    access_key: str
    secret_key: str
    token: str | None = None


class DirectS3:
    """PUT, HEAD and DELETE of small objects without aiobotocore's request pipeline.

    On a many-small-files run, most of the time went into building each request (parameter
    validation, endpoint rules, user agent, event hooks, response parsing): about 2 ms of CPU
    per object; and a one-shot run spent a quarter of a second loading s3fs, aiobotocore and
    botocore and building the client before its first PUT. Here each request is signed by
    :class:`~skyframe.protocols.s3.sigv4.SigV4Signer` (SigV4, signed payload: a PUT's payload hash
    is the sha256 computed for the manifest) and sent on an aiohttp session of our own, on
    fsspec's event loop (the one s3fs uses).

    The credentials are the sink's ``key`` and ``secret`` options when it has them: then
    neither the sinks' check nor the upload of small files loads the S3 library at all.
    Otherwise they are read from the connected client for each request (refreshed ones are
    used), and a client without credentials or with another signature version declines.

    It reports no error of its own: anything but the expected answer is counted as declined
    and the caller repeats the request through s3fs, whose errors (and retries) are then the
    ones classified and reported, exactly as without it. The check is the one exception: when
    nothing answers at the endpoint, it says so at once (:meth:`probe`).

    Used with an ``endpoint_url`` (S3-compatible servers take path-style URLs); on AWS the
    regular path is used, as bucket addressing there depends on the bucket and region.
    """

    def __init__(
        self,
        endpoint_url: str,
        region: str,
        *,
        credentials: StaticCredentials | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.base = endpoint_url.rstrip("/")
        self._endpoint = urlsplit(self.base)  #: its path: where the server is mounted, if any
        self.region = region
        self.static = credentials  #: None: the credentials come from the connected client
        self.timeout = timeout
        self._signer = SigV4Signer(host_of(endpoint_url), region)
        self._session: Any = None
        self._proxy: str | None = None  #: the session's proxy, read when it opens
        self._loop: asyncio.AbstractEventLoop | None = None  #: the session's
        self._warming: Future[None] | None = None  #: the session being opened ahead
        self.sent = 0  #: objects stored this way
        self.declined = 0  #: requests answered otherwise (the caller then uses s3fs)

    def _signed(
        self,
        method: str,
        bucket: str,
        key: str,
        credentials: StaticCredentials,
        *,
        sha256: str,
        headers: dict[str, str] | None = None,
    ) -> tuple[str, dict[str, str]]:
        """A request's path (path-style addressing, percent-encoded as sent) and its signed
        headers; ``sha256`` is the payload's."""
        path = f"{self._endpoint.path}/{quote(bucket)}/{quote(key, safe='/~')}"
        return path, self._signer.sign(
            method,
            path,
            headers or {},
            sha256,
            access_key=credentials.access_key,
            secret_key=credentials.secret_key,
            token=credentials.token,
        )

    def _ssl_context(self) -> Any:
        """The TLS context for an https endpoint: the bundle in AWS_CA_BUNDLE, as botocore
        uses, else the system's; None for plain HTTP."""
        if self._endpoint.scheme != "https":
            return None
        import ssl

        return ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or None)

    def _open(self) -> Any:
        """The session, opened on first use (on the event loop, as aiohttp requires)."""
        if self._session is None:
            import aiohttp

            context = self._ssl_context()
            self._loop = asyncio.get_running_loop()
            self._proxy = self.proxy()
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=min(self.timeout, 10.0), sock_read=self.timeout
                ),
                cookie_jar=aiohttp.DummyCookieJar(),
                connector=aiohttp.TCPConnector(ssl=True if context is None else context),
            )
        return self._session

    async def _credentials(self, client: Any, session: Any) -> StaticCredentials | None:
        """The options' credentials, else the current ones of the session that made the client
        (the environment, a profile, a role); None when there are none (or the client does
        not sign with SigV4 in this region)."""
        if self.static is not None:
            return self.static
        if client is None or session is None:
            return None
        if client.meta.config.signature_version not in (None, "s3v4", "v4"):
            return None
        if client.meta.region_name != self.region:
            return None
        source = await session.get_credentials()
        if source is None:
            return None
        frozen = await source.get_frozen_credentials()
        if frozen is None or not frozen.access_key or not frozen.secret_key:
            return None
        return StaticCredentials(frozen.access_key, frozen.secret_key, frozen.token)

    async def put(
        self,
        bucket: str,
        key: str,
        body: bytes,
        *,
        sha256: str,
        metadata: dict[str, str],
        client: Any = None,
        session: Any = None,
    ) -> bool:
        """The PUT of ``body`` (whose sha256 is ``sha256``), on fsspec's event loop; True when
        the server stored the object. ``client`` and ``session`` (s3fs's ``fs.s3`` and
        ``fs.session``, taken outside the loop) give the credentials when the options have
        none."""
        import aiohttp
        from yarl import URL

        credentials = await self._credentials(client, session)
        if credentials is None:
            self.declined += 1
            return False  # s3fs's path reports the missing credentials
        path, headers = self._signed(
            "PUT",
            bucket,
            key,
            credentials,
            sha256=sha256,
            headers={f"x-amz-meta-{name}": value for name, value in metadata.items()},
        )
        url = URL(f"{self._endpoint.scheme}://{self._endpoint.netloc}{path}", encoded=True)
        # aiohttp sends bytes in one write and warns above 1 MiB (it may hold the event loop):
        # a larger body goes as a stream.
        data: bytes | io.BytesIO = body if len(body) <= LARGE_BODY else io.BytesIO(body)
        try:
            session = self._open()
            async with session.put(url, data=data, headers=headers, proxy=self._proxy) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.debug("direct PUT of %s/%s got no answer: %s", bucket, key, exc)
            status = 0
        if status == 200:
            self.sent += 1
            return True
        self.declined += 1
        log.debug("direct PUT of %s/%s answered %s; sending it through s3fs", bucket, key, status)
        return False

    def probe(
        self, path: str, payload: bytes, written: Callable[[], None] | None = None
    ) -> float | None:
        """See :meth:`skyframe.protocols.endpoint.DirectClient.probe`; ``path`` is ``bucket/key``.

        The three requests go on a connection of their own from the calling thread (the
        standard library's HTTP client), so the first one is on its way within milliseconds of
        the start. Meanwhile aiohttp is loaded and the uploads' session opened on the event
        loop: a server's first write into a fresh bucket can take a fifth of a second
        (SeaweedFS grows a volume for it), which is then not lost.
        """
        if self.static is None or self.proxy():
            return None  # the regular probe, which goes through the proxy
        self._warm_up()
        bucket, _, key = path.partition("/")
        began = time.monotonic()
        connection = self._connection()
        try:
            connection.connect()
        except OSError as exc:
            connection.close()
            if unreachable(exc):
                # Nothing answers there: the regular probe would wait as long to say so.
                reason = exc.strerror or one_line(exc)
                raise ConnectionError(f"could not connect to {self.base}: {reason}") from exc
            log.debug("direct probe of %s could not connect: %s", path, exc)
            return None
        connected = time.monotonic() - began
        try:
            connection.sock.settimeout(self.timeout)
            status, _ = self._request(connection, "PUT", bucket, key, payload)
            if status != 200:
                return None
            if written is not None:
                written()
            status, headers = self._request(connection, "HEAD", bucket, key)
            stored = status == 200 and headers.get("Content-Length") == str(len(payload))
            status, _ = self._request(connection, "DELETE", bucket, key)
            # Anything else leaves the answer to the regular probe, which writes the same
            # name again and deletes it.
            return connected if stored and status in (200, 204) else None
        except TimeoutError as exc:
            # Connected, and then nothing: a hung server (the regular probe would wait too).
            raise ConnectionError(
                f"{self.base} accepted the connection but gave no answer within {self.timeout:g} s"
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            log.debug("direct probe of %s got no answer: %s", path, exc)
            return None
        finally:
            connection.close()

    def proxy(self) -> str | None:
        """The proxy the environment names for the endpoint (``HTTP_PROXY`` or
        ``HTTPS_PROXY``, unless ``NO_PROXY`` covers the host), as botocore finds it."""
        import urllib.request

        if urllib.request.proxy_bypass(self._endpoint.hostname or ""):
            return None
        return urllib.request.getproxies().get(self._endpoint.scheme) or None

    def _connection(self) -> http.client.HTTPConnection:
        host, port = self._endpoint.hostname or "", self._endpoint.port
        connect_timeout = min(self.timeout, 10.0)
        if self._endpoint.scheme == "https":
            return http.client.HTTPSConnection(
                host, port, timeout=connect_timeout, context=self._ssl_context()
            )
        return http.client.HTTPConnection(host, port, timeout=connect_timeout)

    def _request(
        self,
        connection: http.client.HTTPConnection,
        method: str,
        bucket: str,
        key: str,
        body: bytes | None = None,
    ) -> tuple[int, Any]:
        """One request of the probe, signed with the options' credentials."""
        assert self.static is not None
        digest = hashlib.sha256(body or b"").hexdigest()
        path, headers = self._signed(method, bucket, key, self.static, sha256=digest)
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status, response.headers

    def _warm_up(self) -> None:
        """Load aiohttp and open the session on fsspec's event loop, without waiting."""
        if self._session is not None or self._warming is not None:
            return
        from fsspec.asyn import get_loop

        async def warm_up() -> None:
            self._open()

        self._warming = asyncio.run_coroutine_threadsafe(warm_up(), get_loop())

    async def close_async(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def close(self) -> None:
        """Close the session's connections (a new session opens if used again)."""
        from fsspec.asyn import sync

        warming, self._warming = self._warming, None
        if warming is not None:  # a session opened after this would be left open
            with contextlib.suppress(Exception):
                warming.result(timeout=CLOSE_TIMEOUT)
        loop = self._loop
        if self._session is None or loop is None or not loop.is_running():
            return
        with contextlib.suppress(Exception):
            sync(loop, self.close_async, timeout=CLOSE_TIMEOUT)


def direct_client(settings: S3Options) -> DirectS3 | None:
    """The light client for a sink's options, or None where only the regular path applies
    (AWS itself, unsigned requests, or options that shape the request: encryption, storage
    class, requester pays, client or Config options of botocore's)."""
    if settings.endpoint_url is None or settings.anon or not settings.plain:
        return None
    credentials = None
    if settings.key is not None and settings.secret is not None:
        credentials = StaticCredentials(settings.key, settings.secret, settings.token)
    return DirectS3(
        settings.endpoint_url,
        settings.region or "us-east-1",
        credentials=credentials,
        timeout=settings.timeout,
    )
