"""``heist zoo``: list, build and locate the victim-zoo models."""

from __future__ import annotations

import typer
from rich.table import Table

from heist.cli.common import console, device_option, print_table, progress
from translators.checkpoint import CheckpointError, read_card
from translators.device import pick_device
from translators.zoo import PROFILES, ZOO, build, cached_checkpoint, get_recipe, zoo_checkpoint

app = typer.Typer(help="The victim zoo: models the project trains itself from the bundled corpus.",
                  no_args_is_help=True)


@app.command("list")
def list_models(
    profile: str = typer.Option("tiny", help=f"Profile to show cache state for: {', '.join(PROFILES)}."),
) -> None:
    """Show the zoo models, their task and whether they are built for PROFILE."""
    table = Table(title=f"Victim zoo (profile {profile})")
    for col in ("name", "task", "scale", "arch", "built", "PSNR / baseline (dB)", "description"):
        table.add_column(col)
    for name in ZOO.names():
        r = get_recipe(name)
        path = zoo_checkpoint(name, profile)
        built, score = "no", ""
        if path.exists() and path.with_suffix(".json").exists():
            try:
                m = read_card(path).metrics
                built = "yes"
            except CheckpointError:
                m, built = {}, "no (card unreadable: rebuild with --force)"
            if all(isinstance(m.get(k), int | float) for k in ("psnr", "baseline_psnr")):
                score = f"{m['psnr']:.2f} / {m['baseline_psnr']:.2f} ({m.get('baseline', '?')})"
        table.add_row(name, r.task, str(r.scale), r.arch, built, score, r.description)
    print_table(table)


@app.command("build")
def build_models(
    names: list[str] = typer.Argument(None, help="Models to build (default: all)."),
    profile: str = typer.Option("tiny", help=f"{', '.join(PROFILES)}: tiny for CI (about a minute), default for "
                                             "the CPU demo, full for GPU."),
    seed: int = typer.Option(0, help="Training seed."),
    force: bool = typer.Option(False, help="Retrain even when cached."),
    device: str = device_option(),
) -> None:
    """Train zoo victims (cached under $HEIST_DATA_DIR/zoo/PROFILE) and print their scores."""
    targets = names or ZOO.names()
    for name in targets:
        get_recipe(name)  # fail fast on unknown names, before any training
    pick_device(device)  # and on a bad --device, even when every model is cached
    with progress() as bar:
        for name in targets:
            cached = cached_checkpoint(name, profile, seed)
            if cached is not None and not force:
                console.print(f"{name}: cached at {cached} (seed {seed})")
                continue
            task = bar.add_task(f"{name} ({profile})", total=None, info="")

            def on_step(step: int, total: int, loss: float, task: int = task) -> None:
                bar.update(task, completed=step, total=total, info=f"loss {loss:.4f}")

            path = build(name, profile, seed=seed, force=force, device=device, on_step=on_step)
            m = read_card(path).metrics
            console.print(
                f"{name}: PSNR {m['psnr']:.2f} dB vs {m['baseline']} {m['baseline_psnr']:.2f} dB, "
                f"SSIM {m['ssim']:.3f} vs {m['baseline_ssim']:.3f} (benchmark split) -> {path}"
            )


@app.command("path")
def path(name: str, profile: str = typer.Option("tiny", help=f"Profile: {', '.join(PROFILES)}.")) -> None:
    """Print the checkpoint path of NAME at PROFILE (built or not)."""
    console.print(str(zoo_checkpoint(name, profile)), highlight=False)
