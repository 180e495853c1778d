"""Any other fsspec protocol (memory, webdav, azure...): options go to fsspec unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

from skyframe.errors import SinkRefusedError, SinkUnavailableError
from skyframe.protocols.classify import one_line, unreachable
from skyframe.protocols.endpoint import Endpoint


def endpoint(url: str, options: dict[str, Any], base_dir: Path) -> Endpoint:
    """Resolve the protocol's filesystem class now (so a missing backend is a config error)."""
    protocol, _ = fsspec.core.split_protocol(url)
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ValueError(f"unknown protocol {protocol!r}") from None
    except ImportError as exc:
        raise ImportError(f"the fsspec backend for {protocol!r} is not installed: {exc}") from None
    root = str(cls._strip_protocol(url)).rstrip("/")
    kwargs = {**cls._get_kwargs_from_urls(url), **options}
    name = cls.protocol if isinstance(cls.protocol, str) else cls.protocol[0]

    def connect() -> AbstractFileSystem:
        fs: AbstractFileSystem = cls(**kwargs)
        return fs

    def classify(exc: BaseException) -> SinkUnavailableError | SinkRefusedError | None:
        if unreachable(exc):
            return SinkUnavailableError(f"cannot reach the server: {one_line(exc)}")
        return None

    return Endpoint(str(name), root, connect, classify, remote=name != "memory")
