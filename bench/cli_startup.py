"""Benchmark: start-up time of the ``heist`` command, against the imports it cannot avoid, same run.

Every ``heist`` command (and every test that runs one as a subprocess) pays for what ``heist.cli.main``
imports before it parses its arguments. Measured as wall time of a fresh interpreter, in seconds:

- ``torch_floor``:   ``python -c "import torch"`` (what any command that touches a model pays anyway);
- ``heist_help``:    ``heist --help`` (the CLI's start-up as users see it);
- ``eager_piq``:     ``python -c "import piq, heist.cli.main"``: the start-up as it was when piq (which
  imports torchvision and torch._dynamo) was imported at the top of the metric modules; the baseline;
- ``piq_now``:       ``python -c "import heist.cli.main"`` (the same imports without piq).

The variants run in alternating order, ``--repeats`` rounds; times are medians. ``speedup`` is the median
of the per-round ratios ``eager_piq / piq_now`` (> 1: today's start-up is faster), and ``over_floor`` is
``heist_help - torch_floor`` (what the CLI adds on top of torch).

Run: ``.venv/bin/python bench/cli_startup.py [--repeats 7] [--out FILE]``; prints JSON and writes
``bench/results/cli_startup.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from _common import int_range

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "cli_startup.json"
HEIST = ROOT / ".venv" / "bin" / "heist"


def commands() -> dict[str, list[str]]:
    py = sys.executable
    return {
        "torch_floor": [py, "-c", "import torch"],
        "heist_help": [str(HEIST), "--help"],
        "eager_piq": [py, "-c", "import piq, heist.cli.main"],
        "piq_now": [py, "-c", "import heist.cli.main"],
    }


def label(cmd: list[str]) -> list[str]:
    """``cmd`` as the JSON records it: the interpreter as ``python``, paths relative to the repository."""
    head = "python" if cmd[0] == sys.executable else os.path.relpath(cmd[0], ROOT)
    return [head, *cmd[1:]]


def wall(cmd: list[str]) -> float:
    """Seconds from spawn to exit of ``cmd``; fails loudly when the command fails."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env={**os.environ, "COLUMNS": "120"})
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int_range(1), default=7)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    cmds = commands()
    names = list(cmds)
    for name in names:  # warm the page cache once so the first round is not a cold-disk outlier
        wall(cmds[name])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(wall(cmds[name]))
    ratios = [a / b for a, b in zip(times["eager_piq"], times["piq_now"], strict=True)]
    med = {n: round(statistics.median(v), 3) for n, v in times.items()}
    result = {
        "bench": "cli_startup",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "settings": {"repeats": args.repeats, "commands": {n: " ".join(label(c)) for n, c in cmds.items()}},
        "median_s": med,
        "speedup": round(statistics.median(ratios), 3),
        "over_floor_s": round(med["heist_help"] - med["torch_floor"], 3),
        "raw_s": {n: [round(t, 3) for t in v] for n, v in times.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
