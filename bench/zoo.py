"""Zoo build time per model and profile, and what each victim scores against its baseline.

Usage: ``python bench/zoo.py [--profiles tiny default] [--models sr4x denoise25]``. Prints JSON and writes
``bench/results/zoo.json``. Builds into a temporary HEIST_DATA_DIR so the user's cache is untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profiles", nargs="+", default=["tiny"])
    ap.add_argument("--models", nargs="+", default=None)
    args = ap.parse_args()
    os.environ["HEIST_DATA_DIR"] = tempfile.mkdtemp(prefix="heist-bench-zoo-")
    import torch

    from translators.zoo import ZOO, build

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
    text = json.dumps(out, indent=2)
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/zoo.json").write_text(text)
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
