"""``heist log``: read and export the victim's query log (Redis Stream or JSONL, per the settings)."""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path

import typer
from rich.table import Table

from heist.cli.common import (
    check_out_file,
    config_option,
    console,
    err_console,
    print_table,
    progress,
    redis_url_option,
    store_mismatch,
    victim_settings,
)
from translators.errors import HeistError

app = typer.Typer(help="The victim's query log: every translate request, admitted or refused.", no_args_is_help=True)

ConfigOpt = config_option()


class ExportFormat(StrEnum):
    jsonl = "jsonl"
    parquet = "parquet"


def _check_client(client: str | None) -> None:
    """A name no key can have matches no entry: say so (as the admin routes' 400 ``bad_client``), not ``[]``."""
    from victim_service.settings import check_name

    if client is not None:
        try:
            check_name(client, "client name")
        except ValueError as exc:
            raise HeistError(f"--client: {exc}") from None


def _reader(config: Path | None, redis_url: str | None):  # type: ignore[no-untyped-def]
    """The query-log reader of these settings; warns (stderr) when the server running on their port logs
    elsewhere (an empty table would read as "no traffic")."""
    from victim_service.querylog import LogReader

    resolved = victim_settings(config, redis_url=redis_url)
    if (warning := store_mismatch(resolved, "this is not that server's query log")) is not None:
        err_console.print(f"[bold yellow]warning:[/bold yellow] {warning}", highlight=False)
    return LogReader(resolved.settings)


@contextlib.contextmanager
def _log_store() -> Iterator[None]:
    """Turn an unreachable Redis into the CLI's one-line error (exit 2), not a traceback."""
    import redis

    try:
        yield
    except redis.RedisError as exc:
        raise HeistError(f"the query log (Redis) is unreachable: {type(exc).__name__}: {exc}") from None


def _since(value: str | None) -> float | None:
    """An ISO date/time (UTC unless an offset is given) or a duration ``90s``/``15m``/``2h``/``7d`` ago."""
    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(value[:-1]) * units[value[-1]]
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        raise HeistError(f"--since {value!r}: give an ISO date/time or a duration like 15m, 2h, 7d") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


def _table(entries: list) -> Table:  # type: ignore[type-arg]
    table = Table()
    for col in ("time (UTC)", "client", "model", "status", "code", "size", "latency ms", "phash", "request"):
        table.add_column(col)
    for e in entries:
        when = dt.datetime.fromtimestamp(e.ts, dt.UTC).strftime("%H:%M:%S.%f")[:-3]
        size = f"{e.width}x{e.height}" if e.width else ""
        table.add_row(when, e.client or "-", e.model or "-", str(e.status), e.code, size, f"{e.latency_ms:.1f}",
                      e.phash or "", e.request_id[:8])
    return table


@app.command("tail")
def tail(
    n: int = typer.Option(20, "-n", min=1, help="How many recent entries."),
    client: str | None = typer.Option(None, help="Only this client's entries."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new entries (Ctrl-C stops)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line instead of a table."),
    config: Path | None = ConfigOpt,
    redis_url: str | None = redis_url_option(),
) -> None:
    """Show the most recent query-log entries."""
    _check_client(client)
    reader = _reader(config, redis_url)
    with _log_store():
        _tail(reader, n, client, follow, as_json)


def _tail(reader, n: int, client: str | None, follow: bool, as_json: bool) -> None:  # type: ignore[no-untyped-def]
    entries = reader.tail(n, client)
    if as_json:
        for e in entries:
            print(e.model_dump_json())  # noqa: T201 - machine-readable output on stdout
    else:
        print_table(_table(entries))
    if not follow:
        return
    last = entries[-1].ts if entries else time.time()
    seen = {e.request_id for e in entries}
    while True:
        time.sleep(1.0)
        new = [e for e in reader.iter_entries(since=last - 1, client=client) if e.request_id not in seen]
        for e in new:
            seen.add(e.request_id)
            last = max(last, e.ts)
        if new:
            if as_json:
                for e in new:
                    print(e.model_dump_json())  # noqa: T201 - machine-readable stream on stdout
            else:
                print_table(_table(new))


@app.command("export")
def export(
    out: Path = typer.Option(..., "--out", "-o", help="Output file."),
    fmt: ExportFormat | None = typer.Option(
        None, "--format", help="jsonl or parquet (default: parquet for a .parquet --out, else jsonl)."),
    client: str | None = typer.Option(None, help="Only this client's entries."),
    since: str | None = typer.Option(None, help="ISO date/time (UTC) or a duration such as 2h or 7d."),
    config: Path | None = ConfigOpt,
    redis_url: str | None = redis_url_option(),
) -> None:
    """Export the query log (oldest first) as JSONL or Parquet; written atomically."""
    fmt = _export_format(out, fmt)
    _check_client(client)
    check_out_file(out, f"querylog.{fmt.value}")
    reader = _reader(config, redis_url)
    with _log_store():
        _export(reader, out, fmt, client, since)


def _export_format(out: Path, fmt: ExportFormat | None) -> ExportFormat:
    """``--format``, or the one ``--out``'s suffix names; a suffix of the other format is refused (a
    ``q.parquet`` holding JSON lines would fail in whatever reads it next)."""
    by_suffix = {".parquet": ExportFormat.parquet, ".jsonl": ExportFormat.jsonl}.get(out.suffix.lower())
    if fmt is None:
        return by_suffix or ExportFormat.jsonl
    if by_suffix is not None and by_suffix != fmt:
        raise HeistError(f"--out {out} names a {by_suffix.value} file but --format is {fmt.value}; "
                         "make them agree (or drop --format)")
    return fmt


def _export(reader, out: Path, fmt: ExportFormat, client: str | None, since: str | None) -> None:  # type: ignore[no-untyped-def]
    from victim_service.querylog import export_entries

    total = reader.count()
    with progress(transient=True) as bar:
        task = bar.add_task("exporting", total=total or None, info="")

        def counted():  # type: ignore[no-untyped-def]
            for e in reader.iter_entries(since=_since(since), client=client):
                bar.advance(task)
                yield e

        n = export_entries(counted(), out, fmt.value)
    console.print(f"{n} entries -> {out}")
