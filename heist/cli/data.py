"""``heist data``: list, fetch and inspect public datasets and image specs.

Library code lives in :mod:`translators.datasets` (registry, fetch) and :mod:`translators.download`
(resumable download, verification, safe extraction); this module is thin glue with a progress bar.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from heist.cli.common import console, err_console, print_table
from translators.corpus import DEFAULT_SEED, image_sizes
from translators.datasets import DATASETS, MIRROR_ENV, fetch, get_dataset
from translators.errors import HeistError
from translators.paths import datasets_dir, file_in_the_way

app = typer.Typer(help="Public datasets the papers use (DIV2K, Set5, Set14, BSD100, Urban100, monet2photo, "
                  "facades): list, fetch with resume and checksum verification, inspect.", no_args_is_help=True)


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


@app.command("list")
def list_datasets(
    dest: Path = typer.Option(None, "--dest", help="Datasets folder (default: $HEIST_DATA_DIR/datasets)."),
) -> None:
    """List the known datasets: size, which checksum is verified, subsets and whether it is fetched."""
    root = dest or datasets_dir()
    if (blocked := file_in_the_way(root)) is not None:  # every dataset would read "not fetched"
        raise HeistError(f"--dest {root}: {blocked} is a file, not a folder")
    table = Table(title=f"Datasets ({root})")
    for col in ("name", "size", "checksum", "subsets (default*)", "fetched", "used for"):
        table.add_column(col)
    for spec in DATASETS.values():
        subsets = ", ".join(f"{k}*" if k == spec.default_subset else k for k in spec.subsets)
        table.add_row(spec.name, _human(spec.size), spec.checksum_kind, subsets,
                      "yes" if spec.is_fetched(root) else "no", spec.used_by)
    print_table(table)
    console.print(f"Mirror: set {MIRROR_ENV}=BASE_URL to download BASE_URL/<archive>. "
                  "Checksums are verified only where a published one is known (column 'checksum').")


@app.command("fetch")
def fetch_cmd(
    name: str = typer.Argument(..., help="Dataset name (see `heist data list`)."),
    dest: Path = typer.Option(None, "--dest", help="Datasets folder (default: $HEIST_DATA_DIR/datasets)."),
    url: str = typer.Option(None, "--url", help="Download from this URL instead of the canonical one."),
    sha256: str = typer.Option(None, "--sha256", help="Expected sha256 (overrides the registry's checksums)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check size and checksum when known."),
    force: bool = typer.Option(False, "--force", help="Fetch again even if already fetched."),
    keep_archive: bool = typer.Option(False, "--keep-archive", help="Keep the downloaded archive."),
    retries: int = typer.Option(5, "--retries", min=0, help="Network failures in a row before giving up."),
) -> None:
    """Download (resumable), verify and extract a dataset; prints the folder of its images."""
    spec = get_dataset(name)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would bury the progress bar
    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(spec.name, total=spec.size)

        def on_progress(done: int, total: int | None) -> None:
            stage = f"{spec.name}: verifying, extracting" if total is not None and done >= total else spec.name
            bar.update(task, completed=done, total=total, description=stage)

        result = fetch(spec.name, dest, url=url, sha256=sha256, verify=verify, force=force,
                       keep_archive=keep_archive, progress=on_progress, retries=retries)
    if result.already_present:
        console.print(f"{result.name}: already fetched ({result.files} files)")
    else:
        console.print(f"{result.name}: {result.files} files, sha256 {result.sha256} (verified: {result.verified})")
    console.print(f"images: {result.images_dir}")


@app.command("inspect")
def inspect(
    spec: str = typer.Argument(..., help="corpus:victim|attacker|benchmark|all, dataset:NAME[:SUBSET] or a folder."),
    seed: int = typer.Option(DEFAULT_SEED, help="Corpus split seed."),
) -> None:
    """Resolve an images spec (as every --images option does) and list its images and their upright sizes
    (EXIF orientation applied, as they load); hidden files are left out, unreadable ones reported on stderr."""
    sizes = image_sizes(spec, seed)
    table = Table(title=f"{spec}: {len(sizes)} images")
    table.add_column("name")
    table.add_column("size (WxH)")
    for name, w, h in sizes:
        table.add_row(name, f"{w}x{h}")
    print_table(table)
