"""Where Heist keeps its data: ``$HEIST_DATA_DIR`` or the XDG data dir (``~/.local/share/heist``)."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """Root data folder; created on first use. Override with ``HEIST_DATA_DIR``."""
    env = os.environ.get("HEIST_DATA_DIR")
    if env:
        root = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        root = Path(xdg) / "heist"
    root.mkdir(parents=True, exist_ok=True)
    return root


def zoo_dir() -> Path:
    """Cache of built victim-zoo checkpoints: ``data_dir()/zoo/<profile>/<name>.safetensors``."""
    return data_dir() / "zoo"


def datasets_dir() -> Path:
    """Downloaded public datasets (``heist data fetch``)."""
    return data_dir() / "datasets"


def file_in_the_way(folder: str | Path) -> Path | None:
    """The existing non-folder that stops ``folder`` from being (or becoming) a folder: ``folder`` itself
    or a folder above it; None when nothing is in the way. Every ``--out FOLDER`` check uses this, so a
    bad path is refused before any work is done."""
    p = Path(folder)
    return next((q for q in (p, *p.parents) if q.exists() and not q.is_dir()), None)
