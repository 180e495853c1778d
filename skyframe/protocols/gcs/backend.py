"""Google Cloud Storage (and its emulators) through gcsfs: the sink's options, the
connection, and what GCS's errors mean.

Objects are atomic on GCS: a simple upload, or a resumable session that is finalized by its
last chunk, publishes the whole object at once under its final name.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from skyframe.errors import SinkRefusedError, SinkUnavailableError
from skyframe.protocols.classify import exception_chain, one_line, unreachable
from skyframe.protocols.endpoint import BackendOptions, Endpoint, bucket_and_root, close_quietly
from skyframe.quiet import ignored_warnings
from skyframe.units import Duration, Size, expand_home

CHUNK_QUANTUM = 256 * 1024  #: resumable chunks must be multiples of this


class GCSOptions(BackendOptions):
    """Options of a ``gcs://bucket/prefix`` (or ``gs://``) sink."""

    token: str | None = Field(
        None,
        description="service-account JSON file, 'google_default', 'cloud' or 'anon'",
    )
    project: str | None = Field(None, description="project id (for listing; optional)")
    endpoint_url: str | None = Field(None, description="an emulator or private endpoint")
    timeout: Duration = Field(60.0, gt=0, description="seconds for one request")
    chunk_size: Size = Field(
        16 * 1024 * 1024, ge=CHUNK_QUANTUM, description="resumable upload chunk size"
    )
    status_query: bool = Field(
        True,
        description=(
            "before resuming an upload, ask the server how much it holds; turn off for "
            "emulators that publish the object on that query (fake-gcs-server)"
        ),
    )

    @field_validator("chunk_size")
    @classmethod
    def _quantum(cls, value: int) -> int:
        if value % CHUNK_QUANTUM:
            raise ValueError("chunk_size must be a multiple of 256 KiB")
        return value


def endpoint(url: str, options: dict[str, Any], base_dir: Path) -> Endpoint:
    """Check the options of a GCS sink; the connection opens on first use."""
    settings = GCSOptions.model_validate(options)
    bucket, root = bucket_and_root(url, "credentials")
    token = settings.token
    if token and token not in ("google_default", "cloud", "anon", "browser", "cache"):
        path = (base_dir / expand_home(token)).resolve()
        if not path.is_file():
            raise ValueError(f"token: credentials file {path} does not exist")
        token = str(path)

    def connect() -> Any:
        # gcsfs's experimental zonal-bucket support asks a gRPC service for every bucket
        # (emulators lack it and each call then waits 60 s); opt in by setting it yourself.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        import gcsfs

        # gcsfs logs a traceback for errors it hands back to us: we report them ourselves.
        logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
        # Uploads need no project: only listing and creating buckets do.
        with ignored_warnings(UserWarning, "GCS project not set"):
            return gcsfs.GCSFileSystem(
                token=token,
                project=settings.project,
                endpoint_url=settings.endpoint_url,
                requests_timeout=settings.timeout,
                skip_instance_cache=True,
            )

    def classify(exc: BaseException) -> SinkUnavailableError | SinkRefusedError | None:
        return classify_error(exc, bucket)

    return Endpoint(
        "gcs",
        root,
        connect,
        classify,
        close=close,
        object_store=True,
        default_concurrency=16,
        hashes_from=settings.chunk_size,  # a resumable session names the digest when it opens
        settings=settings,
    )


def close(fs: Any) -> None:
    """Close the HTTP session now rather than at garbage collection."""
    session = fs.session  # None until gcsfs connects
    if session is not None and not session.closed:
        close_quietly(fs, session.close)


def classify_error(
    exc: BaseException, bucket: str
) -> SinkUnavailableError | SinkRefusedError | None:
    """Map gcsfs, aiohttp and google-auth errors to sink errors."""
    import aiohttp
    from fsspec.exceptions import FSTimeoutError

    for item in exception_chain(exc):
        name = type(item).__name__
        module = type(item).__module__
        if module.startswith("google.auth") or name in ("DefaultCredentialsError", "RefreshError"):
            return SinkRefusedError(f"credentials refused: {one_line(item)}")
        code = getattr(item, "code", None)
        if name == "HttpError" and isinstance(code, int):
            if code in (401, 403):
                return SinkRefusedError(f"access denied: {one_line(item)}")
            if code >= 500 or code == 429:
                return SinkUnavailableError(f"server error: {one_line(item)}")
            return None
        if isinstance(item, OSError) and str(item).startswith("Forbidden"):
            return SinkRefusedError(f"access denied: {one_line(item)}")
        if name == "ProxyError":
            return SinkUnavailableError("server error: bad gateway")
    if unreachable(
        exc, (aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError, FSTimeoutError)
    ):
        return SinkUnavailableError(f"cannot reach the server: {one_line(exc)}")
    return None
