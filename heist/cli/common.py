"""Shared CLI helpers: consoles, logging set-up, progress bars, and the victim settings every command reads."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

if TYPE_CHECKING:
    from victim_service.settings import ResolvedSettings, Settings

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

PIPE_WIDTH = 1000
"""Table width when output goes to a pipe or file and ``COLUMNS`` is unset: rich would otherwise lay tables
out in 80 columns and cut client names, paths and numbers that ``grep`` or a script then miss."""


def print_table(table: Any) -> None:
    """Print a rich table on stdout: as wide as the terminal, or unwrapped (up to :data:`PIPE_WIDTH`) when
    piped; decided at print time (``COLUMNS`` wins when set)."""
    if console.is_terminal or os.environ.get("COLUMNS"):
        console.print(table)
    else:  # print(width=) can only narrow a console, so a wide one for this table, on the same stream
        Console(file=console.file, width=PIPE_WIDTH).print(table)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in ("httpx", "httpcore", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def progress(transient: bool = False) -> Progress:
    """A rich progress bar on stderr with count, elapsed time and ETA (redrawn in a terminal; elsewhere only
    the final state is printed when it stops, unless ``transient``)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
    )


def config_option() -> Any:
    """The ``--config`` option of every command that touches the victim's state (serve, keys, log, ...)."""
    return typer.Option(
        None, "--config", "-c", show_envvar=False,
        help="Victim settings file (.toml, .yaml or .json). Default: the file named by HEIST_VICTIM_CONFIG, "
        "else the built-in defaults; HEIST_VICTIM_* variables override single settings.",
    )


def device_option() -> Any:
    """The ``--device`` option of every command that runs a model here (training, evaluation)."""
    return typer.Option("auto", "--device", help="Torch device: auto (CUDA when present, else CPU), cpu, cuda or "
                        "cuda:N.")


def seed_option(what: str) -> Any:
    """A ``--seed`` option; ``what`` says what it seeds (the same seed gives the same result)."""
    return typer.Option(0, "--seed", help=f"Seed of {what}; the same seed repeats the run.")


def redis_url_option() -> Any:
    """``--redis-url`` of the commands that read the victim's state (overrides the settings' redis_url)."""
    return typer.Option(None, "--redis-url", help="Redis URL of the victim (default: the settings' redis_url; "
                        "none: the data dir's files).")


def victim_settings(config: Path | None, **overrides: Any) -> ResolvedSettings:
    """The victim settings of a command: ``--config``, else ``$HEIST_VICTIM_CONFIG``, else defaults (see
    :func:`victim_service.settings.resolve_settings`); non-``None`` ``overrides`` are command-line options."""
    from victim_service.settings import resolve_settings

    resolved = resolve_settings(config, overrides)
    logging.getLogger("heist.cli").debug("victim settings from %s", resolved.origin)
    return resolved


def local_server_url(settings: Settings) -> str:
    """``http://HOST:PORT`` of the server these settings describe (a wildcard bind address -> loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.host, settings.host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.port}"


def store_mismatch(resolved: ResolvedSettings, consequence: str = "that server will not see this change",
                   timeout: float = 0.5) -> str | None:
    """A warning when the server answering at the settings' host and port keeps its API keys (and with them
    its query log: same Redis and prefix, or same data dir) elsewhere; ``consequence`` says what that means
    for the command.

    Asks ``GET /healthz`` (``store``: backend, Redis URL without password, key prefix, data dir). No server
    there, no answer within ``timeout`` seconds, or an answer without ``store``: ``None`` (nothing to compare).
    """
    import httpx

    from victim_service.settings import StoreInfo

    url = local_server_url(resolved.settings)
    try:
        r = httpx.get(f"{url}/healthz", timeout=timeout)
        theirs = StoreInfo.model_validate(r.json()["store"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
    ours = resolved.settings.store()
    if ours.same_keys_as(theirs):
        return None
    return (f"the server running at {url} keeps its keys in {theirs.describe()}, but this command used "
            f"{ours.describe()} (settings: {resolved.origin}): {consequence}. "
            "Give the server's settings file with --config FILE or HEIST_VICTIM_CONFIG=FILE (or its --redis-url).")


def check_out_file(out: Path, example: str) -> Path:
    """Refuse an ``--out FILE`` that cannot be written, before any work (see
    :func:`translators.files.unwritable_reason`); ``example`` names a file to write instead of a folder.
    Creates the missing folders. Returns ``out``."""
    from translators.errors import HeistError
    from translators.files import unwritable_reason

    if (why := unwritable_reason(out)) is not None:
        hint = f"; name the file to write (e.g. {out / example})" if why == "is a folder" else ""
        raise HeistError(f"--out {out}: {why}{hint}")
    return out


def choice(*allowed: str) -> Any:
    """A typer callback refusing values outside ``allowed`` with a usage error that lists them."""

    def check(value: str | None) -> str | None:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}")
        return value

    return check
