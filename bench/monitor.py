"""Benchmark the query monitor: scoring throughput on one core, and what it costs the translate path.

    .venv/bin/python bench/monitor.py            # 4000 log entries, 300 requests per server round
    .venv/bin/python bench/monitor.py --quick    # a smoke run

Prints JSON and writes ``bench/results/monitor.json``:

- ``scoring``: query-log entries per second the monitor engine folds in (JSON parse, embedding and
  region-print decode, k-NN/PRADA/reuse/link signals, the shared-region search, risk and level), one
  thread, ``clients`` clients, entries built from corpus crops the way the service logs them; and the
  same without region prints in the entries (``entries_per_s_without_regions``);
  ``throughput_ratio_with_over_without_regions`` = entries/s with region prints / entries/s without (< 1: the
  region prints slow scoring down; it equals seconds without / seconds with);
- ``embedding``: microseconds per call of the two things the translate route adds to each log entry (the
  source descriptor and the shared-region fingerprint), for a 64x64 and a 512x512 input, against the pHash
  the route computes anyway;
- ``latency``: two real servers on the same Redis, monitor on vs off (``monitor.enabled``), the same
  tiny x4 model; sequential requests with a 64x64 PNG, rounds alternating between the servers so both
  see the same machine load; p50 and mean, and the ratio on/off (same run).

Writes ``--out`` (default ``bench/results/monitor.json`` in the repository). The servers' Redis keys (prefix
``heist-bench:monitor:<hex>:``) and the temporary folder are removed at the end, on SIGTERM too.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
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

from _common import RESULTS, delete_prefix, exit_on_sigterm  # noqa: E402

from attacker.strategies import build_strategy  # noqa: E402
from attacker.victim_info import ModelInfo  # noqa: E402
from defenses.monitor.config import MonitorConfig  # noqa: E402
from defenses.monitor.embedding import embed_for_log  # noqa: E402
from defenses.monitor.engine import MonitorEngine, observation_from_entry  # noqa: E402
from defenses.monitor.regions import regions_for_log  # noqa: E402
from translators.archs.registry import build_arch  # noqa: E402
from translators.checkpoint import ModelCard, save_checkpoint  # noqa: E402
from translators.codecs import encode_image  # noqa: E402
from translators.corpus import load_images  # noqa: E402
from victim_service.phash import phash64  # noqa: E402
from victim_service.process import start_service  # noqa: E402
from victim_service.settings import Settings  # noqa: E402

log = logging.getLogger("bench.monitor")


def _score(lines: list[str]) -> float:
    """Seconds the engine takes to fold ``lines`` in, as the consumer does per entry: parse, decode, score."""
    eng = MonitorEngine(MonitorConfig(), {"free": 1.0})
    t0 = time.perf_counter()
    for i, line in enumerate(lines):
        obs = observation_from_entry(json.loads(line), (i + 1, 0))
        if obs is not None:
            eng.process(obs)
    return time.perf_counter() - t0


def bench_scoring(n: int, clients: int) -> dict[str, Any]:
    info = ModelInfo(name="m", task="sr", scale=4, min_side=8)
    photos = load_images("corpus:all")
    per = max(1, n // clients)
    entries = []
    for c in range(clients):  # each client its own crops (a different seed); entries interleaved in time below
        st = build_strategy("crops", photos, info, seed=c)
        for j in range(per):
            i = j * clients + c
            x = st.make(j).image
            entries.append((i, {"client": f"c{c}", "tier": "free", "ts": 1000.0 + i * 0.05, "status": 200,
                                "input_sha256": f"{i:064x}", "embedding": embed_for_log(x),
                                "regions": regions_for_log(x)}))
    entries.sort(key=lambda t: t[0])
    dt = _score([json.dumps(e) for _, e in entries])
    dt_plain = _score([json.dumps({k: v for k, v in e.items() if k != "regions"}) for _, e in entries])
    return {"entries": len(entries), "clients": clients, "seconds": round(dt, 3),
            "seconds_without_regions": round(dt_plain, 3),
            "entries_per_s": round(len(entries) / dt, 1),
            "entries_per_s_without_regions": round(len(entries) / dt_plain, 1),
            # entries/s with region prints over entries/s without (a throughput ratio; < 1: slower with them)
            "throughput_ratio_with_over_without_regions": round(dt_plain / dt, 3)}


def bench_embedding(reps: int) -> dict[str, Any]:
    """Descriptor cost per call, and the same for the pHash the route already computes (baseline)."""
    out: dict[str, Any] = {}
    for side in (64, 512):
        x = torch.rand(1, 3, side, side)
        for name, fn in (("embedding", embed_for_log), ("regions", regions_for_log), ("phash", phash64)):
            fn(x)
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(x)
            out[f"{name}_us_{side}"] = round((time.perf_counter() - t0) / reps * 1e6, 1)
        for name in ("embedding", "regions"):
            out[f"ratio_{name}_phash_{side}"] = round(out[f"{name}_us_{side}"] / out[f"phash_us_{side}"], 3)
    return out


def _server(tmp: Path, name: str, model: Path, key: str, prefix: str, monitor: bool, redis_url: str):  # type: ignore[no-untyped-def]
    data = {"models": [{"name": "sr4x", "source": str(model), "max_batch": 1}],
            "tiers": {"open": {"rate": None}}, "keys": [{"name": "bench", "tier": "open", "key": key}],
            "redis_url": redis_url, "key_prefix": prefix, "data_dir": str(tmp / name), "torch_threads": 1,
            "batch_probe_s": 0.03, "monitor": {"enabled": monitor}}
    Settings.from_mapping(data).to_json_file(tmp / f"{name}.json")
    return start_service(tmp / f"{name}.json", log_path=tmp / f"{name}.log")


def bench_latency(requests: int, rounds: int, redis_url: str) -> dict[str, Any]:
    prefix = f"heist-bench:monitor:{secrets.token_hex(4)}:"  # both servers' keys, deleted at the end
    try:
        with tempfile.TemporaryDirectory(prefix="heist-bench-monitor-") as d:
            return _latency(Path(d), requests, rounds, redis_url, prefix)
    finally:
        delete_prefix(redis_url, prefix)


def _latency(tmp: Path, requests: int, rounds: int, redis_url: str, prefix: str) -> dict[str, Any]:
    torch.manual_seed(0)
    kw = {"scale": 4, "channels": 16, "n_blocks": 2}
    card = ModelCard(name="sr4x", arch="srresnet", kwargs=kw, task="sr", scale=4, min_side=8)
    model = tmp / "sr4x.safetensors"
    save_checkpoint(build_arch("srresnet", kw).eval(), model, card)
    key = f"hk_bench_{secrets.token_hex(8)}"
    body = encode_image(torch.rand(1, 3, 64, 64), "png")
    servers: dict[str, Any] = {}
    lat: dict[str, list[float]] = {"on": [], "off": []}
    try:  # a server that started is stopped on every path (the second failing to start included)
        servers["on"] = _server(tmp, "on", model, key, f"{prefix}on:", True, redis_url)
        servers["off"] = _server(tmp, "off", model, key, f"{prefix}off:", False, redis_url)
        for _ in range(rounds):
            for name, srv in servers.items():
                with httpx.Client(base_url=srv.url, timeout=30) as h:
                    for _ in range(requests // rounds):
                        t0 = time.perf_counter()
                        r = h.post("/v1/models/sr4x/translate", content=body,
                                   headers={"X-API-Key": key, "Content-Type": "image/png"})
                        lat[name].append(time.perf_counter() - t0)
                        r.raise_for_status()
    finally:
        for srv in servers.values():
            srv.stop()
    res: dict[str, Any] = {"requests_each": len(lat["on"]), "input": "64x64 PNG", "model": "srresnet 16ch/2 blocks x4"}
    for name, xs in lat.items():
        res[name] = {"p50_ms": round(statistics.median(xs) * 1000, 3), "mean_ms": round(statistics.fmean(xs) * 1000, 3)}
    res["ratio_p50_on_off"] = round(res["on"]["p50_ms"] / res["off"]["p50_ms"], 3)
    res["ratio_mean_on_off"] = round(res["on"]["mean_ms"] / res["off"]["mean_ms"], 3)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--out", type=Path, default=RESULTS / "monitor.json")
    args = ap.parse_args()
    try:
        import redis
    except ImportError:
        ap.error("the redis package is not installed; the latency part needs a Redis")
    try:
        redis.Redis.from_url(args.redis_url, socket_connect_timeout=2).ping()
    except (ValueError, redis.RedisError) as exc:
        ap.error(f"argument --redis-url: no Redis at {args.redis_url} ({exc}); the latency part needs one")
    exit_on_sigterm()  # SIGTERM stops both servers and cleans up, as Ctrl-C does
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    n = 800 if args.quick else 4000
    result = {
        "settings": {"quick": args.quick, "torch_threads": 1},
        "scoring": bench_scoring(n, clients=50),
        "embedding": bench_embedding(20 if args.quick else 200),
        "latency": bench_latency(60 if args.quick else 300, 3, args.redis_url),
    }
    text = json.dumps(result, indent=2)
    print(text)  # noqa: T201 - the benchmark's output
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
