"""Why the monitor's Sybil linking misses keys: how close do two keys' queries get in the source embedding?

    .venv/bin/python bench/sybil_linking.py                # 4 keys x 10 queries per strategy, 3 seeds
    .venv/bin/python bench/sybil_linking.py --queries 80   # longer attackers

Prints JSON and writes ``bench/results/sybil_linking.json``. For every attacker strategy spread round
robin over ``--keys`` keys (the ``sybil*`` attackers of ``configs/campaigns/monitor.toml``, photos from
``corpus:attacker``), and for a benign population (``heist traffic benign``: each customer its own photos
from ``corpus:victim`` + ``corpus:benchmark``), it reports:

- ``query_min_distance``: for each query, the L2 distance (unit
  :func:`~defenses.monitor.embedding.source_embedding` vectors, range [0, 2]) to the nearest earlier query
  of *another* key of the same attacker, or of another customer; percentiles, and the fraction under the
  monitor's link radius ``dup_distance`` (what :class:`~defenses.monitor.linking.SybilIndex` counts as one
  shared source);
- ``pool_mean_distance``: the distance between two keys' mean embeddings (a key-level "same photo pool"
  statistic), for Sybil pairs and for benign pairs, and the separation between the two.

Both are read with the monitor's default :class:`~defenses.monitor.config.SignalParams`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attacker.files import atomic_write_json  # noqa: E402
from attacker.victim_info import ModelInfo  # noqa: E402
from defenses.monitor.config import SignalParams  # noqa: E402
from evaluation.monitor_eval import AttackerSpec, BenignParams, attacker_observations, benign_observations  # noqa: E402
from translators.corpus import load_images  # noqa: E402

log = logging.getLogger("bench.sybil_linking")
STRATEGIES = ("random", "crops", "tiles", "augment", "diversity", "novel")


def _by_client(obs: list[Any]) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    for o in sorted(obs, key=lambda o: o.ts):
        if o.embedding is not None:
            out.setdefault(o.client, []).append(o.embedding)
    return out


def cross_key_min_distances(keys: dict[str, list[np.ndarray]]) -> np.ndarray:
    """For each query (in key-interleaved order), the distance to the nearest earlier query of another key."""
    seq = [(c, e) for i in range(max(len(v) for v in keys.values())) for c, v in keys.items() if i < len(v)
           for e in [v[i]]]
    out = []
    for i, (c, e) in enumerate(seq):
        others = [f for d, f in seq[:i] if d != c]
        if others:
            out.append(float(np.min(np.linalg.norm(np.stack(others) - e, axis=1))))
    return np.asarray(out)


def pool_mean_distances(keys: dict[str, list[np.ndarray]]) -> list[float]:
    """Distance between the unit-normalised mean embeddings of every pair of keys."""
    means = {c: np.mean(v, 0) / max(float(np.linalg.norm(np.mean(v, 0))), 1e-12) for c, v in keys.items()}
    return [float(np.linalg.norm(means[a] - means[b])) for a, b in itertools.combinations(means, 2)]


def _summary(d: np.ndarray | list[float], radius: float) -> dict[str, Any]:
    a = np.asarray(d)
    return {"n": int(a.size), "p5": round(float(np.percentile(a, 5)), 4), "p50": round(float(np.median(a)), 4),
            "p95": round(float(np.percentile(a, 95)), 4), "min": round(float(a.min()), 4),
            "max": round(float(a.max()), 4), "under_radius": round(float((a < radius).mean()), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=4)
    ap.add_argument("--queries", type=int, default=40, help="queries per attacker (spread over --keys)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--benign-clients", type=int, default=5)
    ap.add_argument("--photos-per-client", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sybil_linking.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = SignalParams()
    info = ModelInfo(name="m", task="denoise", scale=1, min_side=8)
    benign_photos = load_images("corpus:victim") + load_images("corpus:benchmark")
    attacker_photos = load_images("corpus:attacker")
    if args.benign_clients * args.photos_per_client > len(benign_photos):
        ap.error(f"{args.benign_clients} customers x {args.photos_per_client} photos needs "
                 f"{args.benign_clients * args.photos_per_client} distinct photos; the corpus has {len(benign_photos)}")
    ben_min: list[float] = []
    ben_pool: list[float] = []
    rows: dict[str, Any] = {}
    for seed in range(args.seeds):
        ben = _by_client(benign_observations(benign_photos, info, BenignParams(
            clients=args.benign_clients, photos_per_client=args.photos_per_client), seed, prefix="benign"))
        ben_min += cross_key_min_distances(ben).tolist()
        ben_pool += pool_mean_distances(ben)
    for strategy in STRATEGIES:
        mins: list[float] = []
        pools: list[float] = []
        for seed in range(args.seeds):
            spec = AttackerSpec(name="sybil", strategy=strategy, keys=args.keys, queries=args.queries)
            keys = _by_client(attacker_observations(spec, attacker_photos, info, seed, tier_rate=1.0))
            mins += cross_key_min_distances(keys).tolist()
            pools += pool_mean_distances(keys)
        rows[strategy] = {"query_min_distance": _summary(mins, p.dup_distance),
                          "pool_mean_distance": _summary(pools, p.dup_distance),
                          "pool_pairs_below_benign_min": round(float(np.mean(np.asarray(pools) < min(ben_pool))), 4)}
        q, pm = rows[strategy]["query_min_distance"], rows[strategy]["pool_mean_distance"]
        log.info("%s: cross-key nearest query p50 %.3f (%.0f%% under the link radius %.2f); pool-mean distance "
                 "p50 %.3f, %.0f%% of Sybil pairs closer than the closest benign pair", strategy, q["p50"],
                 100 * q["under_radius"], p.dup_distance, pm["p50"],
                 100 * rows[strategy]["pool_pairs_below_benign_min"])
    result = {"settings": {"keys": args.keys, "queries": args.queries, "seeds": args.seeds,
                           "benign_clients": args.benign_clients, "photos_per_client": args.photos_per_client,
                           "attacker_photos": len(attacker_photos), "benign_photos": len(benign_photos),
                           "link_radius_dup_distance": p.dup_distance, "link_shared": p.link_shared},
              "benign": {"query_min_distance": _summary(ben_min, p.dup_distance),
                         "pool_mean_distance": _summary(ben_pool, p.dup_distance)},
              "attackers": rows}
    atomic_write_json(args.out, result, durable=False)
    print(json.dumps(result, indent=2))  # noqa: T201 - the benchmark's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
