"""How well the monitor links Sybil keys: source-embedding distances, and shared regions (overlapping crops).

    .venv/bin/python bench/sybil_linking.py                # 4 keys x 10 queries per strategy, 3 seeds
    .venv/bin/python bench/sybil_linking.py --queries 80   # longer attackers
    .venv/bin/python bench/sybil_linking.py --task sr --out bench/results/sybil_linking-sr.json

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
  statistic), for Sybil pairs and for benign pairs, and the separation between the two;
- ``regions``: shared-region linking (:mod:`defenses.monitor.regions`, what the monitor links keys by since
  round 2): the share of the attacker's keys linked to another of its keys by verified shared regions (at
  the engine's default ``region_shared``, and at 1, 2 and 3: that many of one key's queries matched the
  other key's; queries in round-robin order), the matched query pairs, and the
  *overlap bound*: the share of keys whose crops overlap a crop of another key by at least a quarter, from
  the strategy's own crop boxes (no content-based linker can link keys whose queries share no pixels).

The null of the region match (``region_null``): pairs of queries that share no pixels -- every pair of
benign customers' queries within one population (customers own different photos) plus, per photo of
``corpus:victim``, ``corpus:benchmark`` and ``corpus:attacker``, ``--null-prints`` random crops or whole
resizes, paired across different photos (the stereo pair motorcycle_left/right excluded: one scene).
Reported: the pairs, the largest shared-corner count, the pairs at or above ``MIN_SHARED`` (false matches,
listed) and the exact one-sided 95% upper bound on the per-pair false-match rate. From that rate,
``chance_link``: the probability that an honest customer sending ``q`` novel queries is linked by chance to
some other client under ``region_shared = n``, at a busy service whose region index is full
(``region_capacity`` queries of other clients compared per query). Model: chance matches are Poisson with
``capacity x rate`` per query, and (worst case) all of them land on one other client, so the customer is
linked when ``n`` or more occur. Everything is read with the monitor's default
:class:`~defenses.monitor.config.SignalParams`.
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
import torch
from scipy import stats as scipy_stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import int_range  # noqa: E402

from attacker.strategies import build_strategy  # noqa: E402
from attacker.victim_info import ModelInfo  # noqa: E402
from defenses.monitor.config import SignalParams  # noqa: E402
from defenses.monitor.regions import MIN_SHARED, RegionIndex, RegionPrint, region_print, shared_regions  # noqa: E402
from evaluation.monitor_eval import AttackerSpec, BenignParams, attacker_observations, benign_observations  # noqa: E402
from translators.corpus import NamedImage, load_images  # noqa: E402
from translators.files import atomic_write_json  # noqa: E402
from translators.images import bicubic_resize  # noqa: E402

log = logging.getLogger("bench.sybil_linking")
STRATEGIES = ("random", "crops", "tiles", "augment", "diversity", "novel")
RULES = tuple(sorted({1, 2, 3, SignalParams().region_shared}))
"""``region_shared`` thresholds the linking rates are reported for (``linked_fraction``: the engine's default)."""


def _by_client(obs: list[Any]) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    for o in sorted(obs, key=lambda o: o.ts):
        if o.embedding is not None:
            out.setdefault(o.client, []).append(o.embedding)
    return out


def _prints_by_client(obs: list[Any]) -> dict[str, list[RegionPrint]]:
    out: dict[str, list[RegionPrint]] = {}
    for o in sorted(obs, key=lambda o: o.ts):
        if o.regions is not None:
            out.setdefault(o.client, []).append(o.regions)
    return out


def region_linking(obs: list[Any], thresholds: tuple[int, ...] = RULES) -> tuple[list[float], int]:
    """Replay ``obs`` (one attacker's keys) through a :class:`RegionIndex` as the engine does: for each
    ``region_shared`` threshold ``n``, the share of keys linked to another key (``n`` of one key's queries
    matched queries of the other, the engine's count), and the number of (query, other key) matches."""
    idx = RegionIndex()
    pair_counts: dict[tuple[str, str], int] = {}
    matches = 0
    for o in sorted(obs, key=lambda o: o.ts):
        if o.regions is None:
            continue
        others = idx.matches(o.client, o.regions)
        matches += len(others)
        for other in others:
            key = (min(o.client, other), max(o.client, other))
            pair_counts[key] = pair_counts.get(key, 0) + 1
        idx.add(o.client, o.regions)
    keys = {o.client for o in obs}
    fractions = []
    for n in thresholds:
        linked = {c for pair, m in pair_counts.items() if m >= n for c in pair}
        fractions.append(len(linked) / len(keys))
    return fractions, matches


def overlap_bound(spec: AttackerSpec, photos: list[NamedImage], info: ModelInfo, seed: int) -> float | None:
    """Share of keys with a crop overlapping (>= a quarter of the smaller box) a crop of another key, from
    the strategy's crop boxes; None when the strategy records no boxes (whole photos)."""
    st = build_strategy(spec.strategy, photos, info, spec.params or None, seed)
    qs = [st.make(i) for i in range(spec.queries)]
    if all(q.crop is None for q in qs):
        return None
    linked: set[int] = set()
    for i, j in itertools.combinations(range(len(qs)), 2):
        a, b = qs[i], qs[j]
        if i % spec.keys == j % spec.keys or a.source != b.source or a.crop is None or b.crop is None:
            continue
        (y1, x1, h1, w1), (y2, x2, h2, w2) = a.crop, b.crop
        ov = max(0, min(y1 + h1, y2 + h2) - max(y1, y2)) * max(0, min(x1 + w1, x2 + w2) - max(x1, x2))
        if ov >= 0.25 * min(h1 * w1, h2 * w2):
            linked |= {i % spec.keys, j % spec.keys}
    return len(linked) / spec.keys


def region_null(benign_runs: list[dict[str, list[RegionPrint]]], photos: list[NamedImage], per_photo: int,
                seed: int, capacity: int) -> dict[str, Any]:
    """Shared-corner counts of query pairs that share no pixels (module doc): the null of the region match."""
    rng = np.random.default_rng(seed)
    noise = torch.Generator().manual_seed(seed)
    prints: list[tuple[str, RegionPrint]] = []
    for im in photos:
        x = im.image
        h, w = x.shape[-2:]
        for t in range(per_photo):
            if t % 2:  # a crop of 32-128 px, half of them noisy
                side = int(rng.integers(32, min(128, h, w) + 1))
                top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
                c = x[..., top : top + side, left : left + side]
                if t % 4 == 1:
                    c = (c + float(rng.uniform(0.02, 0.15)) * torch.randn(c.shape, generator=noise)).clamp(0, 1)
            else:  # the whole photo, short side 24-300 px
                f = min(1.0, int(rng.integers(24, 301)) / min(h, w))
                c = bicubic_resize(x, (max(8, round(h * f)), max(8, round(w * f)))).clamp(0, 1) if f < 1 else x
            prints.append((im.name, region_print(c)))
    stereo = {"motorcycle_left", "motorcycle_right"}
    counts: list[int] = []
    false_pairs: list[list[Any]] = []
    for (na, a), (nb, b) in itertools.combinations(prints, 2):
        if na != nb and {na, nb} != stereo:
            counts.append(shared_regions(a, b))
            if counts[-1] >= MIN_SHARED:
                false_pairs.append([na, list(a.size), nb, list(b.size), counts[-1]])
    for run in benign_runs:  # customers of one population own disjoint photos (not so across seeds)
        for ca, cb in itertools.combinations(run, 2):
            for a in run[ca]:
                for b in run[cb]:
                    counts.append(shared_regions(a, b))
                    if counts[-1] >= MIN_SHARED:
                        false_pairs.append([ca, list(a.size), cb, list(b.size), counts[-1]])
    c = np.asarray(counts)
    n, false = int(c.size), int((c >= MIN_SHARED).sum())
    # exact one-sided 95% upper bound (Clopper-Pearson) on the per-pair false-match rate
    upper = float(scipy_stats.beta.ppf(0.95, false + 1, n - false)) if n else None
    return {"pairs": n, "max_shared": int(c.max()) if n else None, "min_shared": MIN_SHARED,
            "false_matches": false, "false_match_rate_upper95": round(upper, 8) if upper is not None else None,
            "false_match_pairs": false_pairs,
            "histogram": {str(k): int((c == k).sum()) for k in range(int(c.max()) + 1)} if n else {},
            "chance_link": chance_link(false / n, upper, capacity) if n and upper is not None else None}


def chance_link(rate: float, upper: float, capacity: int, queries: tuple[int, ...] = (10, 50)) -> dict[str, Any]:
    """P(an honest customer with ``q`` novel queries is linked by chance) under each ``region_shared`` rule,
    at the per-pair ``rate`` and at its 95% ``upper`` bound (module doc: Poisson, worst case one partner)."""
    out: dict[str, Any] = {"capacity": capacity, "model": "Poisson(q x capacity x rate), all on one partner"}
    for q in queries:
        for name, r in (("rate", rate), ("upper95", upper)):
            lam = q * capacity * r
            out[f"q{q}_{name}"] = {str(k): round(float(scipy_stats.poisson.sf(k - 1, lam)), 6) for k in RULES}
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
    ap.add_argument("--keys", type=int_range(2), default=4, help="keys per attacker (>= 2: links are between keys)")
    ap.add_argument("--queries", type=int_range(2), default=40,
                    help="queries per attacker (spread over --keys; at least one per key)")
    ap.add_argument("--seeds", type=int_range(1), default=3)
    ap.add_argument("--benign-clients", type=int_range(2), default=5,
                    help="customers per benign population (>= 2: distances are between customers)")
    ap.add_argument("--photos-per-client", type=int_range(1), default=3)
    ap.add_argument("--task", choices=["denoise", "sr"], default="denoise",
                    help="the victim's public task: denoise queries are noisy crops, sr queries 4x-downscaled ones")
    ap.add_argument("--null-prints", type=int_range(1), default=12, help="region null: crops/resizes per photo")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sybil_linking.json")
    args = ap.parse_args(argv)
    if args.queries < args.keys:
        ap.error(f"argument --queries: {args.queries} queries cannot cover {args.keys} keys (one per key at least)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = SignalParams()
    info = ModelInfo(name="m", task=args.task, scale=4 if args.task == "sr" else 1, min_side=8)
    benign_photos = load_images("corpus:victim") + load_images("corpus:benchmark")
    attacker_photos = load_images("corpus:attacker")
    if args.benign_clients * args.photos_per_client > len(benign_photos):
        ap.error(f"{args.benign_clients} customers x {args.photos_per_client} photos needs "
                 f"{args.benign_clients * args.photos_per_client} distinct photos; the corpus has {len(benign_photos)}")
    ben_min: list[float] = []
    ben_pool: list[float] = []
    ben_prints: list[dict[str, list[RegionPrint]]] = []
    rows: dict[str, Any] = {}
    for seed in range(args.seeds):
        ben_obs = benign_observations(benign_photos, info, BenignParams(
            clients=args.benign_clients, photos_per_client=args.photos_per_client), seed, prefix=f"benign{seed}")
        ben = _by_client(ben_obs)
        ben_min += cross_key_min_distances(ben).tolist()
        ben_pool += pool_mean_distances(ben)
        ben_prints.append(_prints_by_client(ben_obs))
    rule = RULES.index(p.region_shared)  # the engine's default rule: linked_fraction
    for strategy in STRATEGIES:
        mins: list[float] = []
        pools: list[float] = []
        linked: list[list[float]] = []
        bounds: list[float] = []
        matched = 0
        for seed in range(args.seeds):
            spec = AttackerSpec(name="sybil", strategy=strategy, keys=args.keys, queries=args.queries)
            obs = attacker_observations(spec, attacker_photos, info, seed, tier_rate=1.0)
            keys = _by_client(obs)
            mins += cross_key_min_distances(keys).tolist()
            pools += pool_mean_distances(keys)
            frac, m = region_linking(obs)
            linked.append(frac)
            matched += m
            b = overlap_bound(spec, attacker_photos, info, seed)
            if b is not None:
                bounds.append(b)
        rows[strategy] = {"query_min_distance": _summary(mins, p.dup_distance),
                          "pool_mean_distance": _summary(pools, p.dup_distance),
                          "pool_pairs_below_benign_min": round(float(np.mean(np.asarray(pools) < min(ben_pool))), 4),
                          "regions": {"linked_fraction": round(float(np.mean([v[rule] for v in linked])), 4),
                                      "linked_fraction_per_seed": [round(v[rule], 4) for v in linked],
                                      "linked_fraction_by_region_shared": {
                                          str(n): round(float(np.mean([v[i] for v in linked])), 4)
                                          for i, n in enumerate(RULES)},
                                      "matched_query_pairs": matched,
                                      "overlap_bound": round(float(np.mean(bounds)), 4) if bounds else None}}
        row = rows[strategy]
        q, pm, rg = row["query_min_distance"], row["pool_mean_distance"], row["regions"]
        log.info("%s: cross-key nearest query p50 %.3f (%.0f%% under the link radius %.2f); pool-mean distance "
                 "p50 %.3f, %.0f%% of Sybil pairs closer than the closest benign pair; shared regions link "
                 "%.0f%% of keys (overlap bound %s)", strategy, q["p50"], 100 * q["under_radius"], p.dup_distance,
                 pm["p50"], 100 * rows[strategy]["pool_pairs_below_benign_min"], 100 * rg["linked_fraction"],
                 "-" if rg["overlap_bound"] is None else f"{100 * rg['overlap_bound']:.0f}%")
    null = region_null(ben_prints, benign_photos + attacker_photos, args.null_prints, seed=12345,
                       capacity=p.region_capacity)
    log.info("region null: %d pairs sharing no pixels, largest count %s, %d at or above %d (95%% upper bound on "
             "the per-pair false-match rate %.2g)", null["pairs"], null["max_shared"], null["false_matches"],
             MIN_SHARED, null["false_match_rate_upper95"] or 0.0)
    result = {"settings": {"task": args.task, "keys": args.keys, "queries": args.queries, "seeds": args.seeds,
                           "benign_clients": args.benign_clients, "photos_per_client": args.photos_per_client,
                           "attacker_photos": len(attacker_photos), "benign_photos": len(benign_photos),
                           "link_radius_dup_distance": p.dup_distance, "link_shared": p.link_shared,
                           "region_shared": p.region_shared, "region_min_shared": MIN_SHARED,
                           "null_prints": args.null_prints},
              "benign": {"query_min_distance": _summary(ben_min, p.dup_distance),
                         "pool_mean_distance": _summary(ben_pool, p.dup_distance)},
              "attackers": rows, "region_null": null}
    atomic_write_json(args.out, result, durable=False)
    print(json.dumps(result, indent=2))  # noqa: T201 - the benchmark's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
