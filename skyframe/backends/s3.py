"""S3 and S3-compatible stores (AWS, SeaweedFS, MinIO, Ceph...) through s3fs.

Objects are atomic on S3: an upload goes straight to its final key (a single PUT, or a
multipart upload that is invisible until completed), never through a temporary name that
would then be copied.
"""

from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import Field, model_validator

from skyframe.backends import (
    BackendOptions,
    Endpoint,
    bucket_and_root,
    close_quietly,
    exception_chain,
    one_line,
    unreachable,
)
from skyframe.backends.sigv4 import SigV4Signer, host_of
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

    @model_validator(mode="after")
    def _pairs(self) -> S3Options:
        if (self.key is None) != (self.secret is None):
            raise ValueError("give both key and secret, or neither (to use the environment)")
        return self

    def part_size_for(self, size: int) -> int:
        """The part size for a file: the configured one, raised to stay within 10,000 parts."""
        part = self.part_size
        while size > part * MAX_PARTS:
            part *= 2
        return part


def endpoint(url: str, options: dict[str, Any], base_dir: Path) -> Endpoint:
    """Check the options of an S3 sink; the connection opens on first use."""
    settings = S3Options.model_validate(options)
    bucket, root = bucket_and_root(url, "credentials and the server (key, secret, endpoint_url)")

    def connect() -> Any:
        import s3fs

        client_kwargs: dict[str, Any] = {}
        region = settings.region or ("us-east-1" if settings.endpoint_url else None)
        if region:
            client_kwargs["region_name"] = region
        fs = s3fs.S3FileSystem(
            endpoint_url=settings.endpoint_url,
            key=settings.key,
            secret=settings.secret,
            token=settings.token,
            anon=settings.anon,
            client_kwargs=client_kwargs,
            config_kwargs={
                "connect_timeout": min(settings.timeout, 10.0),
                "read_timeout": settings.timeout,
                "retries": {"max_attempts": 2, "mode": "standard"},
            },
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
    )


class DirectPut:
    """A PUT of a small object that skips the generic request pipeline of aiobotocore.

    On a many-small-files run, most of the time goes into building each request (parameter
    validation, endpoint rules, user agent, event hooks, response parsing): about 2 ms of CPU
    per object. Here the request is signed with the client's own credentials and region by
    :class:`~skyframe.backends.sigv4.SigV4Signer` (SigV4, signed payload, the payload's
    sha256 being the one computed for the manifest) and sent on an aiohttp session of our
    own, on the filesystem's event loop. Anything but a 200 answer returns False, and the
    caller repeats the PUT through s3fs, whose errors (and retries) are then the ones
    reported; so does a client without credentials or with another signature version.

    Used with an ``endpoint_url`` (S3-compatible servers take path-style URLs); on AWS the
    regular path is used, as bucket addressing there depends on the bucket and region.
    """

    def __init__(self, fs: Any, endpoint_url: str) -> None:
        self.fs = fs
        self.base = endpoint_url.rstrip("/")
        self.host = host_of(endpoint_url)
        self._signer: SigV4Signer | None = None
        self._session: Any = None
        self.sent = 0  #: objects stored this way
        self.declined = 0  #: answers other than 200 (the caller then uses s3fs)

    async def put_async(
        self,
        client: Any,
        bucket: str,
        key: str,
        body: bytes,
        *,
        sha256: str,
        metadata: dict[str, str],
    ) -> bool:
        """The PUT of ``body`` (whose sha256 is ``sha256``), on the filesystem's event loop,
        with its connected ``client`` (``fs.s3``, taken outside the loop); True when the server
        stored the object."""
        import aiohttp
        from yarl import URL

        credentials = await self._credentials(client)
        if credentials is None:
            self.declined += 1
            return False  # s3fs's path reports the missing credentials
        if self._signer is None or self._signer.region != client.meta.region_name:
            self._signer = SigV4Signer(self.host, client.meta.region_name)
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        path = f"/{quote(bucket)}/{quote(key, safe='/~')}"
        headers = self._signer.sign(
            "PUT",
            path,
            {f"x-amz-meta-{name}": value for name, value in metadata.items()},
            sha256,
            access_key=credentials.access_key,
            secret_key=credentials.secret_key,
            token=credentials.token,
        )
        try:
            async with self._session.put(
                URL(self.base + path, encoded=True), data=body, headers=headers
            ) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        if status == 200:
            self.sent += 1
            return True
        self.declined += 1
        log.debug("direct PUT of %s/%s answered %s; sending it through s3fs", bucket, key, status)
        return False

    @staticmethod
    async def _credentials(client: Any) -> Any:
        """The client's current credentials (refreshed when they expire), or None when it has
        none or does not sign with SigV4."""
        if client.meta.config.signature_version not in (None, "s3v4", "v4"):
            return None
        if not client.meta.region_name:
            return None
        source = client._request_signer._credentials
        if source is None:
            return None
        frozen = await source.get_frozen_credentials()
        if frozen is None or not frozen.access_key or not frozen.secret_key:
            return None
        return frozen

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def close(fs: Any) -> None:
    """Close the client's HTTP connections now rather than at garbage collection."""
    direct = _DIRECT.pop(fs, None)
    if direct is not None:
        close_quietly(fs, direct.close)
    creator = getattr(fs, "_s3creator", None)
    if creator is None:
        return
    fs._s3creator = fs._s3 = None

    async def aexit() -> None:
        await creator.__aexit__(None, None, None)

    close_quietly(fs, aexit)


_DIRECT: weakref.WeakKeyDictionary[Any, DirectPut] = weakref.WeakKeyDictionary()
_DIRECT_LOCK = threading.Lock()


def direct_put(fs: Any, settings: S3Options) -> DirectPut | None:
    """The fast PUT for this connection, or None where only the regular path applies."""
    if settings.endpoint_url is None or settings.anon:
        return None
    with _DIRECT_LOCK:
        direct = _DIRECT.get(fs)
        if direct is None:
            direct = _DIRECT[fs] = DirectPut(fs, settings.endpoint_url)
        return direct


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
