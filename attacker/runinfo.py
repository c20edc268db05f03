"""``run.json``: the summary of one attacker run folder, updated section by section.

Sections: ``target`` (URL, model, public model info), ``harvest``, ``train``, ``imitate``. Each update is
a read-modify-write under a short ``flock`` and lands atomically (temp file + rename), so a reader never
sees half a file and concurrent harvest/train processes do not lose each other's sections.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from attacker.files import read_json
from translators.files import atomic_write_json, file_lock

RUN_JSON = "run.json"
FORMAT_VERSION = 1


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The run summary, or ``{}`` when the folder has none yet."""
    return read_json(Path(run_dir) / RUN_JSON) or {}


def update_run(run_dir: str | Path, **sections: Any) -> dict[str, Any]:
    """Replace the given top-level sections of ``run.json`` (others are kept); returns the new summary."""
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    with file_lock(d / ".run.json.lock"):
        run = read_json(d / RUN_JSON) or {}
        run.update(sections)
        run["format_version"] = FORMAT_VERSION
        run["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        atomic_write_json(d / RUN_JSON, run)
    return run
