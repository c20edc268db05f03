"""``heist defend``: the victim's forensic tools (ownership verification)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import typer

from heist.cli.common import console, err_console

app = typer.Typer(help="Prove theft: verify a suspect model against our ownership watermark.",
                  no_args_is_help=True)


# --- verify (ownership watermark) -------------------------------------------------------------------

def _secret_from_file(path: Path) -> int:
    """The defense secret as ``defense_secret`` derives it from the data-dir file (SHA-256 of its text)."""
    from translators.errors import HeistError

    try:
        raw = path.read_bytes().strip()
    except OSError as exc:
        raise HeistError(f"cannot read the secret file {path}: {exc.strerror or exc}") from None
    if not raw:
        raise HeistError(f"the secret file {path} is empty")
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "big")


def _server_secret(settings: Any) -> int:
    """The secret ``heist serve`` uses, without creating one (a fresh secret could verify nothing)."""
    from translators.errors import HeistError
    from victim_service.services import defense_secret

    if settings.defense_secret is None and not (settings.state_dir() / "defense-secret").exists():
        raise HeistError(f"no defense secret in the settings or in {settings.state_dir()}: pass --secret-file, or "
                         "--config with the settings `heist serve` used")
    return defense_secret(settings)


def _ownership_params(specs: list[list[dict[str, Any]]], model: str) -> Any:
    from defenses.watermark.ownership import OwnershipParams
    from translators.errors import HeistError

    found = [OwnershipParams(**{k: v for k, v in d.items() if k != "name"})
             for group in specs for d in group if d.get("name") == "ownership_watermark"]
    if len({(p.key_id, p.radius) for p in found}) > 1:
        raise HeistError(f"model {model!r} is served with several ownership_watermark keys; verify each with a "
                         "config that names one")
    return found[0] if found else None


def _our_model(name: str, settings: Any) -> tuple[Any, Any, int]:
    """``(clean module, OwnershipParams or None, size multiple)`` for a served model name or a checkpoint."""
    from translators.checkpoint import load_model
    from translators.errors import HeistError
    from victim_service.models import model_specs, resolve_source

    path = Path(name).expanduser()
    if path.suffix in {".safetensors", ".pt", ".pt2"} and path.exists():
        loaded, params = load_model(path), None
    else:
        specs = {s.name: s for s in model_specs(settings)}
        if name not in specs:
            raise HeistError(f"no served model {name!r} in the settings (models: {', '.join(specs) or 'none'}) "
                             "and no such checkpoint file")
        spec = specs[name]
        tier_defs = [t.defenses for t in settings.tiers.values()]
        params = _ownership_params([spec.defenses, *tier_defs], name)
        loaded = load_model(resolve_source(spec.source))
    card = getattr(loaded, "card", None)
    multiple = int(getattr(card, "size_multiple", 1) or 1)
    return loaded.module.eval(), params, multiple


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
    config: Path | None = typer.Option(None, "--config", "-c", envvar="HEIST_VICTIM_CONFIG",
                                       help="The victim's settings file (models, defenses, data dir)."),
    secret_file: Path | None = typer.Option(None, help="The defense secret file (default: the data dir's)."),
    key_id: str | None = typer.Option(None, help="Override the watermark key id (default: from the config)."),
    radius: int | None = typer.Option(None, help="Override the watermark radius (default: from the config)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """p-value for "SUSPECT was trained on outputs of our watermarked MODEL" (exact one-sided z-test)."""
    from defenses.watermark.ownership import OwnershipParams
    from evaluation.watermark import load_probes, module_translator, verify_ownership, verify_url
    from translators.checkpoint import load_model
    from translators.errors import HeistError
    from victim_service.settings import Settings

    settings = Settings.from_file(config)
    secret = _secret_from_file(secret_file) if secret_file else _server_secret(settings)
    module, params, multiple = _our_model(model, settings)
    base = params or OwnershipParams()
    over = {k: v for k, v in {"key_id": key_id, "radius": radius}.items() if v is not None}
    try:
        params = base.model_copy(update=over) if over else base
        OwnershipParams(**params.model_dump())
    except ValueError as exc:
        raise HeistError(f"bad watermark parameters: {exc}") from None
    probes = load_probes(images, queries, probe_side, multiple)
    victim = module_translator(module)
    if suspect.startswith(("http://", "https://")):
        result = verify_url(suspect, suspect_model or model, suspect_api_key, victim, probes, secret, params)
    else:
        p = Path(suspect).expanduser()
        if not p.is_file():
            raise HeistError(f"suspect {suspect!r}: no such checkpoint file (or give an http(s):// URL)")
        result = verify_ownership(module_translator(load_model(p).module.eval()), victim, probes, secret, params)
    result["suspect"] = suspect
    result["model"] = model
    if as_json:
        console.print_json(json.dumps(result))
        return
    verdict = "THEFT PROVABLE" if result["p_value"] < 1e-6 else ("evidence" if result["p_value"] < 0.01 else
                                                                  "no evidence")
    console.print(f"suspect {suspect} vs {model}: p = {result['p_value']:.3g} (z = {result['z']:.2f}, "
                  f"max z {result['max_z']:.1f}, {result['probes']} probes of {result['probe_side']} px) "
                  f"-> {verdict}", highlight=False)
    console.print(f"null: {result['null']}", highlight=False)
    for row in result["per_probe"]:
        console.print(f"  {row['probe']}: z {row['z']:+.2f}, residual rms {row['residual_rms']:.4f}",
                      highlight=False)
    if params is base and base == OwnershipParams() and not over:
        err_console.print("note: default watermark parameters (no ownership_watermark in the config for this model)")


app.command("verify")(verify)
