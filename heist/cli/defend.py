"""``heist defend``: the defender's tools.

``trace`` (which API key a leaked output was served to), ``verify`` (was a suspect model trained on our
watermarked outputs: a p-value) and, from :mod:`heist.cli.defend_models`, the model-level membership
defenses ``akd``, ``dmp`` and ``dpsgd`` (each writes a new checkpoint to serve).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from heist.cli import defend_models
from heist.cli.common import config_option, console, err_console, redis_url_option, victim_settings
from translators.errors import HeistError, first_problem

app = typer.Typer(help="Defender tools: trace leaked outputs to the API key that received them; verify a suspect "
                       "model against the ownership watermark; retrain the victim against membership inference "
                       "(akd, dmp, dpsgd).", no_args_is_help=True)
defend_models.register(app)


def _server_secret(config: Path | None, secret_file: Path | None,
                   redis_url: str | None = None) -> tuple[int, Any]:
    """(secret, settings) from --secret-file, else the settings / data dir that ``heist serve`` uses (resolved
    like every command: --config, else $HEIST_VICTIM_CONFIG, else defaults; ``redis_url`` overrides theirs).
    Never creates a secret."""
    from victim_service.services import read_defense_secret, secret_from_text

    settings = victim_settings(config, redis_url=redis_url).settings
    if secret_file is not None:
        try:
            return secret_from_text(secret_file.read_bytes().strip(), f"--secret-file {secret_file}"), settings
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
    """Static keys of the settings, every stored key's client (Redis or the data-dir key file) and every client
    the query log has served: a revoked key's client (the usual case: detect, revoke, then trace what leaked)
    stays a candidate through its log entries."""
    from victim_service.keys import KeyStoreError, open_key_store
    from victim_service.querylog import LogReader
    from victim_service.settings import Settings

    assert isinstance(settings, Settings)
    names = {k.name for k in settings.keys}
    for what, read in (("key store", lambda: {r.name for r in open_key_store(settings).records()}),
                       ("query log", lambda: {e.client for e in LogReader(settings).iter_entries() if e.client})):
        try:
            names |= read()
        except (KeyStoreError, OSError) as exc:
            err_console.print(f"[yellow]warning:[/yellow] {what} unreadable ({exc}); its clients are not "
                              "candidates", highlight=False)
        except Exception as exc:  # noqa: BLE001 - Redis errors: keep going with the other sources
            err_console.print(f"[yellow]warning:[/yellow] {what} unreachable ({type(exc).__name__}); its clients "
                              "are not candidates", highlight=False)
    return sorted(names)


def _trace_inputs(images: list[Path]) -> list[Path]:
    """The image files to trace: each file as given, each folder's image files (:func:`image_files`).
    A missing path or a folder without images is a one-line error before any work (it answered ``none``)."""
    from translators.corpus import CorpusError, image_files

    paths: list[Path] = []
    for p in images:
        if p.is_dir():
            try:
                found = image_files(p)
            except CorpusError as exc:
                raise HeistError(str(exc)) from None
            if not found:
                raise HeistError(f"{p}: a folder without image files (PNG, JPEG, WebP, BMP, TIFF)")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise HeistError(f"{p}: no such file or folder")
    return paths


@app.command("trace")
def trace(
    images: list[Path] = typer.Argument(..., help="Images to trace (PNG, JPEG, WebP, BMP, TIFF), or folders of "
                                        "them (a leaked training set: every image below it, sorted)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per image on stdout."),
    config: Path | None = config_option(),
    secret_file: Path | None = typer.Option(None, "--secret-file", help="The server's defense-secret file."),
    client: list[str] = typer.Option([], "--client", help="Extra candidate client names (repeatable)."),
    max_false_match: float = typer.Option(1e-6, "--max-false-match", min=0.0, max=1.0,
                                          help="Name a client only below this false-match probability."),
    redis_url: str | None = redis_url_option(),
) -> None:
    """For each image: the client (API key name) it was served to, or ``none``, with the false-match probability."""
    from defenses.watermark.trace import MIN_SIDE, identify
    from translators.codecs import read_image
    from translators.errors import ImageError

    paths = _trace_inputs(images)
    secret, settings = _server_secret(config, secret_file, redis_url)
    clients = sorted({*_known_clients(settings), *client})
    if not clients:
        raise HeistError("no candidate clients: the settings name no keys and neither the key store nor the query "
                         f"log ({settings.store().describe()}) could be read or held any; give the server's "
                         "--config or --redis-url, or name the suspects with --client NAME")
    for path in paths:
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


def _ownership_params(specs: list[list[dict[str, Any]]], model: str) -> Any:
    from defenses.watermark.ownership import OwnershipParams
    from translators.errors import HeistError

    found = [OwnershipParams(**{k: v for k, v in d.items() if k != "name"})
             for group in specs for d in group if d.get("name") == "ownership_watermark"]
    if len({(p.key_id, p.source, p.key_space()) for p in found}) > 1:  # what the key and the test depend on
        raise HeistError(f"model {model!r} is served with several ownership_watermark keys; verify each with a "
                         "config that names one")
    return found[0] if found else None


def _our_model(name: str, settings: Any) -> tuple[Any, Any, int, str | None]:
    """``(clean module, OwnershipParams or None, size multiple, task)`` for a served model name or a
    checkpoint (``task`` from its card; None for a file without one)."""
    from translators.checkpoint import load_model
    from translators.errors import HeistError
    from victim_service.models import model_specs, resolve_source
    from victim_service.settings import SettingsError

    path = Path(name).expanduser()
    if path.suffix in {".safetensors", ".pt", ".pt2"} or "/" in name:
        if not path.is_file():
            raise HeistError(f"--model {name}: no such checkpoint file")
        loaded, params = load_model(path), None
    else:
        try:
            specs = {s.name: s for s in model_specs(settings)}
        except SettingsError:
            specs = {}
        if name not in specs:
            raise HeistError(f"--model {name}: no served model of that name in the settings (models: "
                             f"{', '.join(specs) or 'none; pass --config with the server settings'}) and not a "
                             "checkpoint path")
        spec = specs[name]
        tier_defs = [t.defenses for t in settings.tiers.values()]
        params = _ownership_params([spec.defenses, *tier_defs], name)
        loaded = load_model(resolve_source(spec.source))
    card = getattr(loaded, "card", None)
    multiple = int(getattr(card, "size_multiple", 1) or 1)
    return loaded.module.eval(), params, multiple, getattr(card, "task", None)


def _qualities(text: str) -> tuple[int, ...]:
    """``"50,75,90"`` -> ``(50, 75, 90)``; ``"none"`` or ``""`` -> ``()``; anything else: a one-line error."""
    from translators.errors import HeistError

    if text.strip().lower() in {"", "none"}:
        return ()
    try:
        qs = tuple(int(a) for a in text.split(","))
    except ValueError:
        qs = ()
    if not qs or any(not 1 <= q <= 100 for q in qs):
        raise HeistError(f"--nuisance-jpeg {text!r}: give JPEG qualities 1..100, comma-separated, or 'none'")
    return qs


def _warn_short_probes(probes: list[Any], images: str, queries: int, side: int, multiple: int) -> None:
    """Say when the probe set is smaller than asked (fewer tiles in ``images`` than ``--queries``, or photos
    under ``--probe-side``): the test stays exact but has less power, so a weak p-value may be the probes'."""
    sides = sorted({int(p.image.shape[-1]) for p in probes})
    if len(probes) < queries:
        err_console.print(f"[yellow]warning:[/yellow] {images} gives only {len(probes)} probe tile(s), not "
                          f"--queries {queries}: less power; add photos or lower --probe-side", highlight=False)
    if sides and sides[0] < max(multiple, side - side % multiple):  # make_probes' own rounding
        err_console.print(f"[yellow]warning:[/yellow] some photos of {images} are under --probe-side {side}: "
                          f"probes of {sides[0]} px a side are used as they are (less power)", highlight=False)


