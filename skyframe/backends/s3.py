"""S3 and S3-compatible stores (AWS, SeaweedFS, MinIO, Ceph...) through s3fs.

Objects are atomic on S3: an upload goes straight to its final key (a single PUT, or a
multipart upload that is invisible until completed), never through a temporary name that
would then be copied.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import hashlib
import http.client
import inspect
import logging
import os
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlsplit

from pydantic import Field, model_validator

from skyframe.backends import (
    CLOSE_TIMEOUT,
    BackendOptions,
    Endpoint,
    bucket_and_root,
    close_quietly,
    exception_chain,
    one_line,
    unreachable,
)
from skyframe.backends.sigv4 import SigV4Signer, host_of
from skyframe.deps import internal
from skyframe.errors import SinkRefusedError, SinkUnavailableError
from skyframe.units import Duration, Size

log = logging.getLogger(__name__)

MIB = 1024 * 1024
MAX_PARTS = 10_000

_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ExpiredToken",
    "InvalidToken",
    "AuthorizationHeaderMalformed",
    "InvalidClientTokenId",
}
_BUSY_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"}


class S3Options(BackendOptions):
    """Options of an ``s3://bucket/prefix`` sink."""

    endpoint_url: str | None = Field(None, description="S3-compatible server; AWS when unset")
    key: str | None = Field(None, description="access key id (default: AWS_ACCESS_KEY_ID...)")
    secret: str | None = Field(None, description="secret access key")
    token: str | None = Field(None, description="session token, for temporary credentials")
    region: str | None = Field(None, description="region; us-east-1 with an endpoint_url")
    anon: bool = Field(False, description="unsigned requests (public buckets)")
    timeout: Duration = Field(60.0, gt=0, description="seconds without an answer from the server")
    part_size: Size = Field(
        8 * MIB, ge=5 * MIB, le=5 * 1024 * MIB, description="multipart part size"
    )
    part_concurrency: int = Field(3, ge=1, le=32, description="parts of one file sent at once")
    profile: str | None = Field(
        None, description="profile of the AWS shared credentials and config files"
    )
    requester_pays: bool = Field(False, description="the bucket owner bills the requester")
    client_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="botocore client arguments, as s3fs's client_kwargs (region_name, verify...)",
    )
    config_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="botocore Config options, as s3fs's config_kwargs (over skyframe's own)",
    )
    s3_additional_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "parameters of every upload, as s3fs's: ServerSideEncryption, SSEKMSKeyId, "
            "StorageClass, ACL..."
        ),
    )

    @model_validator(mode="after")
    def _pairs(self) -> S3Options:
        if (self.key is None) != (self.secret is None):
            raise ValueError("give both key and secret, or neither (to use the environment)")
        if self.profile is not None and self.key is not None:
            raise ValueError("give key and secret, or a profile, not both")
        return self

    @model_validator(mode="after")
    def _one_place_each(self) -> S3Options:
        # s3fs users write the region and endpoint in client_kwargs: take them from there,
        # so that skyframe's own requests (the check, small files) use them too.
        for option, name in (("region", "region_name"), ("endpoint_url", "endpoint_url")):
            if name not in self.client_kwargs:
                continue
            given = self.client_kwargs[name]
            if getattr(self, option) not in (None, given):
                raise ValueError(f"{option} and client_kwargs.{name} differ: give one")
            object.__setattr__(self, option, given)
        unknown = sorted(set(self.s3_additional_kwargs) - UPLOAD_PARAMETERS)
        if unknown:
            raise ValueError(f"s3_additional_kwargs: {_unknown_parameter(unknown[0])}")
        return self

    @property
    def plain(self) -> bool:
        """True when no option changes what a PUT sends or how it is sent beyond what the
        light client does (signed PUT, HEAD and DELETE with the credentials)."""
        extra = set(self.client_kwargs) - {"region_name", "endpoint_url"}
        return not (extra or self.config_kwargs or self.s3_additional_kwargs) and not (
            self.requester_pays
        )

    def part_size_for(self, size: int) -> int:
        """The part size for a file: the configured one, raised to stay within 10,000 parts."""
        part = self.part_size
        while size > part * MAX_PARTS:
            part *= 2
        return part


