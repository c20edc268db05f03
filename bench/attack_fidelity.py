"""Surrogate fidelity against query budget for every zoo victim, with the trivial baseline in the same table.

    .venv/bin/python bench/attack_fidelity.py                         # every zoo victim, CLI defaults
    .venv/bin/python bench/attack_fidelity.py --zoo-profile tiny --budgets 1,16 --time-budget 30   # small run
    .venv/bin/python bench/attack_fidelity.py --device cuda --surrogate-profile full   # GPU

A real victim server (``victim_service.process``, unlimited tier) serves every zoo model at
``--zoo-profile``. For each victim and budget ``b`` the attacker does what ``heist attack harvest
--budget b`` and ``heist attack train`` do with their defaults: strategy ``crops`` with the crop size
chosen from the budget and the model's ``max_pixels`` (:meth:`attacker.strategies.QueryStrategy.auto_crop_size`),
queries from ``corpus:attacker``, noise ``auto`` (uniform sigma in [0, 50] for denoising: the attacker
knows the task, not the noise level), ``--arch auto`` (tries ``resunet`` and the papers' surrogate, keeps
the better on held-out pairs), training until held-out PSNR stops improving or ``--time-budget``
seconds pass. Only ``--time-budget`` differs from the CLI's 300 s when given.

Scores on centre crops (``--bench-side`` target pixels, cut to the model's size multiple) of every
``corpus:benchmark`` photo, never seen by victim or attacker, built with the recipe's ``make_pair``:

- B: surrogate vs victim (PSNR dB, SSIM), next to the trivial baseline (bicubic or identity) vs victim,
  measured in the same run; ``gain_db`` is B minus the baseline;
- A: victim vs ground truth and C: surrogate vs ground truth (the extraction paper's cells).

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

from _common import device as device_arg  # noqa: E402
from _common import exit_on_sigterm  # noqa: E402

from attacker.fidelity import baseline, psnr_ssim_l2, translate  # noqa: E402
from attacker.harvest import harvest  # noqa: E402
from attacker.train import train_surrogate  # noqa: E402
from translators.checkpoint import load_model  # noqa: E402
from translators.codecs import decode_image, encode_image  # noqa: E402
from translators.corpus import load_images  # noqa: E402
from translators.files import atomic_write_json  # noqa: E402
from translators.images import center_crop  # noqa: E402
from translators.zoo import ZOO, get_recipe  # noqa: E402
from victim_service.process import start_service  # noqa: E402
from victim_service.settings import Settings  # noqa: E402

log = logging.getLogger("bench.attack_fidelity")


def mean(xs: list[float]) -> float:
    return round(statistics.fmean(xs), 4)


def spread(xs: list[float]) -> float:
    return round(statistics.pstdev(xs), 4) if len(xs) > 1 else 0.0


def bench_set(http: httpx.Client, key: str, name: str, side: int) -> list[tuple[torch.Tensor, ...]]:
    """``(input, ground truth, victim output)`` for centre crops of every benchmark photo."""
    recipe = get_recipe(name)
    info = next(m for m in http.get("/v1/models", headers={"X-API-Key": key}).json() if m["name"] == name)
    mult = max(1, int(info.get("size_multiple", 1))) * recipe.scale
    out = []
    for i, im in enumerate(load_images("corpus:benchmark")):
        s = min(side, *im.image.shape[-2:])
        x, gt = recipe.make_pair(center_crop(im.image, s - s % mult), seed=10_000 + i)
        r = http.post(f"/v1/models/{name}/translate", content=encode_image(x),
                      headers={"X-API-Key": key, "Content-Type": "image/png"})
        r.raise_for_status()
        out.append((x, gt, decode_image(r.content)))
    return out


def start_bench_service(tmp: Path, victims: list[str], zoo_profile: str, threads: int) -> tuple[Any, str]:
    """A real victim server (unlimited tier, no query log) serving ``victims`` at ``zoo_profile`` (built on
    first use); returns the running service and its API key. The caller stops it."""
    key = f"hk_bench_{os.urandom(8).hex()}"
    settings = Settings.from_mapping({
        "models": [{"name": t, "source": f"zoo:{t}@{zoo_profile}", "max_batch": 1} for t in victims],
        "tiers": {"open": {"rate": None}}, "keys": [{"name": "bench", "tier": "open", "key": key}],
        "data_dir": str(tmp / "data"), "torch_threads": threads, "query_log": {"backend": "off"},
    })
    settings.to_json_file(tmp / "settings.json")
    return start_service(tmp / "settings.json", log_path=tmp / "server.log", ready_timeout=3600), key


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: victim, budget, surrogate vs victim, baseline vs victim, gain."""
    lines = ["| victim | queries | input px | surrogate | B: surrogate vs victim dB | baseline vs victim | gain dB |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['victim']} | {r['budget']} | {r['input_pixels']} | {r['surrogate']} | {r['B_psnr']:.2f} "
                     f"| {r['baseline_psnr']:.2f} ({r['baseline']}) | {r['gain_db']:+.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--victims", default="all", help="comma-separated zoo names, or all")
    ap.add_argument("--budgets", default="1,4,16,64,256")
    ap.add_argument("--zoo-profile", default="default")
    ap.add_argument("--surrogate-profile", default="small", help="the CLI default is small")
    ap.add_argument("--arch", default="auto")
    ap.add_argument("--strategy", default="crops", help="harvest strategy (the CLI default is crops)")
    ap.add_argument("--strategy-params", type=json.loads, default=None,
                    help='JSON object of strategy parameters, e.g. \'{"zoom": [0.35, 1]}\' (CLI default: none)')
    ap.add_argument("--images", default="corpus:attacker", help="the thief's photos (corpus:SPLIT or a folder)")
    ap.add_argument("--time-budget", type=float, default=300.0, help="training seconds per run (CLI default 300)")
    ap.add_argument("--bench-side", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (checked at once)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "attack_fidelity.json")
    args = ap.parse_args()
    exit_on_sigterm()  # SIGTERM stops the victim server and removes the temporary folder, as Ctrl-C does
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    victims = sorted(ZOO.names()) if args.victims == "all" else args.victims.split(",")
    budgets = [int(b) for b in args.budgets.split(",")]
    t_start = time.monotonic()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-attack-fidelity-") as tmp:
        svc, key = start_bench_service(Path(tmp), victims, args.zoo_profile, args.threads)
        try:
            for name in victims:
                recipe = get_recipe(name)
                with httpx.Client(base_url=svc.url, timeout=300) as http:
                    bench = bench_set(http, key, name, args.bench_side)
                cell_a = [psnr_ssim_l2(v, gt) for _, gt, v in bench]
                base_b = [psnr_ssim_l2(baseline(x, recipe.scale), v) for x, _, v in bench]
                for b in budgets:
                    t0 = time.monotonic()
                    run = Path(tmp) / f"{name}-{b}"
                    h = harvest(svc.url, key, name, run, budget=b, seed=args.seed, durable=False,
                                strategy=args.strategy, images=args.images,
                                strategy_params=args.strategy_params)
                    tr = train_surrogate(run, arch=args.arch, profile=args.surrogate_profile, seed=args.seed,
                                         device=args.device, time_budget=args.time_budget)
                    sur = load_model(tr.checkpoint).module
                    outs = [translate(sur, x) for x, _, _ in bench]
                    cell_b = [psnr_ssim_l2(s, v) for s, (_, _, v) in zip(outs, bench)]
                    cell_c = [psnr_ssim_l2(s, gt) for s, (_, gt, _) in zip(outs, bench)]
                    row = {
                        "victim": name, "task": recipe.task, "scale": recipe.scale, "budget": b, "pairs": h.pairs,
                        "crop_size": h.summary["strategy"]["crop_size"], "input_pixels": h.summary["input_pixels"],
                        "surrogate": tr.summary["kind"], "auto": (tr.summary["auto"] or {}).get("trial_psnr"),
                        "arch": tr.summary["arch"], "steps": tr.steps, "stop_reason": tr.summary["stop_reason"],
                        "B_psnr": mean([c["psnr"] for c in cell_b]), "B_psnr_sd": spread([c["psnr"] for c in cell_b]),
                        "B_ssim": mean([c["ssim"] for c in cell_b]),
                        "B_psnr_per_image": [round(c["psnr"], 2) for c in cell_b],
                        "baseline": "bicubic" if recipe.scale > 1 else "identity",
                        "baseline_psnr": mean([c["psnr"] for c in base_b]),
                        "baseline_ssim": mean([c["ssim"] for c in base_b]),
                        "A_psnr": mean([c["psnr"] for c in cell_a]), "A_ssim": mean([c["ssim"] for c in cell_a]),
                        "C_psnr": mean([c["psnr"] for c in cell_c]), "C_ssim": mean([c["ssim"] for c in cell_c]),
                        "held_out_psnr": round(tr.fidelity["psnr"], 3), "beats_baseline_held_out":
                        tr.summary["beats_baseline"], "seconds": round(time.monotonic() - t0, 1),
                    }
                    row["gain_db"] = round(row["B_psnr"] - row["baseline_psnr"], 3)
                    rows.append(row)
                    log.warning("%s", json.dumps(row))
                    write(args, rows, budgets, victims, time.monotonic() - t_start, partial=True)
        finally:
            svc.stop()
    sys.stdout.write(json.dumps(write(args, rows, budgets, victims, time.monotonic() - t_start), indent=2) + "\n")


