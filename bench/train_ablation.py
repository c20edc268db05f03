"""What each part of the surrogate training buys: the same harvested pairs, trained under several settings.

    .venv/bin/python bench/train_ablation.py                     # style-ink, 16 queries, 300 s a variant
    .venv/bin/python bench/train_ablation.py --victim sr4x --budget 16 --time-budget 90

One harvest with the CLI defaults (as ``heist attack harvest --budget B``: strategy ``crops``, crop size
from the budget and ``max_pixels``, ``corpus:attacker``) from a real victim server
(``victim_service.process``, zoo model at ``--zoo-profile``), then, on those pairs, one training run per
variant (:func:`attacker.train.train_surrogate`, ``--time-budget`` seconds, one torch thread, ``--arch
auto``), each scored against the victim on centre crops of the ``corpus:benchmark`` photos (PSNR, piq,
data_range 1, as ``bench/attack_fidelity.py``). Variants (``--variants`` picks a subset):

- ``round1``: the previous defaults: constant learning rate divided on plateaus (``schedule=plateau``),
  stop after 4 flat validations whatever the run's length (``plateau_fraction=0``), float32;
- ``cosine``: the cosine learning-rate schedule, the old plateau rule, float32;
- ``cosine-age``: cosine and the scale-free plateau rule (the best must be a quarter of the run old), float32;
- ``default``: today's defaults (the above plus bfloat16 autocast where the CPU has it);
- ``stripes``: today's defaults but a held-out stripe of every pair instead of whole held-out pairs
  (``val_split=stripes``; a negative result, see ``attacker.train``).
- ``no-plateau``: today's defaults without the plateau rule (no drops, no early stop: the cosine schedule
  runs to the time budget);
- ``resunet`` / ``resunet-pw2``: ``--arch resunet`` without / with two 1x1 conv layers at full
  resolution before the tail (``arch_kwargs.pointwise = 2``: per-pixel nonlinear capacity for tone
  curves, posterisation and thresholds; an exploratory result, docs/attacker.md);
- ``unet-res``: the residual U-Net (``--arch unet-l2`` with ``arch_kwargs.residual = true``), stopped at its
  profile's step cap (600 for ``small``);
- ``unet-res-uncapped``: the same without the step cap (``steps = 10**6``): the time budget decides;
- ``sources`` / ``unet-res-sources``: today's defaults / ``unet-res-uncapped``, holding out whole source
  photos instead of pairs (``val_split = "sources"``): does held-out PSNR on unseen photos rank the
  surrogate families the way the benchmark photos do?
- ``ema`` / ``ema-fast``: today's defaults with a moving average of the weights (``ema`` 0.999 / 0.99).
- ``no-augment``: today's defaults without the dihedral augmentation of training crops (a victim served by a
  strided CNN is not flip-equivariant; the augmentation averages its 8 dihedral versions).
- ``align8`` / ``align8-no-augment``: training crops (and held-out centre crops) at offsets that are multiples
  of 8 input pixels from the query's corner, with / without the dihedral augmentation (a strided victim's
  output depends on a pixel's position modulo its stride; aligned crops keep that phase fixed).
- ``resunet-c2`` / ``resunet-b32c2`` / ``resunet-l4c2``: ``--arch resunet`` with more capacity than the
  ``small`` profile's (base 16, 3 levels, 1 conv a level): 2 convs a level; and base 32; and 4 levels.

Every variant is channels-last (not switchable). Prints JSON and writes
``bench/results/train_ablation-VICTIM-BUDGET.json`` after every variant (``partial`` until the last).
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
sys.path.insert(0, str(ROOT / "bench"))

from _common import exit_on_sigterm  # noqa: E402
from attack_fidelity import bench_set, start_bench_service  # noqa: E402

from attacker.fidelity import baseline, psnr_ssim_l2, translate  # noqa: E402
from attacker.harvest import harvest  # noqa: E402
from attacker.train import train_surrogate  # noqa: E402
from translators.checkpoint import load_model  # noqa: E402
from translators.files import atomic_write_json  # noqa: E402
from translators.zoo import get_recipe  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "round1": {"schedule": "plateau", "plateau_fraction": 0.0, "amp": False},
    "cosine": {"plateau_fraction": 0.0, "amp": False},
    "cosine-age": {"amp": False},
    "default": {},
    "stripes": {"val_split": "stripes"},
    "no-plateau": {"patience": 1_000_000},
    "resunet": {"arch": "resunet"},
    "resunet-pw2": {"arch": "resunet", "arch_kwargs": {"pointwise": 2}},
    "unet-res": {"arch": "unet-l2", "arch_kwargs": {"residual": True}},
    "unet-res-uncapped": {"arch": "unet-l2", "arch_kwargs": {"residual": True}, "steps": 10**6},
    "sources": {"val_split": "sources"},
    "unet-res-sources": {"arch": "unet-l2", "arch_kwargs": {"residual": True}, "steps": 10**6, "val_split": "sources"},
    "ema": {"ema": 0.999},
    "ema-fast": {"ema": 0.99},
    "no-augment": {"augment": False},
    "align8": {"align": 8},
    "align8-no-augment": {"align": 8, "augment": False},
    "resunet-c2": {"arch": "resunet", "arch_kwargs": {"convs": 2}},
    "resunet-b32c2": {"arch": "resunet", "arch_kwargs": {"base": 32, "convs": 2}},
    "resunet-l4c2": {"arch": "resunet", "arch_kwargs": {"levels": 4, "convs": 2}},
}
log = logging.getLogger("bench.train_ablation")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--victim", default="style-ink")
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--zoo-profile", default="default")
    ap.add_argument("--time-budget", type=float, default=300.0)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/train_ablation-VICTIM-BUDGET.json")
    args = ap.parse_args()
    exit_on_sigterm()  # servers stopped, temporary folders removed on SIGTERM too
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    out = args.out or ROOT / "bench" / "results" / f"train_ablation-{args.victim}-{args.budget}.json"
    recipe = get_recipe(args.victim)
    rows: list[dict[str, Any]] = []
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-train-ablation-") as tmp:
        svc, key = start_bench_service(Path(tmp), [args.victim], args.zoo_profile, threads=1)
        try:
            with httpx.Client(base_url=svc.url, timeout=300) as http:
                bench = bench_set(http, key, args.victim, 256)
            run = Path(tmp) / "run"
            h = harvest(svc.url, key, args.victim, run, budget=args.budget, seed=args.seed, durable=False)
        finally:
            svc.stop()
        base = [psnr_ssim_l2(baseline(x, recipe.scale), v)["psnr"] for x, _, v in bench]
        for name in names:
            opts = VARIANTS[name]
            t0 = time.monotonic()
            tr = train_surrogate(run, Path(tmp) / f"sur-{name}", seed=args.seed, device="cpu",
                                 time_budget=args.time_budget, **opts)
            sur = load_model(tr.checkpoint).module
            b = [psnr_ssim_l2(translate(sur, x), v)["psnr"] for x, _, v in bench]
            rows.append({"variant": name, "options": opts, "surrogate": tr.summary["kind"], "steps": tr.steps,
                         "stop_reason": tr.summary["stop_reason"], "amp_dtype": tr.summary["amp_dtype"],
                         "B_psnr": round(statistics.fmean(b), 3), "B_psnr_per_image": [round(v, 2) for v in b],
                         "held_out": tr.held_out, "held_out_psnr": round(tr.fidelity["psnr"], 3),
                         "seconds": round(time.monotonic() - t0, 1)})
            log.warning("%s", json.dumps(rows[-1]))
            result = {"benchmark": "train_ablation", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "victim": args.victim, "zoo_profile": args.zoo_profile, "budget": args.budget,
                      "pairs": h.pairs, "crop_size": h.summary["strategy"]["crop_size"],
                      "time_budget_s": args.time_budget, "torch_threads": 1, "cpu_count": os.cpu_count(),
                      "seed": args.seed, "bench_images": "corpus:benchmark centre crops, 256 px",
                      "baseline": "bicubic" if recipe.scale > 1 else "identity",
                      "baseline_psnr": round(statistics.fmean(base), 3),
                      "wall_s": round(time.monotonic() - t_start, 1), "partial": name != names[-1], "rows": rows}
            atomic_write_json(out, result)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
