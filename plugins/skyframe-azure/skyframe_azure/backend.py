"""Azure Blob Storage sinks: options, the connection (adlfs), the upload client
(azure-storage-blob) and what Azure's errors mean to skyframe.

Blobs are atomic: a block blob appears when its block list is committed, whole, under its
final name; so uploads never go through a temporary name.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from skyframe.errors import SinkRefusedError, SinkUnavailableError
from skyframe.protocols.classify import exception_chain, one_line, unreachable
from skyframe.protocols.endpoint import BackendOptions, Endpoint, close_quietly
from skyframe.units import Duration, Size

MIB = 1024 * 1024
MAX_BLOCKS = 50_000  #: blocks one blob may have


class AzureOptions(BackendOptions):
    """Options of an ``az://container/prefix`` sink; the names are adlfs's."""

    connection_string: str | None = Field(
        None, description="the storage account's connection string (from ${VAR})"
    )
    account_name: str | None = Field(None, description="storage account name")
    account_key: str | None = Field(None, description="storage account key (from ${VAR})")
    sas_token: str | None = Field(None, description="a shared access signature (from ${VAR})")
    timeout: Duration = Field(60.0, gt=0, description="seconds without an answer")
    block_size: Size = Field(
        8 * MIB, ge=1 * MIB, le=4000 * MIB, description="size of the blocks of a large file"
    )
    block_concurrency: int = Field(4, ge=1, le=32, description="blocks of one file in flight")

    @model_validator(mode="after")
    def _credentials(self) -> AzureOptions:
        if self.connection_string is None and self.account_name is None:
            raise ValueError("give connection_string, or account_name with a key or token")
        if self.connection_string is not None and self.account_name is not None:
            raise ValueError("give connection_string or account_name, not both")
        return self

    def block_size_for(self, size: int) -> int:
        """The block size for a file: the configured one, raised to stay within 50,000."""
        block = self.block_size
        while size > block * MAX_BLOCKS:
            block *= 2
        return block


def container_and_root(url: str) -> tuple[str, str]:
    """``az://container/prefix`` -> (container, "container/prefix")."""
    parts = urlsplit(url)
    container = parts.netloc
    if not container or "@" in container or ":" in container:
        raise ValueError(f"{url}: expected az://container/prefix (credentials go in options)")
    prefix = parts.path.strip("/")
    return container, f"{container}/{prefix}" if prefix else container


def endpoint(url: str, options: dict[str, Any], base_dir: Path) -> Endpoint:
    """Check an Azure sink's URL and options; the connection opens on first use."""
    settings = AzureOptions.model_validate(options)
    container, root = container_and_root(url)

    def connect() -> Any:
        import adlfs

        credentials = {
            name: value
            for name in ("connection_string", "account_name", "account_key", "sas_token")
            if (value := getattr(settings, name)) is not None
        }
        return adlfs.AzureBlobFileSystem(
            **credentials, timeout=int(settings.timeout), skip_instance_cache=True
        )

    def classify(exc: BaseException) -> SinkUnavailableError | SinkRefusedError | None:
        return classify_error(exc, container)

    return Endpoint(
        "azure",
        root,
        connect,
        classify,
        close=close,
        object_store=True,
        default_concurrency=16,
        hashes_from=settings.block_size,  # the digest goes in the metadata of the commit
        settings=settings,
    )


_clients: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def blob_client(fs: Any, settings: AzureOptions, container: str, blob: str) -> Any:
    """A (blocking) client for one blob, on a service client kept per connection: what the
    uploads use, through azure-storage-blob's public API."""
    service = _clients.get(fs)
    if service is None:
        from azure.storage.blob import BlobServiceClient, ExponentialRetry

        timeouts: dict[str, Any] = {
            "connection_timeout": min(settings.timeout, 10.0),
            "read_timeout": settings.timeout,
            # One quick retry in the SDK; beyond that, skyframe's own backoff and the sink's
            # health take over (the SDK's default waits 15 s, then 45 s, silently).
            "retry_policy": ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=1),
        }
        if settings.connection_string is not None:
            service = BlobServiceClient.from_connection_string(
                settings.connection_string, **timeouts
            )
        else:
            account_url = f"https://{settings.account_name}.blob.core.windows.net"
            credential = settings.account_key or settings.sas_token
            service = BlobServiceClient(account_url, credential=credential, **timeouts)
        _clients[fs] = service
    return service.get_blob_client(container, blob)


def close(fs: Any) -> None:
    """Close the connection's HTTP sessions now (adlfs's, and the uploads' client)."""
    service = _clients.pop(fs, None)
    if service is not None:
        service.close()
    client = getattr(fs, "service_client", None)  # adlfs's async client, once connected
    if client is not None:
        close_quietly(fs, client.close)


_AUTH_CODES = {"AuthenticationFailed", "AuthorizationFailure", "InvalidAuthenticationInfo"}


def classify_error(
    exc: BaseException, container: str
) -> SinkUnavailableError | SinkRefusedError | None:
    """Map azure-core errors to sink errors (None: an error about this one file)."""
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ServiceRequestError,
        ServiceResponseError,
    )

    for item in exception_chain(exc):
        if isinstance(item, ClientAuthenticationError):
            return SinkRefusedError(f"access denied: {one_line(item)}")
        if isinstance(item, HttpResponseError):
            code = str(getattr(item, "error_code", "") or "")
            status = item.status_code or 0
            if code == "ContainerNotFound":
                return SinkRefusedError(f"container {container!r} does not exist")
            if code in _AUTH_CODES or status in (401, 403):
                return SinkRefusedError(f"access denied ({code or status})")
            if status >= 500 or status == 429:
                return SinkUnavailableError(f"server error ({code or status})")
            return None
    if unreachable(exc, (ServiceRequestError, ServiceResponseError)):
        return SinkUnavailableError(f"cannot reach the server: {one_line(exc)}")
    return None
