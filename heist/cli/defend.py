"""``heist defend``: the defender's tools.

``trace`` (which API key a leaked output was served to) and, from :mod:`heist.cli.defend_models`, the
model-level membership defenses ``akd``, ``dmp`` and ``dpsgd`` (each writes a new checkpoint to serve).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from heist.cli import defend_models
from heist.cli.common import err_console
from translators.errors import HeistError

app = typer.Typer(help="Defender tools: trace leaked outputs to the API key that received them; retrain the "
                       "victim against membership inference (akd, dmp, dpsgd).", no_args_is_help=True)
defend_models.register(app)


def _trace_secret(config: Path | None, secret_file: Path | None) -> tuple[int, object]:
    """(secret, settings) from --secret-file, else the settings / data dir that ``heist serve`` uses."""
    from victim_service.services import read_defense_secret, secret_from_text
    from victim_service.settings import Settings

    settings = Settings.from_file(config)
    if secret_file is not None:
        try:
            return secret_from_text(secret_file.read_bytes().strip()), settings
        except OSError as exc:
            raise HeistError(f"cannot read the secret file {secret_file}: {exc.strerror or exc}") from None
    secret = read_defense_secret(settings)
    if secret is None:
        raise HeistError(
            f"no defense secret: the settings set none and {settings.state_dir()} holds no defense-secret file "
            "(has the server run with this data dir?); pass --config or --secret-file"
        )
    return secret, settings


def _known_clients(settings: object) -> list[str]:
    """Static keys of the settings plus every stored key's client (Redis or the data-dir key file)."""
    from victim_service.keys import KeyStoreError, open_key_store
    from victim_service.settings import Settings

    assert isinstance(settings, Settings)
    names = {k.name for k in settings.keys}
    try:
        names |= {r.name for r in open_key_store(settings).records()}
    except (KeyStoreError, OSError) as exc:
        err_console.print(f"[yellow]warning:[/yellow] key store unreadable ({exc}); only static keys are "
                          "candidates", highlight=False)
    except Exception as exc:  # noqa: BLE001 - Redis errors: keep going with the static keys
        err_console.print(f"[yellow]warning:[/yellow] key store unreachable ({type(exc).__name__}); only "
                          "static keys are candidates", highlight=False)
    return sorted(names)


@app.command("trace")
def trace(
    images: list[Path] = typer.Argument(..., help="Images to trace (PNG, JPEG, WebP)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per image on stdout."),
    config: Path | None = typer.Option(None, "--config", "-c", envvar="HEIST_VICTIM_CONFIG",
                                       help="The victim's settings file (secret, data dir, key store)."),
    secret_file: Path | None = typer.Option(None, "--secret-file", help="The server's defense-secret file."),
    client: list[str] = typer.Option([], "--client", help="Extra candidate client names (repeatable)."),
    max_false_match: float = typer.Option(1e-6, "--max-false-match", min=0.0, max=1.0,
                                          help="Name a client only below this false-match probability."),
) -> None:
    """For each image: the client (API key name) it was served to, or ``none``, with the false-match probability."""
    from defenses.watermark.trace import MIN_SIDE, identify
    from translators.codecs import read_image
    from translators.errors import ImageError

    secret, settings = _trace_secret(config, secret_file)
    clients = sorted({*_known_clients(settings), *client})
    for path in images:
        row: dict[str, object] = {"image": str(path)}
        try:
            x = read_image(path)
            if min(x.shape[-2:]) < MIN_SIDE:
                raise ImageError("too_small", f"{path}: {x.shape[-1]}x{x.shape[-2]} is under {MIN_SIDE}x{MIN_SIDE}; "
                                 "too small to carry a trace")
            m = identify(x, secret, clients, max_false_match)
            row.update(client=m.client, nearest=m.nearest, distance=m.distance, code_bits=56,
                       p_false_match=m.p_false_match, candidates=m.candidates,
                       payload_id=f"{m.reading.payload_id:08x}", sync_z=round(m.reading.sync_z, 2))
        except ImageError as exc:
            row.update(client=None, error=str(exc))
        if as_json:
            typer.echo(json.dumps(row))
        elif "error" in row:
            typer.echo(f"{path}: none ({row['error']})")
        elif row["client"] is None:
            typer.echo(f"{path}: none (nearest {row['nearest']} at {row['distance']}/56 bits, "
                       f"p_false_match {float(row['p_false_match']):.2g})")
        else:
            typer.echo(f"{path}: {row['client']} ({row['distance']}/56 bits off, "
                       f"p_false_match {float(row['p_false_match']):.2g})")
