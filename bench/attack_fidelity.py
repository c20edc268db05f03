"""Surrogate fidelity against query budget: steal zoo victims through the real API, score on the benchmark split.

    .venv/bin/python bench/attack_fidelity.py                                  # default zoo victims
    .venv/bin/python bench/attack_fidelity.py --zoo-profile tiny --budgets 1,4,16 --steps 200   # small run

For each task (``sr4x``, ``denoise25``) a real victim server (``victim_service.process``, unlimited tier)
serves the zoo model at ``--zoo-profile``. For each budget ``b`` the attacker harvests ``b`` queries
(strategy ``crops``: ``--crop-sr`` low-resolution pixels a side for SR, ``--crop-denoise`` for denoising,
with Gaussian noise of ``--noise-sigma`` added: by default 25, queries from the victim's own domain as in
the extraction paper's threat model; ``auto`` is the CLI's agnostic prior, sigma uniform in [0, 50]), then
trains the auto surrogate (SRResNet for SR, L2 U-Net for denoising) at ``--surrogate-profile`` for
``--steps`` steps, the same for every budget, so only the data changes.

Scores on centre crops (``--bench-side`` target pixels) of every ``corpus:benchmark`` photo, built with
the recipe's ``make_pair`` (bicubic x4 down; Gaussian sigma 25): the extraction paper's cells

- B: surrogate vs victim (the attacker's proxy; PSNR dB, SSIM), next to the trivial baseline (bicubic or
  identity) vs victim, measured in the same run - ``gain_db`` is B minus the baseline;
- A: victim vs ground truth and C: surrogate vs ground truth.

PSNR/SSIM via ``piq``, data_range 1, RGB, no border crop (:mod:`attacker.fidelity`). Victim outputs come
from the API (PNG, 8-bit). Prints JSON and writes ``bench/results/attack_fidelity.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attacker.fidelity import baseline, psnr_ssim_l2, translate  # noqa: E402
from attacker.harvest import harvest  # noqa: E402
from attacker.train import train_surrogate  # noqa: E402
from translators.checkpoint import load_model  # noqa: E402
from translators.codecs import decode_image, encode_image  # noqa: E402
from translators.corpus import load_images  # noqa: E402
from translators.images import center_crop  # noqa: E402
from translators.zoo import get_recipe  # noqa: E402
from victim_service.process import start_service  # noqa: E402
from victim_service.settings import Settings  # noqa: E402

log = logging.getLogger("bench.attack_fidelity")


def mean(xs: list[float]) -> float:
    return round(statistics.fmean(xs), 4)


def spread(xs: list[float]) -> float:
    return round(statistics.pstdev(xs), 4) if len(xs) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="sr4x,denoise25")
    ap.add_argument("--budgets", default="1,4,16,64,256")
    ap.add_argument("--zoo-profile", default="default")
    ap.add_argument("--surrogate-profile", default="tiny")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--crop-sr", type=int, default=64, help="LR crop side per SR query")
    ap.add_argument("--crop-denoise", type=int, default=128, help="crop side per denoising query")
    ap.add_argument("--bench-side", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise-sigma", default="25",
                    help="denoising queries: sigma (0..255) or LO:HI, or auto (= 0:50, the CLI default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "attack_fidelity.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    budgets = [int(b) for b in args.budgets.split(",")]
    t_start = time.monotonic()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-attack-fidelity-") as tmp:
        key = f"hk_bench_{os.urandom(8).hex()}"
        settings = Settings.from_mapping({
            "models": [{"name": t, "source": f"zoo:{t}@{args.zoo_profile}", "max_batch": 1} for t in tasks],
            "tiers": {"open": {"rate": None}}, "keys": [{"name": "bench", "tier": "open", "key": key}],
            "data_dir": str(Path(tmp) / "data"), "torch_threads": args.threads, "query_log": {"backend": "off"},
        })
        settings.to_json_file(Path(tmp) / "settings.json")
        svc = start_service(Path(tmp) / "settings.json", log_path=Path(tmp) / "server.log", ready_timeout=3600)
        try:
            for task in tasks:
                recipe = get_recipe(task)
                bench = []
                with httpx.Client(base_url=svc.url, timeout=120) as http:
                    for i, im in enumerate(load_images("corpus:benchmark")):
                        side = min(args.bench_side, *im.image.shape[-2:])
                        x, gt = recipe.make_pair(center_crop(im.image, side - side % recipe.scale), seed=10_000 + i)
                        r = http.post(f"/v1/models/{task}/translate", content=encode_image(x),
                                      headers={"X-API-Key": key, "Content-Type": "image/png"})
                        r.raise_for_status()
                        bench.append((x, gt, decode_image(r.content)))
                cell_a = [psnr_ssim_l2(v, gt) for _, gt, v in bench]
                base_b = [psnr_ssim_l2(baseline(x, recipe.scale), v) for x, _, v in bench]
                crop = args.crop_sr if recipe.scale > 1 else args.crop_denoise
                params: dict[str, Any] = {"crop_size": crop}
                if recipe.task == "denoise" and args.noise_sigma != "auto":
                    lo, _, hi = args.noise_sigma.partition(":")
                    params["noise_sigma"] = (float(lo), float(hi or lo))
                for b in budgets:
                    t0 = time.monotonic()
                    run = Path(tmp) / f"{task}-{b}"
                    h = harvest(svc.url, key, task, run, budget=b, strategy="crops", seed=args.seed,
                                strategy_params=params, durable=False)
                    tr = train_surrogate(run, profile=args.surrogate_profile, steps=args.steps, seed=args.seed,
                                         device="cpu", val_every=args.steps)
                    sur = load_model(tr.checkpoint).module
                    outs = [translate(sur, x) for x, _, _ in bench]
                    cell_b = [psnr_ssim_l2(s, v) for s, (_, _, v) in zip(outs, bench)]
                    cell_c = [psnr_ssim_l2(s, gt) for s, (_, gt, _) in zip(outs, bench)]
                    row = {
                        "task": task, "budget": b, "pairs": h.pairs, "input_pixels": h.summary["input_pixels"],
                        "surrogate": tr.summary["kind"], "arch": tr.summary["arch"], "steps": args.steps,
                        "B_psnr": mean([c["psnr"] for c in cell_b]), "B_psnr_sd": spread([c["psnr"] for c in cell_b]),
                        "B_ssim": mean([c["ssim"] for c in cell_b]),
                        "baseline": "bicubic" if recipe.scale > 1 else "identity",
                        "baseline_psnr": mean([c["psnr"] for c in base_b]),
                        "baseline_ssim": mean([c["ssim"] for c in base_b]),
                        "A_psnr": mean([c["psnr"] for c in cell_a]), "A_ssim": mean([c["ssim"] for c in cell_a]),
                        "C_psnr": mean([c["psnr"] for c in cell_c]), "C_ssim": mean([c["ssim"] for c in cell_c]),
                        "held_out_psnr": round(tr.fidelity["psnr"], 3), "seconds": round(time.monotonic() - t0, 1),
                    }
                    row["gain_db"] = round(row["B_psnr"] - row["baseline_psnr"], 3)
                    rows.append(row)
                    log.warning("%s", json.dumps(row))
        finally:
            svc.stop()
    result = {
        "benchmark": "attack_fidelity", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "zoo_profile": args.zoo_profile, "surrogate_profile": args.surrogate_profile, "steps": args.steps,
        "bench_images": "corpus:benchmark centre crops", "bench_side": args.bench_side,
        "metric": "piq PSNR/SSIM, data_range 1, RGB, no border crop",
        "crop_per_query": {"sr": args.crop_sr, "denoise": args.crop_denoise},
        "denoise_query_noise_sigma": args.noise_sigma, "cpu_count": os.cpu_count(),
        "torch_threads": args.threads, "wall_s": round(time.monotonic() - t_start, 1), "rows": rows,
    }
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