def verify(
    suspect: str = typer.Option(..., "--suspect", help="Suspect: a checkpoint Heist loads (.safetensors, "
                                "TorchScript .pt, .pt2) or the URL of an image-translation API."),
    model: str = typer.Option(..., "--model", help="Our model: a served model name in the settings, or a "
                              "checkpoint; its clean outputs are computed locally."),
    suspect_model: str | None = typer.Option(None, help="Model name at the suspect URL (default: --model)."),
    suspect_api_key: str = typer.Option("", help="API key for the suspect URL.", envvar="HEIST_SUSPECT_API_KEY"),
    queries: int = typer.Option(32, min=1, max=4096, help="Probe images sent to the suspect."),
    images: str = typer.Option("corpus:benchmark", help="Probe photos: corpus:SPLIT, a folder or dataset:NAME."),
    probe_side: int = typer.Option(256, min=16, max=4096, help="Probe side in pixels (larger: more power)."),
    probe_noise: float | None = typer.Option(
        None, min=0.0, max=0.5, help="Gaussian noise sigma added to the probes ([0, 1] units). Default: 25/255 "
        "when our model is a denoiser (its traffic is noisy photos), else 0."),
    config: Path | None = config_option(),
    secret_file: Path | None = typer.Option(None, help="The defense secret file (default: the data dir's)."),
    key_id: str | None = typer.Option(None, help="Override the watermark key id (default: from the config)."),
    radius: int | None = typer.Option(None, help="Override the watermark radius (default: from the config)."),
    nuisance_jpeg: str = typer.Option(
        "50,75,90", help="JPEG qualities (comma-separated, or 'none') whose error on our clean outputs is "
        "projected off the test: a thief who re-encoded the harvest learned that error too. The null stays exact."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """p-value for "SUSPECT was trained on outputs of our watermarked MODEL" (exact one-sided cosine test)."""
    from defenses.watermark.ownership import OwnershipParams
    from evaluation.watermark import load_probes, module_translator, probe_noise_for, verify_ownership, verify_url
    from translators.checkpoint import load_model
    from translators.errors import HeistError

    secret, settings = _server_secret(config, secret_file)
    module, params, multiple, task = _our_model(model, settings)
    configured = params is not None
    base = params or OwnershipParams()
    over = {k: v for k, v in {"key_id": key_id, "radius": radius}.items() if v is not None}
    try:
        params = base.model_copy(update=over) if over else base
        OwnershipParams(**params.model_dump())
    except ValueError as exc:
        raise HeistError(f"bad watermark parameters: {first_problem(exc)}") from None
    nuisance = _qualities(nuisance_jpeg)
    noise = probe_noise_for(task) if probe_noise is None else probe_noise
    probes = load_probes(images, queries, probe_side, multiple, noise)
    _warn_short_probes(probes, images, queries, probe_side, multiple)
    victim = module_translator(module)
    if suspect.startswith(("http://", "https://")):
        result = verify_url(suspect, suspect_model or model, suspect_api_key, victim, probes, secret, params,
                            nuisance)
    else:
        p = Path(suspect).expanduser()
        if not p.is_file():
            raise HeistError(f"suspect {suspect!r}: no such checkpoint file (or give an http(s):// URL)")
        result = verify_ownership(module_translator(load_model(p).module.eval()), victim, probes, secret, params,
                                  nuisance)
    result["suspect"] = suspect
    result["model"] = model
    result["probe_noise"] = noise
    if as_json:
        console.print_json(json.dumps(result))
        return
    verdict = "THEFT PROVABLE" if result["p_value"] < 1e-6 else ("evidence" if result["p_value"] < 0.01 else
                                                                  "no evidence")
    console.print(f"suspect {suspect} vs {model}: p = {result['p_value']:.3g} (cosine {result['cosine']:.3f} "
                  f"in {result['key_dim']} dims; z {result['z']:.2f} of at most {result['max_z']:.1f}, "
                  f"alpha {result['alpha']:.4f}, off-key {result['off_key']:.4f}, "
                  f"{result['nuisance_dims']} JPEG nuisance dims off, "
                  f"{result['probes']} probes of {result['probe_side']} px, noise sigma {noise:.3f}) "
                  f"-> {verdict}", highlight=False)
    for name, part in result.get("parts", {}).items():
        mark = "  <- decides; p above doubled (Bonferroni)" if name == result["part"] else ""
        console.print(f"  part {name}: p = {part['p_value']:.3g} (cosine {part['cosine']:.3f} in "
                      f"{part['key_dim']} dims){mark}", highlight=False)
    console.print(f"null: {result['null']}", highlight=False)
    for row in result["per_probe"]:
        console.print(f"  {row['probe']}: z {row['z']:+.2f}, residual rms {row['residual_rms']:.4f}",
                      highlight=False)
    if not configured and not over:
        err_console.print("note: default watermark parameters (no ownership_watermark in the config for this model)")


app.command("verify")(verify)
