"""Zoo build time per model and profile, and what each victim scores against its baseline.

Usage: ``python bench/zoo.py [--profiles tiny default] [--models sr4x denoise25] [--out FILE]``. Prints JSON
and writes ``--out`` (default ``bench/results/zoo.json`` in the repository, wherever it is run from). Builds
into a temporary HEIST_DATA_DIR, removed at the end (on SIGTERM too), so the user's cache is untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, exit_on_sigterm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profiles", nargs="+", default=["tiny"])
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "zoo.json")
    args = ap.parse_args()
    data_dir = tempfile.mkdtemp(prefix="heist-bench-zoo-")
    os.environ["HEIST_DATA_DIR"] = data_dir
    try:
        exit_on_sigterm()
        import torch

        from translators.zoo import PROFILES, ZOO, build

        for bad, known, what in ((set(args.profiles) - set(PROFILES), PROFILES, "profiles"),
                                 (set(args.models or []) - set(ZOO.names()), ZOO.names(), "models")):
            if bad:
                ap.error(f"argument --{what}: unknown {', '.join(sorted(bad))} (known: {', '.join(sorted(known))})")
        rows = []
        for profile in args.profiles:
            for name in args.models or ZOO.names():
                t0 = time.perf_counter()
                path = build(name, profile, force=True)
                seconds = time.perf_counter() - t0
                card = json.loads(path.with_suffix(".json").read_text())
                m = card["metrics"]
                rows.append({
                    "model": name, "profile": profile, "build_seconds": round(seconds, 2),
                    "train_seconds": card["training"]["train_seconds"], "steps": card["training"]["steps"],
                    "parameters": card["training"]["parameters"], "psnr": m["psnr"], "baseline": m["baseline"],
                    "baseline_psnr": m["baseline_psnr"], "ssim": m["ssim"], "baseline_ssim": m["baseline_ssim"],
                    "psnr_gain_db": round(m["psnr"] - m["baseline_psnr"], 3),
                })
        out = {"benchmark": "zoo_build", "torch_threads": torch.get_num_threads(), "device": "cpu"
               if not torch.cuda.is_available() else torch.cuda.get_device_name(), "results": rows}
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    text = json.dumps(out, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
