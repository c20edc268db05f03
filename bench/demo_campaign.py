"""Benchmark: the demo campaign's wall time by phase and its peak memory, as a fresh clone would see it.

Runs ``heist campaign run configs/campaigns/demo.toml`` in a subprocess with an empty Heist data dir
(so the zoo is built, not read from a cache) and a new output folder, then prints the campaign's own
``wall_times`` (zoo, service, utility, harvest, training, evaluation, report, total; seconds) and
``peak_memory_mb`` (the campaign process's peak RSS) from the ``results.json`` it wrote, plus the
outer wall time and the headline fidelity table (surrogate vs clean victim PSNR per victim, defense
and budget) so the numbers can be checked against the report.

``--keep-zoo`` reuses the user's zoo cache instead (measures everything but the zoo build).

Run: ``.venv/bin/python bench/demo_campaign.py [--config configs/campaigns/demo.toml] [--keep-zoo]
[--out CAMPAIGN_FOLDER] [--json-out FILE]``; prints JSON and writes ``--json-out`` (default
``bench/results/demo_campaign.json`` in the repository). Takes about 5 minutes on 2 CPU cores. SIGTERM is passed
on to the campaign (SIGTERM, then SIGKILL after 30 s) and the temporary folder is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from _common import RESULTS as RESULTS_DIR
from _common import ROOT, exit_on_sigterm

from evaluation.results import read_results

RESULTS = RESULTS_DIR / "demo_campaign.json"


def config_label(config: str) -> str:
    """The config as the JSON records it: relative to the repository when inside it, else the absolute path."""
    path = Path(config).expanduser().resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def run_campaign(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``cmd`` to its end; stopped with SIGTERM (SIGKILL after 30 s) if this process is stopped meanwhile."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "campaigns" / "demo.toml"))
    ap.add_argument("--keep-zoo", action="store_true", help="use the user's zoo cache instead of an empty one")
    ap.add_argument("--out", default=None, help="campaign output folder (default: a new temporary one)")
    ap.add_argument("--json-out", type=Path, default=RESULTS,
                    help="the benchmark's JSON (default: bench/results/demo_campaign.json in the repository)")
    args = ap.parse_args()
    if not Path(args.config).expanduser().is_file():
        ap.error(f"argument --config: {args.config}: no such file")
    exit_on_sigterm()

    with tempfile.TemporaryDirectory(prefix="heist-bench-demo-") as tmp:
        env = {**os.environ}
        if not args.keep_zoo:
            env["HEIST_DATA_DIR"] = str(Path(tmp) / "data")
        out = Path(args.out).expanduser().resolve() if args.out else Path(tmp) / "demo"
        t0 = time.perf_counter()
        proc = run_campaign([sys.executable, "-m", "heist.cli.main", "campaign", "run",
                             str(Path(args.config).expanduser().resolve()), "--out", str(out)], env)
        outer = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            return proc.returncode
        results = read_results(out / "results.json")

    fidelity = [
        {"victim": c.victim, "defense": c.defense, "budget": c.budget, "strategy": c.strategy,
         "psnr_vs_victim": round(c.fidelity.metrics["psnr"].summary.mean, 2) if c.fidelity else None,
         "ssim_vs_victim": round(c.fidelity.metrics["ssim"].summary.mean, 4) if c.fidelity else None}
        for c in results.cells
    ]
    honest = [
        {"victim": u.victim, "defense": u.defense,
         "psnr_defended_vs_clean": round(u.defended_vs_clean.metrics["psnr"].summary.mean, 2)}
        for u in results.utility
    ]
    report = {
        "benchmark": "demo_campaign",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config_label(args.config),
        "zoo": "cached" if args.keep_zoo else "built from scratch (empty HEIST_DATA_DIR)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "wall_s_outer": round(outer, 1),
        "wall_times_s": results.wall_times,
        "peak_memory_mb": results.peak_memory_mb,
        "cells": len(results.cells),
        "failed_cells": sum(c.status != "done" for c in results.cells),
        "fidelity": fidelity,
        "honest_cost": honest,
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
