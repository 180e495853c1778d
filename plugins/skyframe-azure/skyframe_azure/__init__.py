"""Azure Blob Storage for skyframe: the ``az://`` protocol, as a plugin.

skyframe loads it through its ``skyframe`` entry point. It registers the protocol (URL
schemes, options, connection, errors, the cancelling of interrupted uploads) through
``skyframe_register_protocols`` and delivers through ``skyframe_transfer``, for sinks of its
own protocol only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from skyframe import TransferRequest, TransferResult, hookimpl
from skyframe.protocols import Protocol
from skyframe_azure import backend, transfer


def _describe(record: dict[str, Any]) -> str:
    return f"Azure block blob, staged blocks of {record.get('block_size', 0)} bytes"


def _cancel(fs: Any, record: dict[str, Any]) -> None:
    """Nothing to do on the server: Azure discards uncommitted blocks after a week."""


@hookimpl
def skyframe_register_protocols(register: Callable[[Protocol], None]) -> None:
    """Azure Blob Storage (and Azurite)."""
    register(
        Protocol(
            "azure",
            ("az", "azure"),
            backend.endpoint,
            backend.AzureOptions,
            origin=__name__,
            cancel_upload=_cancel,
            describe_upload=_describe,
        )
    )


@hookimpl
def skyframe_transfer(request: TransferRequest) -> TransferResult | None:
    """Upload to an ``az://`` sink."""
    if request.sink.protocol != "azure":
        return None
    return transfer.upload(request)
