"""How close the attacker runs to the victim's rate limit, against a naive client measured in the same run.

    .venv/bin/python bench/attack_rate.py            # 4 limits, ~12 s of harvesting each
    .venv/bin/python bench/attack_rate.py --quick    # 2 limits, shorter
    .venv/bin/python bench/attack_rate.py --busy 2 --out bench/results/attack_rate-busy.json

A real victim (``victim_service.process``, one uvicorn worker, GCRA limiter; Redis when ``--redis-url``
is given, else the in-process limiter with the same arithmetic) serves a tiny random DnCNN. For each
tier ``(rate r, burst B)`` the bench harvests ``B + r * seconds`` pairs of 32x32 crops (``--crop``) and reports,
printing JSON and writing ``bench/results/attack_rate.json``:

- ``ratio``: pairs / (B + r * active time) - the share of what a perfect client could have got in the
  same time (target >= 0.95); ``steady_ratio``: admitted rate after the burst / r;
- ``wasted_429_per_100``: 429 answers per 100 requests sent;
- the same for a naive client (fixed concurrency 4, obeys only the whole-second ``Retry-After``), and
  the attacker/naive ratio of both numbers.

One tier is harvested with two keys (a Sybil attacker): its allowed rate is ``2 r``.

``--busy N`` keeps N processes spinning on the CPU for the whole run (a loaded machine): the server then
queues requests before its limiter sees them, and the client's own event loop is late to send, so send
times no longer date the limiter's clock (the case ``LanePacer._limiter_time`` handles).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import RESULTS, delete_prefix, exit_on_sigterm, float_range, int_range  # noqa: E402

from attacker.harvest import harvest  # noqa: E402
from translators.archs.registry import build_arch  # noqa: E402
from translators.checkpoint import ModelCard, save_checkpoint  # noqa: E402
from translators.codecs import encode_image  # noqa: E402
from translators.corpus import PatchSampler, load_images  # noqa: E402
from victim_service.process import start_service  # noqa: E402
from victim_service.settings import Settings  # noqa: E402

log = logging.getLogger("bench.attack_rate")


def start_victim(folder: Path, tiers: dict[str, dict[str, Any]], keys: dict[str, str], redis_url: str | None,
                 prefix: str) -> Any:
    torch.manual_seed(0)
    kw = {"channels": 8, "depth": 3}
    ckpt = save_checkpoint(build_arch("dncnn", kw).eval(), folder / "denoise.safetensors",
                           ModelCard(name="denoise", arch="dncnn", kwargs=kw, task="denoise", min_side=8))
    settings = {
        "models": [{"name": "denoise", "source": str(ckpt), "max_batch": 4}],
        "tiers": tiers,
        "keys": [{"name": n, "tier": t, "key": f"hk_bench_{n}_{os.urandom(6).hex()}"} for n, t in keys.items()],
        "redis_url": redis_url, "key_prefix": prefix,
        "data_dir": str(folder / "data"), "torch_threads": 1, "batch_probe_s": 0.03,
        "query_log": {"backend": "off"},
    }
    s = Settings.from_mapping(settings)
    s.to_json_file(folder / "settings.json")
    svc = start_service(folder / "settings.json", log_path=folder / "server.log")
    return svc, {k.name: k.key.get_secret_value() for k in s.keys}


async def naive_client(url: str, key: str, n: int, crops: list[bytes], concurrency: int = 4) -> dict[str, Any]:
    """Fire at fixed concurrency; on 429 sleep the whole-second Retry-After and try again."""
    ok = sent = limited = 0
    t0 = time.monotonic()
    next_i = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal ok, sent, limited, next_i
        while ok < n:
            i = next_i
            next_i += 1
            while ok < n:
                sent += 1
                r = await client.post("/v1/models/denoise/translate", content=crops[i % len(crops)],
                                      headers={"X-API-Key": key, "Content-Type": "image/png"})
                if r.status_code == 200:
                    ok += 1
                    break
                limited += r.status_code == 429
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return {"pairs": ok, "sent": sent, "limited": limited, "active_s": time.monotonic() - t0}


def _spin() -> None:
    while True:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float_range(0, strict_lo=True), default=None,
                    help="harvest length per tier (default 12, quick 5)")
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--busy", type=int_range(0, 64), default=0,
                    help="CPU-bound processes kept running during the bench")
    ap.add_argument("--crop", type=int_range(8, 1024), default=32, help="side of the harvested crops (px)")
    ap.add_argument("--out", type=Path, default=RESULTS / "attack_rate.json")
    args = ap.parse_args()
    exit_on_sigterm()  # SIGTERM stops the victim server and the spinners and cleans up, as Ctrl-C does
    prefix = f"heist-bench:attack-rate:{os.urandom(4).hex()}:"  # the victim's Redis keys, deleted at the end
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    seconds = args.seconds or (5.0 if args.quick else 12.0)
    tiers = {"t5": {"rate": 5.0, "burst": 5}, "t20": {"rate": 20.0, "burst": 10}} if args.quick else {
        "t2": {"rate": 2.0, "burst": 5}, "t5": {"rate": 5.0, "burst": 5}, "t20": {"rate": 20.0, "burst": 10},
        "t40": {"rate": 40.0, "burst": 5}}
    keys: dict[str, str] = {}
    for t in tiers:
        keys[f"a-{t}"], keys[f"n-{t}"] = t, t
    keys["sybil1"], keys["sybil2"] = "t5", "t5"
    photos = [im.image for im in load_images("corpus:attacker", max_side=256)]
    sampler = PatchSampler(photos, args.crop, seed=0)
    crops = [encode_image(sampler.crop()) for _ in range(64)]
    rows = []
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    svc = None
    try:  # on every path (an error, Ctrl-C, SIGTERM): stop the server and the spinners, delete the Redis keys
        with tempfile.TemporaryDirectory(prefix="bench-attack-rate-") as tmp:
            for p in spinners:
                p.start()
            try:
                svc, plain = start_victim(Path(tmp), tiers, keys, args.redis_url, prefix)
                for t, spec in tiers.items():
                    rate, burst = float(spec["rate"]), int(spec["burst"])
                    budget = int(burst + rate * seconds)
                    r = harvest(svc.url, plain[f"a-{t}"], "denoise", Path(tmp) / f"run-{t}", budget=budget,
                                strategy_params={"crop_size": args.crop, "noise_sigma": None}, durable=False)
                    s = r.summary["sessions"][-1]
                    nv = asyncio.run(naive_client(svc.url, plain[f"n-{t}"], budget, crops))
                    row = {
                        "tier": t, "rate": rate, "burst": burst, "keys": 1, "pairs": r.pairs,
                        "attacker": {
                            "ratio": round(r.pairs / (burst + rate * s["active_s"]), 4),
                            "steady_ratio": round((s["steady_rate"] or 0) / rate, 4),
                            "wasted_429_per_100": s["wasted_429_per_100"], "sent": s["queries_sent"],
                            "rate_estimate": s["allowed_rate_estimate"], "active_s": round(s["active_s"], 2)},
                        "naive": {
                            "ratio": round(nv["pairs"] / (burst + rate * nv["active_s"]), 4),
                            "wasted_429_per_100": round(100 * nv["limited"] / nv["sent"], 2), "sent": nv["sent"],
                            "active_s": round(nv["active_s"], 2)},
                    }
                    row["attacker_over_naive_ratio"] = round(row["attacker"]["ratio"] / row["naive"]["ratio"], 3)
                    rows.append(row)
                    log.warning("%s: %s", t, json.dumps(row))
                rate, burst = 2 * float(tiers["t5"]["rate"]), 2 * int(tiers["t5"]["burst"])
                budget = int(burst + rate * seconds)
                r = harvest(svc.url, [plain["sybil1"], plain["sybil2"]], "denoise", Path(tmp) / "run-sybil",
                            budget=budget, strategy_params={"crop_size": args.crop, "noise_sigma": None}, durable=False)
                s = r.summary["sessions"][-1]
                rows.append({"tier": "t5 x 2 keys", "rate": rate, "burst": burst, "keys": 2, "pairs": r.pairs,
                             "attacker": {"ratio": round(r.pairs / (burst + rate * s["active_s"]), 4),
                                          "steady_ratio": round((s["steady_rate"] or 0) / rate, 4),
                                          "wasted_429_per_100": s["wasted_429_per_100"], "sent": s["queries_sent"],
                                          "pairs_per_key": [k["pairs"] for k in s["keys"]]}})
            finally:  # before the folder it logs to goes
                if svc is not None:
                    svc.stop()
    finally:
        for p in spinners:
            if p.is_alive():
                p.terminate()
        delete_prefix(args.redis_url, prefix)
    result = {
        "benchmark": "attack_rate", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "limiter": "redis" if args.redis_url else "memory (same GCRA arithmetic as the Redis script)",
        "seconds_per_tier": seconds, "crop": args.crop, "cpu_count": os.cpu_count(),
        "busy_processes": args.busy, "tiers": rows,
        "min_attacker_ratio": min(r["attacker"]["ratio"] for r in rows),
        "max_attacker_wasted_429_per_100": max(r["attacker"]["wasted_429_per_100"] for r in rows),
        "target": "ratio >= 0.95",
    }
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
