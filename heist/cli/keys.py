"""``heist keys``: create, list and revoke API keys in the store the victim server reads."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from heist.cli.common import config_option, console, err_console, print_table, store_mismatch, victim_settings
from translators.errors import HeistError

if TYPE_CHECKING:
    from victim_service.settings import ResolvedSettings, Settings

app = typer.Typer(help="API keys of the victim service (stored hashed; shown once).", no_args_is_help=True)

ConfigOpt = config_option()
RedisOpt = typer.Option(None, "--redis-url", help="Override the settings' redis_url.")


def _warn_other_store(resolved: ResolvedSettings, consequence: str = "that server will not see this change") -> None:
    """Warn (stderr) when the server on the settings' port reads its keys from another store."""
    warning = store_mismatch(resolved, consequence)
    if warning:
        err_console.print(f"[bold yellow]warning:[/bold yellow] {warning}", highlight=False)


@contextlib.contextmanager
def _reachable_store(s: Settings) -> Iterator[None]:
    """A store that cannot be reached becomes one line naming it and how to start one."""
    from victim_service.errors import BackendUnavailableError

    try:
        yield
    except BackendUnavailableError as exc:
        raise HeistError(f"{exc}: {s.store().describe()}; start it (bash scripts/ensure-redis.sh for a local one) or "
                         "name a running one with --redis-url or the settings' redis_url") from None


@app.command("add")
def add(
    name: str = typer.Argument(..., help="Client name (letters, digits, '.', '_', '-')."),
    tier: str = typer.Option("free", help="Tier of the client (one of the settings' tiers)."),
    config: Path | None = ConfigOpt,
    redis_url: str | None = RedisOpt,
) -> None:
    """Create a key for NAME and print it once (only its SHA-256 is stored)."""
    from victim_service.keys import open_key_store
    from victim_service.settings import check_name

    resolved = victim_settings(config, redis_url=redis_url)
    s = resolved.settings
    try:
        check_name(name, "client name")
    except ValueError as exc:
        raise HeistError(str(exc)) from None
    if tier not in s.tiers:
        raise HeistError(f"unknown tier {tier!r}; the settings define: {', '.join(s.tiers)}")
    with _reachable_store(s):
        key = open_key_store(s).add(name, tier)
    err_console.print(f"key for [bold]{name}[/bold] (tier {tier}) stored in {s.store().describe()} "
                      f"(settings: {resolved.origin}); it is shown only once:", highlight=False)
    console.print(key, highlight=False, soft_wrap=True)
    _warn_other_store(resolved)


@app.command("list")
def list_keys(config: Path | None = ConfigOpt, redis_url: str | None = RedisOpt) -> None:
    """List stored keys (names, tiers, creation time; never the keys) and the settings' static keys."""
    from victim_service.keys import open_key_store

    resolved = victim_settings(config, redis_url=redis_url)
    s = resolved.settings
    table = Table(title=f"API keys in {s.store().describe()}")
    for col in ("name", "tier", "kind", "created"):
        table.add_column(col)
    with _reachable_store(s):
        records = open_key_store(s).records()
    for r in records:
        created = dt.datetime.fromtimestamp(r.created, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        table.add_row(r.name, r.tier, "stored", created)
    for k in s.keys:
        table.add_row(k.name, k.tier, "static (settings)", "")
    print_table(table)
    _warn_other_store(resolved, "these are not the keys that server checks")


@app.command("revoke")
def revoke(name: str = typer.Argument(...), config: Path | None = ConfigOpt, redis_url: str | None = RedisOpt) -> None:
    """Delete NAME's stored key. Running servers (every worker) stop accepting it within about a second."""
    from victim_service.keys import open_key_store

    resolved = victim_settings(config, redis_url=redis_url)
    s = resolved.settings
    with _reachable_store(s):
        revoked = open_key_store(s).revoke(name)
    if not revoked:
        raise HeistError(f"no stored key for client {name!r} in {s.store().describe()} (settings: {resolved.origin})")
    console.print(f"revoked the key of {name} in {s.store().describe()}", highlight=False)
    _warn_other_store(resolved)
