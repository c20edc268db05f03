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
