"""The S3 protocol's plugin: it registers ``s3://`` (and ``s3a://``) and delivers to such
sinks, one file at a time or small files in batches."""

from __future__ import annotations

from collections.abc import Callable

from skyframe.markers import hookimpl
from skyframe.protocols import Protocol
from skyframe.protocols.s3 import backend, transfer
from skyframe.storage import BatchTransfer, Sink, TransferRequest, TransferResult


@hookimpl
def skyframe_register_protocols(register: Callable[[Protocol], None]) -> None:
    """S3 and S3-compatible stores."""
    register(
        Protocol(
            "s3",
            ("s3", "s3a"),
            backend.endpoint,
            backend.S3Options,
            origin=__name__,
            cancel_upload=transfer.cancel_upload,
            describe_upload=transfer.describe_upload,
            remote_sha256=transfer.remote_sha256,
        )
    )


@hookimpl
def skyframe_transfer(request: TransferRequest) -> TransferResult | None:
    """Upload to an ``s3://`` sink."""
    if request.sink.protocol != "s3":
        return None
    return transfer.upload(request)


@hookimpl
def skyframe_transfer_batch(sink: Sink) -> BatchTransfer | None:
    """Small files to an ``s3://`` sink: concurrent PUTs on fsspec's event loop (s3fs's)."""
    if sink.protocol != "s3":
        return None
    return transfer.batch(sink)
