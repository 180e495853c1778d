"""S3 and S3-compatible stores (AWS, SeaweedFS, MinIO, Ceph...) through s3fs: the sink's
options, the connection, one request through s3fs, and what S3's errors mean.

Objects are atomic on S3: an upload goes straight to its final key (a single PUT, or a
multipart upload that is invisible until completed), never through a temporary name that
would then be copied. The light client for small objects is in
:mod:`skyframe.protocols.s3.direct`; the uploads are in :mod:`skyframe.protocols.s3.transfer`.
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, cast

from pydantic import Field, field_validator, model_validator

from skyframe.deps import internal
from skyframe.errors import SinkRefusedError, SinkUnavailableError
from skyframe.protocols.classify import exception_chain, one_line, unreachable
from skyframe.protocols.endpoint import BackendOptions, Endpoint, bucket_and_root, close_quietly
from skyframe.protocols.s3.direct import direct_client
from skyframe.units import Duration, Size

MIB = 1024 * 1024
MAX_PARTS = 10_000
MIN_PART = 5 * MIB  #: S3's smallest part (every part but the last)
#: On a slow link a part is sized to about this many seconds of it (a cut loses the parts in
#: flight), never below :data:`MIN_PART` nor above the configured ``part_size``.
PART_SECONDS = 1.0

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
        8 * MIB,
        ge=5 * MIB,
        le=5 * 1024 * MIB,
        description="multipart part size (the largest: smaller on a slow link)",
    )
    part_concurrency: int = Field(
        3, ge=1, le=32, description="parts of one file in flight (the most: fewer on a slow link)"
    )
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

    @field_validator("endpoint_url", "region", "token", "profile", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `endpoint_url: ${S3_ENDPOINT:-}` with the variable unset means AWS, not a server at "".
        return None if isinstance(value, str) and not value.strip() else value

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
        _check_botocore_arguments(self.client_kwargs, self.config_kwargs)
        return self

    @property
    def plain(self) -> bool:
        """True when no option changes what a PUT sends or how it is sent beyond what the
        light client does (signed PUT, HEAD and DELETE with the credentials)."""
        extra = set(self.client_kwargs) - {"region_name", "endpoint_url"}
        return not (extra or self.config_kwargs or self.s3_additional_kwargs) and not (
            self.requester_pays
        )

    def part_size_for(self, size: int, rate: float | None = None) -> int:
        """The part size for a file: about :data:`PART_SECONDS` of the link at ``rate``
        (bytes/s; S3's 5 MiB while no rate is known), so that a cut loses little, within S3's
        5 MiB and the configured ``part_size``; raised to stay within 10,000 parts."""
        measured = MIN_PART if rate is None else -(-int(rate * PART_SECONDS) // MIB) * MIB
        part = min(self.part_size, max(MIN_PART, measured))
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


def _check_botocore_arguments(client: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuse a name botocore does not take (it would fail every connection, as a TypeError
    retried as if the link were down): checked against botocore's own, loaded only when
    these options are given."""
    extra = set(client) - {"region_name", "endpoint_url"}
    if not (extra or config):
        return
    import inspect

    import botocore.config
    import botocore.session

    for option, given, known in (
        (
            "client_kwargs",
            extra,
            set(inspect.signature(botocore.session.Session.create_client).parameters)
            - {"self", "service_name", "config"},
        ),
        ("config_kwargs", set(config), set(botocore.config.Config.OPTION_DEFAULTS)),
    ):
        for name in sorted(given - known):
            close = difflib.get_close_matches(name, known, n=1)
            hint = (
                f"did you mean {close[0]!r}?" if close else f"it takes: {', '.join(sorted(known))}"
            )
            raise ValueError(f"{option}: botocore takes no {name!r} ({hint})")


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
    """The aiobotocore session s3fs builds its clients from, with the handler above, its
    S3 models loaded already (see :func:`_warm_up`)."""
    from aiobotocore.session import AioSession

    session = AioSession(profile=profile)
    session.register("before-send.s3", _without_expect_continue)
    _warm_up(session)
    return session


def _warm_up(session: Any) -> None:
    """Load the S3 service's models into the session's caches, in the calling thread.

    s3fs creates its client on fsspec's event loop, which also carries every other transfer
    (the small files' PUTs, the parts in flight): reading and parsing botocore's JSON models
    there held the loop, and the link stood idle meanwhile. Loaded here first (``connect``
    runs in the thread that first needs the filesystem, never on the loop), the client's
    creation on the loop finds them cached. ``warm_up_loader_caches`` is aiobotocore's
    (3.7 and later); an older one creates its client as before.
    """
    warm_up = getattr(session, "warm_up_loader_caches", None)
    if warm_up is not None:
        warm_up("s3")


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
        # A multipart upload names the digest when it begins. A file under part_size that
        # goes multipart on a slow link is hashed then: ahead of time, a fast link's single
        # PUT would read and hash it twice.
        hashes_from=settings.part_size,
        settings=settings,
        direct=direct_client(settings),
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
