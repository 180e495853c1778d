"""The generic protocols' plugin: it registers local folders (``file://``, ``local://`` and
plain paths) and any other protocol fsspec knows, and delivers to every sink no other
transfer plugin takes (``trylast``)."""

from __future__ import annotations

from collections.abc import Callable

from skyframe.markers import hookimpl
from skyframe.protocols import ANY_FSSPEC, Protocol
from skyframe.protocols.generic import any_fsspec, local, transfer
from skyframe.storage import TransferRequest, TransferResult


@hookimpl
def skyframe_register_protocols(register: Callable[[Protocol], None]) -> None:
    """Local folders, and any other protocol fsspec knows (through its own package)."""
    register(Protocol("file", ("file", "local"), local.endpoint, origin=__name__))
    register(Protocol("fsspec", (ANY_FSSPEC,), any_fsspec.endpoint, origin=__name__))


@hookimpl(trylast=True)
def skyframe_transfer(request: TransferRequest) -> TransferResult:
    """Stream the file to a hidden temporary name, verify its size, then rename it into place."""
    return transfer.upload(request)
