"""``skyframe hub``: run the hub, and manage the stations' tokens (docs/hub.md).

``skyframe hub hub.yaml`` runs it (``serve`` is implied when the first word is not one of the
subcommands); ``skyframe hub token add|list|revoke`` work on the database directly, whether a
hub runs or not.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from skyframe.config import redact_urls
from skyframe.errors import SkyframeError
from skyframe.hub.config import DEFAULT_HUB_CONFIG, load_hub_config

config_option = click.option(
    "-c",
    "--config",
    "config_file",
    metavar="HUB_CONFIG",
    default=DEFAULT_HUB_CONFIG,
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The hub's config file.",
)
database_option = click.option(
    "--database", metavar="URL", help="The database URL (overrides hub.yaml's database)."
)


class HubGroup(click.Group):
    """A group whose default subcommand is ``serve``: ``skyframe hub hub.yaml`` runs the hub."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["serve", *args]
        return super().parse_args(ctx, args)


@click.group("hub", cls=HubGroup)
def hub_group() -> None:
    """The office's view of every field station: skyframe hub [serve] hub.yaml."""


@hub_group.command("serve")
@click.argument(
    "config_file",
    metavar="HUB_CONFIG",
    default=DEFAULT_HUB_CONFIG,
    type=click.Path(dir_okay=False, path_type=Path),
)
@click.option("--listen", metavar="HOST:PORT", help="Where to listen (overrides hub.yaml).")
@database_option
def serve_command(config_file: Path, listen: str | None, database: str | None) -> None:
    """Run the hub: station ingest, the operators' page and API, alerts."""
    from skyframe.hub.db import open_database
    from skyframe.hub.server import HubServer, serve

    loaded = load_hub_config(config_file, listen=listen, database=database)
    engine = open_database(loaded.database_url())
    server = HubServer(loaded, engine)
    shown_db = loaded.redact(redact_urls(loaded.database_url()))

    def ready(url: str) -> None:
        click.echo(f"hub: {url}/ (database {shown_db}); Ctrl-C stops it")
        sys.stdout.flush()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(server, stop, ready)

    try:
        asyncio.run(main())
    except OSError as exc:
        raise SkyframeError(f"the hub cannot listen: {exc}") from None
    finally:
        engine.dispose()


@hub_group.group("token")
def token_group() -> None:
    """Stations' tokens: add (shown once), list, revoke."""


def _engine(config_file: Path, database: str | None) -> Any:
    from skyframe.hub.db import open_database

    loaded = load_hub_config(config_file, database=database)
    return open_database(loaded.database_url())


def _when(at: float | None) -> str:
    if at is None:
        return "never"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@token_group.command("add")
@click.argument("name")
@config_option
@database_option
def token_add(name: str, config_file: Path, database: str | None) -> None:
    """Create station NAME (or give a revoked one a new token); prints the token once."""
    from skyframe.hub.tokens import add_station

    engine = _engine(config_file, database)
    try:
        token = add_station(engine, name)
    finally:
        engine.dispose()
    click.echo(f"station {name}: its token follows, shown this once (the hub keeps a hash):")
    click.echo(token)


@token_group.command("list")
@config_option
@database_option
def token_list(config_file: Path, database: str | None) -> None:
    """Every station: created, last seen, revoked (never their tokens)."""
    from skyframe.hub.tokens import list_stations

    engine = _engine(config_file, database)
    try:
        found = list_stations(engine)
    finally:
        engine.dispose()
    if not found:
        click.echo("no stations yet: skyframe hub token add NAME")
        return
    width = max(len(s.name) for s in found)
    for station in found:
        state = f"revoked {_when(station.revoked_at)}" if station.revoked_at else "active"
        click.echo(
            f"{station.name:<{width}}  created {_when(station.created_at)}  "
            f"last seen {_when(station.last_seen)}  {state}"
        )


@token_group.command("revoke")
@click.argument("name")
@config_option
@database_option
def token_revoke(name: str, config_file: Path, database: str | None) -> None:
    """Revoke station NAME's token: its next ingest is refused; its history stays."""
    from skyframe.hub.tokens import revoke_station

    engine = _engine(config_file, database)
    try:
        revoke_station(engine, name)
    finally:
        engine.dispose()
    click.echo(f"station {name}: token revoked")
