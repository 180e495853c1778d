"""The SFTP protocol's plugin: it registers ``sftp://`` (and ``ssh://``) and delivers to
such sinks."""

from __future__ import annotations

from collections.abc import Callable

from skyframe.markers import hookimpl
from skyframe.protocols import Protocol
from skyframe.protocols.sftp import backend, batches, transfer
from skyframe.storage import BatchTransfer, Sink, TransferRequest, TransferResult


@hookimpl
def skyframe_register_protocols(register: Callable[[Protocol], None]) -> None:
    """SFTP servers (OpenSSH and others), host keys verified."""
    register(
        Protocol(
            "sftp",
            ("sftp", "ssh"),
            backend.endpoint,
            backend.SFTPOptions,
            origin=__name__,
            cancel_upload=transfer.cancel_upload,
            describe_upload=transfer.describe_upload,
            remote_sha256=transfer.remote_sha256,
        )
    )


@hookimpl
def skyframe_transfer(request: TransferRequest) -> TransferResult | None:
    """Upload to an ``sftp://`` sink."""
    if request.sink.protocol != "sftp":
        return None
    return transfer.upload(request)


@hookimpl
def skyframe_transfer_batch(sink: Sink) -> BatchTransfer | None:
    """Small files to an ``sftp://`` sink: pipelined on the connection's own SFTP session."""
    if sink.protocol != "sftp":
        return None
    return batches.batch(sink)
