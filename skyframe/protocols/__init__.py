"""The storage protocols plugins registered, and which one a sink URL takes.

A protocol plugin implements ``skyframe_register_protocols(register)`` and calls
``register(Protocol(...))``: its URL schemes, the ``endpoint`` function that checks a sink's
options and returns an :class:`~skyframe.protocols.endpoint.Endpoint` (connection, error
classification, close), and its options model. Its uploads go through the
``skyframe_transfer`` hooks, like every protocol's. The built-in protocols register the same
way, each from the ``plugin`` module of its own package here: ``s3``, ``gcs``, ``sftp``, and
``generic`` (local folders and any other fsspec protocol). What they share is in
``endpoint``, ``classify`` and ``batching``. This module imports none of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.registry import known_implementations
from pydantic import BaseModel

from skyframe.errors import PluginError

if TYPE_CHECKING:
    import pluggy

    from skyframe.protocols.endpoint import Endpoint

#: The scheme of a protocol that takes any URL fsspec knows and no other protocol claims.
ANY_FSSPEC = "*"

EndpointFactory = Callable[[str, dict[str, Any], Path], "Endpoint"]


@dataclass(frozen=True)
class Protocol:
    """A storage protocol: what a plugin registers."""

    name: str  #: its canonical name (an Endpoint's ``protocol``)
    schemes: tuple[str, ...]  #: the URL schemes it takes ("file" also takes plain paths)
    #: ``endpoint(url, options, base_dir)``: check the sink's URL and options without
    #: connecting (raise ValueError or pydantic's ValidationError), return an Endpoint
    endpoint: EndpointFactory
    options: type[BaseModel] | None = None  #: its options model (unknown keys are errors)
    origin: str = ""  #: the plugin that registered it, for messages
    #: ``cancel_upload(fs, record)``: cancel an interrupted upload its transfer journaled
    #: (``skyframe cleanup``, or a record the transfer will not resume); one gone is fine
    cancel_upload: Callable[[Any, dict[str, Any]], None] | None = None
    #: ``describe_upload(record)``: what the server holds for a journaled upload, briefly
    describe_upload: Callable[[dict[str, Any]], str] | None = None
    #: ``remote_sha256(fs, path)``: an object's sha256 as the store tells it without a
    #: download (``skyframe verify``): kept by the store for what its transfer wrote (S3,
    #: GCS; "" when the object has none) or computed by the server (SFTP); None when the
    #: store cannot tell
    remote_sha256: Callable[[Any, str], str | None] | None = None


def scheme_of(url: str) -> str:
    """A sink URL's scheme: ``file`` for a plain path."""
    if "://" in url or url.startswith(("s3:", "gs:", "gcs:")):
        return str(fsspec.core.split_protocol(url)[0] or "file")
    return "file"


class Protocols:
    """Every registered protocol, by URL scheme: a read-only mapping."""

    def __init__(self) -> None:
        self._by_scheme: dict[str, Protocol] = {}
        self.by_scheme: Mapping[str, Protocol] = MappingProxyType(self._by_scheme)

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> Protocols:
        """Collect through ``skyframe_register_protocols``."""
        protocols = cls()
        pm.hook.skyframe_register_protocols(register=protocols.add)
        return protocols

    def add(self, protocol: Protocol) -> None:
        """Register a protocol; a scheme taken already is an error naming both plugins."""
        if not isinstance(protocol, Protocol):
            raise PluginError(f"cannot register {protocol!r} as a protocol: not a Protocol")
        for scheme in protocol.schemes:
            taken = self._by_scheme.get(scheme)
            if taken is not None and taken is not protocol:
                raise PluginError(
                    f"two protocols for {scheme}://: {taken.name!r} from {taken.origin or '?'} "
                    f"and {protocol.name!r} from {protocol.origin or '?'}"
                )
            self._by_scheme[scheme] = protocol

    def named(self, name: str) -> Protocol | None:
        """The protocol of that canonical name (as journal records and endpoints give it)."""
        return next((p for p in self._by_scheme.values() if p.name == name), None)

    def for_url(self, url: str) -> Protocol:
        """The protocol a sink URL takes; ValueError with the fix when there is none."""
        scheme = scheme_of(url)
        found = self._by_scheme.get(scheme)
        if found is not None:
            return found
        fallback = self._by_scheme.get(ANY_FSSPEC)
        known = known_implementations.get(scheme)
        if fallback is not None and scheme in fsspec.available_protocols():
            return fallback
        names = ", ".join(f"{s}://" for s in sorted(self._by_scheme) if s != ANY_FSSPEC)
        hint = (
            f"{known['err']} and a skyframe plugin for it, or " if known and "err" in known else ""
        )
        anything = "; and any protocol fsspec knows" if fallback is not None else ""
        raise ValueError(
            f"no protocol for {scheme}://: {hint}install a skyframe protocol plugin that "
            f"registers it (registered: {names}{anything})"
        )


@functools.cache
def builtin_protocols() -> Protocols:
    """The protocols of the built-in plugins alone (for callers without a project)."""
    from skyframe.plugin_manager import get_plugin_manager

    return Protocols.from_plugin_manager(get_plugin_manager(load_entry_points=False))