#: what s3_additional_kwargs may hold: parameters of PutObject and CreateMultipartUpload that
#: shape the stored object (a misspelt one would be dropped by s3fs without a word)
UPLOAD_PARAMETERS = frozenset(
    {
        "ACL",
        "BucketKeyEnabled",
        "CacheControl",
        "ChecksumAlgorithm",
        "ContentDisposition",
        "ContentEncoding",
        "ContentLanguage",
        "ContentType",
        "ExpectedBucketOwner",
        "Expires",
        "GrantFullControl",
        "GrantRead",
        "GrantReadACP",
        "GrantWriteACP",
        "ObjectLockLegalHoldStatus",
        "ObjectLockMode",
        "ObjectLockRetainUntilDate",
        "SSECustomerAlgorithm",
        "SSECustomerKey",
        "SSEKMSEncryptionContext",
        "SSEKMSKeyId",
        "ServerSideEncryption",
        "StorageClass",
        "Tagging",
        "WebsiteRedirectLocation",
    }
)


def _unknown_parameter(name: str) -> str:
    close = difflib.get_close_matches(name, UPLOAD_PARAMETERS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    known = ", ".join(sorted(UPLOAD_PARAMETERS))
    return f"unknown upload parameter {name!r} ({hint}expected one of: {known})"


def _without_expect_continue(request: Any, **kwargs: Any) -> None:
    """botocore's ``before-send`` handler that drops ``Expect: 100-continue``.

    botocore asks for it on every PUT of a part or object; its own HTTP client sends the body
    anyway after a second without an answer, but aiohttp (under aiobotocore) waits for the
    "100 Continue" forever, outside any read timeout: a server that accepts the connection
    and then answers nothing (hung, or behind a proxy that speaks HTTP/1.0) hung the upload.
    Without it the body goes at once, and the read timeout applies to the answer.
    """
    if "Expect" in request.headers:
        del request.headers["Expect"]


def _session(profile: str | None = None) -> Any:
    """The aiobotocore session s3fs builds its clients from, with the handler above."""
    from aiobotocore.session import AioSession

    session = AioSession(profile=profile)
    session.register("before-send.s3", _without_expect_continue)
    return session


def signs_payload(settings: S3Options) -> bool:
    """True when every request's payload is signed (its sha256 is checked by the server):
    signed requests to a plain-HTTP endpoint, where botocore always signs the payload."""
    endpoint_url = settings.endpoint_url or ""
    return endpoint_url.startswith("http://") and not settings.anon


def endpoint(url: str, options: dict[str, Any], base_dir: Path) -> Endpoint:
    """Check the options of an S3 sink; the connection opens on first use."""
    settings = S3Options.model_validate(options)
    bucket, root = bucket_and_root(url, "credentials and the server (key, secret, endpoint_url)")

    def connect() -> Any:
        import s3fs

        client_kwargs: dict[str, Any] = dict(settings.client_kwargs)
        client_kwargs.pop("endpoint_url", None)  # given to s3fs on its own below
        region = settings.region or ("us-east-1" if settings.endpoint_url else None)
        if region:
            client_kwargs["region_name"] = region
        config: dict[str, Any] = {
            "connect_timeout": min(settings.timeout, 10.0),
            "read_timeout": settings.timeout,
            "retries": {"max_attempts": 2, "mode": "standard"},
        }
        if signs_payload(settings):
            # botocore adds a CRC32 of every part by default; over plain HTTP each signed
            # request already carries its payload's sha256, which the server checks.
            config["request_checksum_calculation"] = "when_required"
        config.update(settings.config_kwargs)
        fs = s3fs.S3FileSystem(
            session=_session(settings.profile),
            endpoint_url=settings.endpoint_url,
            key=settings.key,
            secret=settings.secret,
            token=settings.token,
            anon=settings.anon,
            requester_pays=settings.requester_pays,
            client_kwargs=client_kwargs,
            config_kwargs=config,
            s3_additional_kwargs=dict(settings.s3_additional_kwargs),
            skip_instance_cache=True,
        )
        fs.retries = 3  # s3fs's own retry loop (a class attribute, not an argument)
        return fs

    def classify(exc: BaseException) -> SinkUnavailableError | SinkRefusedError | None:
        return classify_error(exc, bucket)

    def explain(fs: Any, error: SinkRefusedError) -> SinkRefusedError:
        # Some servers answer a write to a missing bucket with AccessDenied; HEAD tells.
        if "access denied" in str(error):
            try:
                fs.call_s3("head_bucket", Bucket=bucket)
            except FileNotFoundError:
                return SinkRefusedError(f"bucket {bucket!r} does not exist")
        return error

    return Endpoint(
        "s3",
        root,
        connect,
        classify,
        close=close,
        explain=explain,
        object_store=True,
        default_concurrency=16,
        hashes_from=settings.part_size,  # a multipart upload names the digest when it begins
        settings=settings,
        direct=direct_client(settings),
    )


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
    :class:`~skyframe.backends.sigv4.SigV4Signer` (SigV4, signed payload: a PUT's payload hash
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
        try:
            session = self._open()
            async with session.put(url, data=body, headers=headers, proxy=self._proxy) as response:
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

    def probe(self, path: str, payload: bytes) -> float | None:
        """See :meth:`skyframe.backends.DirectClient.probe`; ``path`` is ``bucket/key``.

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


def close(fs: Any) -> None:
    """Close the client's HTTP connections now rather than at garbage collection."""
    if getattr(fs, "session", None) is None:  # never connected (s3fs sets it on connecting)
        return

    async def close_client() -> None:
        await fs.s3.close()

    close_quietly(fs, close_client)


def call(fs: Any, method: str, **kwargs: Any) -> Coroutine[Any, Any, Any]:
    """One S3 request through s3fs (its retries and error translation), to await on fsspec's
    event loop: s3fs's coroutine where it has one, else its public blocking ``call_s3`` in a
    worker thread."""
    coroutine = internal(fs, "_call_s3", "s3fs", "calling call_s3 in a thread")
    if coroutine is not None and inspect.iscoroutinefunction(coroutine):
        return cast("Coroutine[Any, Any, Any]", coroutine(method, **kwargs))
    return asyncio.to_thread(fs.call_s3, method, **kwargs)


def classify_error(
    exc: BaseException, bucket: str
) -> SinkUnavailableError | SinkRefusedError | None:
    """Map botocore and s3fs errors to sink errors (None: an error about this one file)."""
    from botocore.exceptions import (
        ClientError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from fsspec.exceptions import FSTimeoutError

    for item in exception_chain(exc):
        if isinstance(item, NoCredentialsError | PartialCredentialsError):
            return SinkRefusedError(
                "no credentials: set the key and secret options (from ${VAR}) or "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        if isinstance(item, ClientError):
            error = item.response.get("Error", {})
            code = str(error.get("Code", ""))
            message = " ".join(str(error.get("Message", "")).split()) or code
            status = item.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code == "NoSuchBucket":
                return SinkRefusedError(f"bucket {bucket!r} does not exist")
            if code in _AUTH_CODES or status in (401, 403):
                return SinkRefusedError(f"access denied ({code}): {message}")
            if code in _BUSY_CODES or (isinstance(status, int) and status >= 500):
                return SinkUnavailableError(f"server error ({code or status}): {message}")
            return None
    if unreachable(exc, (HTTPClientError, BotoConnectionError, FSTimeoutError)):
        return SinkUnavailableError(f"cannot reach the server: {one_line(exc)}")
    if isinstance(exc, PermissionError):
        return SinkRefusedError(f"access denied: {one_line(exc)}")
    return None
