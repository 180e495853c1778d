"""The GCS protocol's plugin: it registers ``gcs://`` (and ``gs://``) and delivers to such
sinks, one file at a time or small files in batches."""

from __future__ import annotations

from collections.abc import Callable

from skyframe.markers import hookimpl
from skyframe.protocols import Protocol
from skyframe.protocols.gcs import backend, transfer
from skyframe.storage import BatchTransfer, Sink, TransferRequest, TransferResult


@hookimpl
def skyframe_register_protocols(register: Callable[[Protocol], None]) -> None:
    """Google Cloud Storage and its emulators."""
    register(
        Protocol(
            "gcs",
            ("gcs", "gs"),
            backend.endpoint,
            backend.GCSOptions,
            origin=__name__,
            cancel_upload=transfer.cancel_upload,
            describe_upload=transfer.describe_upload,
            remote_sha256=transfer.remote_sha256,
        )
    )


@hookimpl
def skyframe_transfer(request: TransferRequest) -> TransferResult | None:
    """Upload to a ``gcs://`` sink."""
    if request.sink.protocol != "gcs":
        return None
    return transfer.upload(request)


@hookimpl
def skyframe_transfer_batch(sink: Sink) -> BatchTransfer | None:
    """Small files to a ``gcs://`` sink: concurrent single-request uploads on the event loop."""
    if sink.protocol != "gcs":
        return None
    return transfer.batch(sink)
