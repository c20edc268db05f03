"""``heist corpus``: show and export the offline photo corpus and its splits."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from heist.cli.common import console, print_table
from translators.corpus import DEFAULT_SEED, SPLITS, available_photos, export_split, split_assignment

app = typer.Typer(help="The bundled photo corpus and its deterministic victim/attacker/benchmark splits.",
                  no_args_is_help=True)


@app.command("list")
def list_photos(seed: int = typer.Option(DEFAULT_SEED, help="Split seed.")) -> None:
    """List the bundled photos, their source package, size and split."""
    assignment = split_assignment(seed)
    table = Table(title=f"Bundled corpus (seed {seed})")
    for col in ("id", "split", "package", "size", "colour", "description"):
        table.add_column(col)
    photos = available_photos()
    for p in sorted(photos, key=lambda p: (SPLITS.index(assignment[p.id]), p.id)):
        table.add_row(p.id, assignment[p.id], p.package, "{}x{}".format(*p.size()), "yes" if p.color else "gray",
                      p.description)
    print_table(table)
    counts = {s: sum(1 for p in photos if assignment[p.id] == s) for s in SPLITS}
    console.print(", ".join(f"{s}: {n}" for s, n in counts.items()))


@app.command("export")
def export(
    out: Path = typer.Argument(..., help="Folder to write PNG files into (one subfolder per split)."),
    split: str = typer.Option("all", help="victim, attacker, benchmark or all."),
    seed: int = typer.Option(DEFAULT_SEED, help="Split seed."),
) -> None:
    """Export the corpus as PNG files, one subfolder per split."""
    splits = SPLITS if split == "all" else (split,)
    for s in splits:
        written = export_split(f"corpus:{s}", out / s, seed)
        console.print(f"{s}: {len(written)} images -> {out / s}")
