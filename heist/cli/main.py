"""Entry point of the ``heist`` command. Each area owns one module and one typer sub-app."""

from __future__ import annotations

import sys

import typer

from heist.cli import (
    attack,
    campaign,
    corpus,
    data,
    defend,
    evaluate,
    keys,
    log,
    monitor,
    serve,
    traffic,
    zoo,
)
from heist.cli.common import err_console, setup_logging
from translators.errors import HeistError

app = typer.Typer(
    name="heist",
    help="Heist: steal and defend image-to-image translation APIs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(zoo.app, name="zoo")
app.add_typer(corpus.app, name="corpus")
app.add_typer(data.app, name="data")
app.add_typer(keys.app, name="keys")
app.add_typer(log.app, name="log")
app.add_typer(attack.app, name="attack")
app.add_typer(evaluate.app, name="eval")
app.add_typer(campaign.app, name="campaign")
app.add_typer(defend.app, name="defend")
app.add_typer(monitor.app, name="monitor")
app.add_typer(traffic.app, name="traffic")
app.command("serve")(serve.serve)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    setup_logging(verbose)
    from translators.device import configure_threads

    configure_threads()


INTERRUPTED = ("[yellow]interrupted[/yellow]: what was saved is kept; run the same command again to resume "
               "a harvest, a training run or a campaign")


def main() -> None:
    """Run the CLI; user mistakes (:class:`HeistError`) print one line and exit 2, no traceback."""
    try:
        app()
    except HeistError as exc:
        from rich.markup import escape

        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except SystemExit as exc:  # typer turns Ctrl-C (KeyboardInterrupt) into a silent exit 130
        if exc.code == 130:
            err_console.print(INTERRUPTED, highlight=False)
        raise
    except KeyboardInterrupt:  # Ctrl-C outside a command (e.g. while the CLI starts)
        err_console.print(INTERRUPTED, highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