def write(args: argparse.Namespace, rows: list[dict[str, Any]], budgets: list[int], victims: list[str],
          wall_s: float, partial: bool = False) -> dict[str, Any]:
    """Write the result file (after every row too, marked ``partial``, so a stopped run keeps its rows)."""
    result = {
        "benchmark": "attack_fidelity", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "zoo_profile": args.zoo_profile, "surrogate_profile": args.surrogate_profile, "arch": args.arch,
        "time_budget_s": args.time_budget, "seed": args.seed, "budgets": budgets, "victims": victims,
        "harvest": f"strategy {args.strategy}, crop_size auto (budget, max_pixels), noise auto, {args.images}"
                   + (f", params {json.dumps(args.strategy_params)}" if args.strategy_params else "")
                   + (" (CLI defaults)" if (args.strategy, args.images, args.strategy_params)
                      == ("crops", "corpus:attacker", None) else ""),
        "bench_images": "corpus:benchmark centre crops", "bench_side": args.bench_side,
        "metric": "piq PSNR/SSIM, data_range 1, RGB, no border crop", "device": args.device,
        "cpu_count": os.cpu_count(), "torch_threads": args.threads, "wall_s": round(wall_s, 1),
        "partial": partial, "rows": rows, "table_md": table(rows),
    }
    atomic_write_json(args.out, result, durable=False)
    return result


if __name__ == "__main__":
    main()
