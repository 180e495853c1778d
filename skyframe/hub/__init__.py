"""The hub: one view of every field station (docs/hub.md).

Modules, one concern each: ``config`` (hub.yaml), ``schema`` (the tables), ``db`` (engines
and migrations), ``tokens`` (stations' tokens), ``ingest`` (what stations send), ``commands``
(pause and resume for stations), ``queries`` (what the page reads), ``alerts`` (the watch and
its webhook), ``guard`` (HTTP defences), ``server`` (aiohttp), ``cli`` (``skyframe hub``).
"""

from __future__ import annotations

from skyframe.hub.config import HubConfig, load_hub_config

__all__ = ["HubConfig", "load_hub_config"]
