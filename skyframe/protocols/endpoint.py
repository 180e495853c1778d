"""What a protocol gives a sink: the :class:`Endpoint`, and what protocols share to build one.

A protocol's ``endpoint(url, options, base_dir)`` (registered through
:class:`skyframe.protocols.Protocol`) checks the sink's options (raising
:class:`pydantic.ValidationError` or ``ValueError``) without connecting, and returns an
:class:`Endpoint`: the connection is opened lazily, on first use, so a daemon started while the
link is down still starts, queues, and connects once the server is back. Here too: the base of
every protocol's options model, the bucket of an object store's URL, and closing a connection
quietly. Reading a protocol's errors is :mod:`skyframe.protocols.classify`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from fsspec.spec import AbstractFileSystem
from pydantic import BaseModel, ConfigDict

from skyframe.errors import SinkRefusedError, SinkUnavailableError


class BackendOptions(BaseModel):
    """Base of every backend's options model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Classifier = Callable[[BaseException], "SinkUnavailableError | SinkRefusedError | None"]


class DirectClient(Protocol):
    """A backend's own light client for its most common requests, beside the fsspec
    filesystem (S3: signed PUT, HEAD and DELETE without loading botocore).

    Whatever it cannot do is done again through the filesystem, whose errors are the ones
    classified and reported; the one exception is a server where nothing answers.
    """

    def probe(
        self, path: str, payload: bytes, written: Callable[[], None] | None = None
    ) -> float | None:
        """Write ``payload`` at ``path``, check its size, delete it: the seconds it took to
        connect when all three succeeded; None when it could not tell (the regular probe then
        runs and says what is wrong). Raises ConnectionError when nothing answers at all.
        Calls ``written`` as soon as the server has stored the payload."""
        ...

    def close(self) -> None:
        """Close its connections (it opens new ones if used again)."""
        ...


@dataclass
class Endpoint:
    """What a sink needs from its backend."""

    protocol: str  #: canonical protocol name: s3, gcs, sftp, file, memory, ...
    root: str  #: root path inside the filesystem (bucket/prefix, absolute folder...)
    connect: Callable[[], AbstractFileSystem]  #: a new, uncached filesystem instance
    classify: Classifier = field(default=lambda exc: None)  #: backend errors -> sink errors
    remote: bool = True  #: False for local folders and memory (nothing to reach)
    object_store: bool = False  #: atomic objects, no folders (S3, GCS)
    default_concurrency: int = 4  #: files sent at once when the sink does not say
    #: files of at least this size are hashed before their upload begins (object stores that
    #: name the digest then); None: the digest is computed while sending
    hashes_from: int | None = None
    close: Callable[[Any], None] = field(default=lambda fs: None)  #: close a connection now
    #: a closer look at a refusal, with the connection (S3: is it the bucket that is missing?)
    explain: Callable[[Any, SinkRefusedError], SinkRefusedError] = field(
        default=lambda fs, error: error
    )
    settings: BackendOptions | None = None  #: the checked options, for transfer plugins
    #: the backend's light client, if it has one; the protocol's transfer plugin knows its type
    direct: DirectClient | None = None
    warnings: list[str] = field(default_factory=list)  #: to log once when the sink is used
    #: refuses remote names the target cannot hold (a folder on Windows): UnsafePathError
    check_name: Callable[[str], None] | None = None
    #: creates a folder and its parents on a connection in fewer round trips than the
    #: filesystem's ``makedirs`` (SFTP); None: ``makedirs(folder, exist_ok=True)``
    make_folder: Callable[[Any, str], None] | None = None
    #: the sinks' check on a connection in fewer round trips than the filesystem's calls
    #: (SFTP): ``write_check(fs, path, payload, written)`` writes ``payload`` at ``path``
    #: (making its folder if it is missing), calls ``written`` (if given) once it is stored,
    #: and returns the size the server then reports (None: no file there), removing the file
    #: in any case; None: the folder is made, then the filesystem's ``pipe_file``, ``size``
    #: and ``rm``
    write_check: Callable[[Any, str, bytes, Callable[[], None] | None], int | None] | None = None
    #: what only the protocol's transfer plugin knows the type of (SFTP: how OpenSSH's own
    #: client reaches the sink, for the rest of a large upload on a fast link)
    extras: object | None = None


def bucket_and_root(url: str, hint: str) -> tuple[str, str]:
    """``scheme://bucket/prefix`` -> (bucket, "bucket/prefix"); ``hint`` names the options
    that hold what must not be in the URL (credentials, server)."""
    parts = urlsplit(url)
    bucket = parts.netloc
    if not bucket:
        raise ValueError(f"{url}: no bucket in the URL (expected {parts.scheme}://bucket/prefix)")
    if "@" in bucket or ":" in bucket:
        raise ValueError(f"{parts.scheme}://{bucket}: put {hint} in options, not in the URL")
    prefix = parts.path.strip("/")
    if any(segment in (".", "..") for segment in prefix.split("/")):
        # Keys hold them as they are, while an HTTP library may resolve them in the request's
        # path: the objects could land outside the prefix, or in another bucket.
        raise ValueError(f"{url}: no '.' or '..' in an object store's prefix: write it out")
    return bucket, f"{bucket}/{prefix}" if prefix else bucket


CLOSE_TIMEOUT = 5.0  #: seconds to wait for a connection to close


def close_quietly(fs: Any, closer: Callable[[], Any]) -> None:
    """Run ``closer`` (a coroutine function) on the filesystem's event loop, ignoring errors:
    the connection may already be dead, which is often why it is being closed."""
    from fsspec.asyn import sync

    loop = getattr(fs, "loop", None)
    if loop is None or not loop.is_running():
        return
    with contextlib.suppress(Exception):
        sync(loop, closer, timeout=CLOSE_TIMEOUT)
