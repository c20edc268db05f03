"""Evaluate the query monitor: benign customers vs attackers (plain and evasive), offline and live.

* :func:`calibrate` sets the monitor's benign-percentile thresholds (k-NN distance, PRADA's delta, the
  near-duplicate radius) from benign traffic only: customers sending distinct photos
  (:func:`attacker.benign.plan_benign`).
* :func:`evaluate_offline` replays benign and attacker streams through the monitor engine (the same code
  the service runs, without HTTP): queries to detection per attacker, benign false-positive rate, Sybil
  linking. Cheap, so it can afford hundreds of benign customers.
* :func:`evaluate_live` runs the same traffic against a live victim URL with the monitor on (keys created
  through the admin API), waits for the monitor to catch up and reads ``GET /v1/admin/clients``: this is
  the function a ``monitor`` campaign cell calls. Both return JSON-able dicts.

Attacker streams: query ``i`` of strategy ``strategy`` goes to key ``i % keys`` (Sybil spreading) at
``rate_fraction`` of the tier's rate (slowing down). Queries to detection is the attacker's total query
count when its first key is flagged (None: not flagged within its queries).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from attacker.benign import BenignParams, plan_benign, run_benign
from attacker.client import AdminApiError, Outcome, VictimAdminClient, VictimClient
from attacker.errors import VictimUnreachableError
from attacker.strategies import build_strategy
from attacker.victim_info import ModelInfo
from defenses.monitor.config import MonitorConfig, SignalParams
from defenses.monitor.embedding import source_embedding
from defenses.monitor.engine import MonitorEngine
from defenses.monitor.regions import region_print
from defenses.monitor.scoring import Observation, shapiro_w
from evaluation.errors import EvaluationError
from translators.codecs import decode_image, encode_image
from translators.corpus import NamedImage


class AttackerSpec(BaseModel):
    """One attacker: a query strategy, how many keys it spreads over and how fast it goes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    strategy: str = "crops"
    params: dict[str, Any] = Field(default_factory=dict)
    keys: int = Field(1, ge=1, le=1000)
    rate_fraction: float = Field(1.0, gt=0.0, le=10.0)
    queries: int = Field(50, ge=1)
    sized_for_budget: bool = False
    """Size ``crop_size="auto"`` for ``queries`` (as ``heist attack harvest --budget`` does: large crops for
    small budgets); otherwise the strategy's budget-free default (64 px, ``128 // scale`` for SR)."""


def default_attackers(queries: int = 50) -> list[AttackerSpec]:
    """Every built-in strategy plus the evasions (Sybil spreading, slow rate, interleaving, novel crops)."""
    plain = [AttackerSpec(name=s, strategy=s, queries=queries) for s in ("random", "crops", "tiles", "augment",
                                                                          "diversity")]
    return [
        *plain,
        AttackerSpec(name="sybil4-crops", strategy="crops", keys=4, queries=queries),
        AttackerSpec(name="slow-crops", strategy="crops", rate_fraction=0.1, queries=queries),
        AttackerSpec(name="interleave", strategy="interleave", queries=queries),
        AttackerSpec(name="novel", strategy="novel", queries=queries),
        AttackerSpec(name="sybil4-slow-novel", strategy="novel", keys=4, rate_fraction=0.1, queries=queries),
        AttackerSpec(name="crops-budget", strategy="crops", queries=queries, sized_for_budget=True),
        AttackerSpec(name="sybil4-crops-budget", strategy="crops", keys=4, queries=queries, sized_for_budget=True),
    ]


def _obs(client: str, tier: str, ts: float, body: bytes, seq: int) -> Observation:
    x = decode_image(body)
    return Observation(client, tier, ts, True, hashlib.sha256(body).hexdigest(), source_embedding(x), (seq, 0),
                       region_print(x))


def benign_observations(images: Sequence[NamedImage], info: ModelInfo, params: BenignParams, seed: int,
                        tier: str = "free", t0: float = 0.0, prefix: str = "benign") -> list[Observation]:
    """The benign plan as the monitor would see it (time = the plan's delays)."""
    out = []
    for c in plan_benign(images, info, params, seed, prefix):
        t = t0
        for r in c.requests:
            t += r.delay_s
            out.append(_obs(c.name, tier, t, r.body, 0))
    return out


def attacker_bodies(spec: AttackerSpec, images: Sequence[NamedImage], info: ModelInfo, seed: int) -> list[bytes]:
    st = build_strategy(spec.strategy, images, info, spec.params or None, seed,
                        budget=spec.queries if spec.sized_for_budget else None)
    return [encode_image(st.make(i).image, "png") for i in range(spec.queries)]


def attacker_observations(spec: AttackerSpec, images: Sequence[NamedImage], info: ModelInfo, seed: int,
                          tier_rate: float, tier: str = "free", t0: float = 0.0) -> list[Observation]:
    dt = 1.0 / (tier_rate * spec.rate_fraction)
    return [_obs(f"{spec.name}-k{i % spec.keys}", tier, t0 + i * dt, b, 0)
            for i, b in enumerate(attacker_bodies(spec, images, info, seed))]


class BenignDistances(BaseModel):
    """What one benign stream says about the distances between its distinct photos (unit source
    descriptors, range [0, 2]): per query, the mean distance to the ``k`` nearest earlier queries
    (``knn``), the distance to the nearest (``dmin``), and Shapiro-Wilk W over the recent ``dmin`` (``w``)."""

    knn: list[float] = Field(default_factory=list)
    dmin: list[float] = Field(default_factory=list)
    w: list[float] = Field(default_factory=list)


def benign_distances(stream: Sequence[Observation], p: SignalParams) -> BenignDistances:
    """The k-NN, nearest-neighbour and PRADA statistics of ``stream`` as the monitor computes them per client
    (byte-identical resends and entries without a descriptor skipped)."""
    out = BenignDistances()
    embs: list[np.ndarray] = []
    seen: set[str | None] = set()
    for o in stream:
        if o.embedding is None or o.sha in seen:
            continue
        seen.add(o.sha)
        if embs:
            d = np.linalg.norm(np.stack(embs) - o.embedding, axis=1)
            out.dmin.append(float(d.min()))
            if len(d) >= p.k:
                out.knn.append(float(np.sort(d)[: p.k].mean()))
            if len(out.dmin) >= p.prada_min:
                w = shapiro_w(out.dmin[-p.prada_max:])
                if w is not None:
                    out.w.append(w)
        embs.append(o.embedding)
    return out


def calibrate(images: Sequence[NamedImage], info: ModelInfo, seeds: int = 20, percentile: float = 1.0,
              base: SignalParams | None = None) -> dict[str, Any]:
    """Benign-only thresholds: each seed is one long customer sending every photo once at random sizes.

    Sets, from benign distances between *distinct* photos only (no retries, no re-uploads):

    * ``knn_threshold``: the ``percentile`` of per-query k-NN distances (Chen et al. 2019);
    * ``prada_delta``: the ``percentile`` of Shapiro-Wilk W (Juuti et al. 2019), when streams are long enough;
    * ``dup_distance``: the ``percentile`` of per-query nearest-neighbour distances, but never above
      ``base.dup_distance``: the default radius (0.12) is what one photo's rescaled copies need (they sit within
      0.10), so a diverse population keeps it, and a population of look-alike images (charts, screenshots of one
      dashboard) shrinks it until its distinct images stop counting as re-used sources. The ``reuse`` and
      ``link`` signals use it.

    Returns ``{"params": SignalParams dict, "knn_values": n, "w_values": n, "dmin_values": n, "percentile": p,
    "dmin_percentile": d or None, "dup_distance_lowered": bool}``.
    """
    p = base or SignalParams()
    bp = BenignParams(clients=1, photos_per_client=len(images), retry_p=0.0, reupload_p=0.0)
    knn: list[float] = []
    ws: list[float] = []
    dmins: list[float] = []
    for s in range(seeds):
        d = benign_distances(benign_observations(images, info, bp, seed=10_000 + s), p)
        knn += d.knn
        ws += d.w
        dmins += d.dmin
    upd: dict[str, Any] = {}
    if knn:
        upd["knn_threshold"] = round(float(np.percentile(knn, percentile)), 4)
    if ws:
        upd["prada_delta"] = round(float(min(0.99, np.percentile(ws, percentile))), 4)
    dmin_p = round(float(np.percentile(dmins, percentile)), 4) if dmins else None
    if dmin_p is not None and dmin_p < p.dup_distance:
        upd["dup_distance"] = max(dmin_p, 1e-3)  # the field must stay > 0 (identical descriptors: 0)
    params = p.model_copy(update=upd)
    return {"params": params.model_dump(), "knn_values": len(knn), "w_values": len(ws), "dmin_values": len(dmins),
            "percentile": percentile, "dmin_percentile": dmin_p, "dup_distance_lowered": "dup_distance" in upd}


def _detection(engine: MonitorEngine, spec: AttackerSpec) -> dict[str, Any]:
    keys = [f"{spec.name}-k{i}" for i in range(spec.keys)]
    states = [engine.clients.get(k) for k in keys]
    at = [s.flagged_at_query for s in states if s is not None and s.flagged_at_query is not None]
    # key j's n-th query is the attacker's ((n - 1) * keys + j + 1)-th (round robin)
    total = [((s.flagged_at_query - 1) * spec.keys + j + 1) for j, s in enumerate(states)
             if s is not None and s.flagged_at_query is not None]
    linked = [k for k, s in zip(keys, states, strict=True) if s is not None
              and any(o in keys for o in s.linked_keys(engine.config.signals))]
    return {"name": spec.name, "strategy": spec.strategy, "keys": spec.keys, "rate_fraction": spec.rate_fraction,
            "queries": spec.queries, "flagged_keys": len(at), "queries_to_detection": min(total) if total else None,
            "max_risk": round(max((s.risk for s in states if s is not None), default=0.0), 4),
            "linked_fraction": round(len(linked) / len(keys), 3) if spec.keys > 1 else None}


def _benign_summary(engine: MonitorEngine, names: list[str]) -> dict[str, Any]:
    states = [engine.clients[n] for n in names if n in engine.clients]
    flagged = [s.client for s in states if s.flagged]
    linked = [s.client for s in states if s.linked_keys(engine.config.signals)]
    risks = sorted(s.risk for s in states)
    return {"clients": len(states), "queries": sum(s.queries for s in states), "flagged": len(flagged),
            "fpr": round(len(flagged) / max(1, len(states)), 4), "linked": len(linked),
            "link_fpr": round(len(linked) / max(1, len(states)), 4), "escalated": sum(s.level > 0 for s in states),
            "risk_p50": round(risks[len(risks) // 2], 4) if risks else None,
            "risk_max": round(risks[-1], 4) if risks else None, "flagged_names": flagged[:20]}


def evaluate_offline(benign_images: Sequence[NamedImage], attacker_images: Sequence[NamedImage], info: ModelInfo,
                     config: MonitorConfig, attackers: Sequence[AttackerSpec], benign: BenignParams,
                     seed: int = 0, tier_rate: float = 1.0) -> dict[str, Any]:
    """The benign population alone, then the benign population plus one attacker at a time (each attacker in
    its own engine: attackers drawing on one photo pool would otherwise link to each other)."""
    ben = benign_observations(benign_images, info, benign, seed, prefix="benign")
    names = sorted({o.client for o in ben})

    def run(obs: list[Observation]) -> MonitorEngine:
        engine = MonitorEngine(config, {"free": tier_rate})
        for o in sorted(obs, key=lambda o: o.ts):
            engine.process(o)
        return engine

    rows = []
    for i, spec in enumerate(attackers):
        engine = run(ben + attacker_observations(spec, attacker_images, info, seed + i, tier_rate))
        rows.append(_detection(engine, spec) | {"benign_flagged_alongside": _benign_summary(engine, names)["flagged"]})
    return {"mode": "offline", "seed": seed, "task": info.task, "scale": info.scale, "tier_rate": tier_rate,
            "benign_params": benign.model_dump(), "benign": _benign_summary(run(ben), names), "attackers": rows}


# ------------------------------------------------------------------------------------------------- live


async def make_keys(url: str, admin_key: str, names: list[str], tier: str) -> dict[str, str]:
    """Create one API key per name in ``tier`` through the admin API; ``{name: key}``. A refusal (a name
    that already has a key, a wrong admin key, an unknown tier) raises :class:`EvaluationError` with the
    server's error code and detail."""
    out = {}
    async with VictimAdminClient(url, admin_key) as admin:
        for n in names:
            try:
                out[n] = await admin.create_key(n, tier)
            except VictimUnreachableError as exc:
                raise EvaluationError(f"{exc} (creating keys)") from None
            except AdminApiError as exc:
                again = ("; keys of an earlier run stay: pass another --prefix for a new set of customers"
                         if "already has a key" in exc.detail else "")
                raise EvaluationError(f"the victim refused to create key {n!r} (tier {tier!r}): HTTP {exc.status} "
                                      f"{exc.error}: {exc.detail}{again}") from None
    return out


async def _send(vc: VictimClient, model: str, key: str, body: bytes) -> Outcome:
    """One query as the evaluation's attackers send it: 429s waited out (50 times at most), 5xx and transport
    errors retried (``max_retries``); a refusal (a blocked key, a used-up quota) is returned, not raised."""
    return await vc.translate_retrying(model, key, body, check=False)


async def _run_attacker(url: str, model: str, spec: AttackerSpec, keys: list[str], bodies: list[bytes],
                        tier_rate: float | None) -> int:
    dt = 1.0 / (tier_rate * spec.rate_fraction) if tier_rate else 0.0
    sent = 0
    async with VictimClient(url) as vc:
        for i, body in enumerate(bodies):
            t = time.monotonic()
            await _send(vc, model, keys[i % len(keys)], body)
            sent += 1
            if dt:
                await asyncio.sleep(max(0.0, dt - (time.monotonic() - t)))
    return sent


async def _monitor_view(url: str, admin_key: str) -> dict[str, dict[str, Any]]:
    async with VictimAdminClient(url, admin_key) as admin:
        return await admin.clients()


async def evaluate_live(url: str, admin_key: str, model: str, benign_images: Sequence[NamedImage],
                        attacker_images: Sequence[NamedImage], attackers: Sequence[AttackerSpec],
                        benign: BenignParams, seed: int = 0, tier: str = "free", tier_rate: float | None = None,
                        time_scale: float = 0.05, run_id: str = "m", settle_s: float = 30.0) -> dict[str, Any]:
    """Run benign customers and attackers concurrently against ``url`` (monitor on) and report detection.

    Keys ``{run_id}-benign-NNN`` and ``{run_id}-ATTACKER-kJ`` are created on ``tier`` through the admin API.
    ``tier_rate``: requests/s the attackers pace at (None = as fast as answered).
    """
    async with VictimClient(url) as vc:
        info = await vc.model_info(model)
    plan = plan_benign(benign_images, info, benign, seed, prefix=f"{run_id}-benign")
    bkeys = await make_keys(url, admin_key, [c.name for c in plan], tier)
    jobs = [run_benign(url, model, bkeys, plan, time_scale)]
    specs = [s.model_copy(update={"name": f"{run_id}-{s.name}"}) for s in attackers]
    for i, spec in enumerate(specs):
        names = [f"{spec.name}-k{j}" for j in range(spec.keys)]
        keys = await make_keys(url, admin_key, names, tier)
        bodies = attacker_bodies(spec, attacker_images, info, seed + i)
        jobs.append(_run_attacker(url, model, spec, [keys[n] for n in names], bodies, tier_rate))
    await asyncio.gather(*jobs)
    expected = {c.name: len(c.requests) for c in plan}
    for spec in specs:
        for j in range(spec.keys):
            expected[f"{spec.name}-k{j}"] = len(range(j, spec.queries, spec.keys))
    deadline = time.monotonic() + settle_s
    while True:
        view = await _monitor_view(url, admin_key)
        if all(view.get(n, {}).get("queries", 0) >= q for n, q in expected.items()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    engine_like = _ViewEngine(view, MonitorConfig().signals.link_shared)
    benign_names = [c.name for c in plan]
    return {"mode": "live", "url": url, "model": model, "seed": seed, "tier": tier, "tier_rate": tier_rate,
            "benign_params": benign.model_dump(), "benign": engine_like.benign(benign_names),
            "attackers": [engine_like.attacker(s) for s in specs],
            "caught_up": all(view.get(n, {}).get("queries", 0) >= q for n, q in expected.items())}


class _ViewEngine:
    """The admin view (``GET /v1/admin/clients``) summarised like :func:`_benign_summary`/:func:`_detection`."""

    def __init__(self, view: dict[str, dict[str, Any]], link_shared: int) -> None:
        self.view = view
        self.link_shared = link_shared

    def benign(self, names: list[str]) -> dict[str, Any]:
        rows = [self.view[n] for n in names if n in self.view]
        flagged = [r["client"] for r in rows if r["flagged"]]
        linked = [r["client"] for r in rows if r["signals"].get("link", 0) > 0 or r["signals"].get("region", 0) > 0]
        return {"clients": len(rows), "queries": sum(r["queries"] for r in rows), "flagged": len(flagged),
                "fpr": round(len(flagged) / max(1, len(rows)), 4), "linked": len(linked),
                "link_fpr": round(len(linked) / max(1, len(rows)), 4),
                "escalated": sum(r["level"] > 0 for r in rows), "flagged_names": flagged[:20]}

    def attacker(self, spec: AttackerSpec) -> dict[str, Any]:
        keys = [f"{spec.name}-k{j}" for j in range(spec.keys)]
        rows = [self.view.get(k) for k in keys]
        total = [((r["flagged_at_query"] - 1) * spec.keys + j + 1) for j, r in enumerate(rows)
                 if r is not None and r["flagged_at_query"] is not None]
        linked = [k for k, r in zip(keys, rows, strict=True) if r is not None and any(o in keys for o in r["linked"])]
        return {"name": spec.name, "strategy": spec.strategy, "keys": spec.keys, "rate_fraction": spec.rate_fraction,
                "queries": spec.queries, "flagged_keys": len(total),
                "queries_to_detection": min(total) if total else None,
                "max_risk": max((r["risk"] for r in rows if r is not None), default=0.0),
                "levels": [r["level"] if r else None for r in rows],
                "linked_fraction": round(len(linked) / len(keys), 3) if spec.keys > 1 else None}


def benign_customers_fpr(images: Sequence[NamedImage], info: ModelInfo, config: MonitorConfig, customers: int = 100,
                         seed: int = 0, tier_rate: float = 1.0) -> dict[str, Any]:
    """False-positive rate over ``customers`` independent long customers, each sending every photo of
    ``images`` (at random sizes, with retries and re-uploads), scored alone (no cross-key linking: they
    share the photo pool by construction). The null: a customer sending its own distinct photos.

    ``fpr_if_region_linked``: the same customers, each linked by shared regions to another (silent) client
    before its first query, so the ``region`` signal is on throughout: what a chance link costs an honest
    customer (a busy service makes such links; docs/monitor.md). None when region linking is off."""
    bp = BenignParams(clients=1, photos_per_client=len(images))
    flagged = linked_flagged = 0
    risks: list[float] = []
    queries = 0
    p = config.signals
    for c in range(customers):
        obs = benign_observations(images, info, bp, seed=seed + 1 + c, prefix=f"cust{c}")
        for chance_link in (False, True) if p.region_shared > 0 else (False,):
            engine = MonitorEngine(config, {"free": tier_rate})
            s = engine.state(obs[0].client)
            if chance_link:
                s.region_links["chance-partner"] = p.region_shared
            for o in obs:
                engine.process(o)
            if chance_link:
                linked_flagged += s.flagged
            else:
                flagged += s.flagged
                risks.append(s.risk)
                queries += s.queries
    return {"customers": customers, "queries": queries, "flagged": flagged, "fpr": round(flagged / customers, 4),
            "risk_p50": round(float(np.median(risks)), 4), "risk_p99": round(float(np.percentile(risks, 99)), 4),
            "fpr_if_region_linked": round(linked_flagged / customers, 4) if p.region_shared > 0 else None}


def long_customers_summary(c: dict[str, Any]) -> str:
    """One line for :func:`benign_customers_fpr`'s result: flagged long customers, with and without a chance
    shared region."""
    line = f"long customers {c['flagged']}/{c['customers']} flagged ({c['queries']} queries)"
    if c.get("fpr_if_region_linked") is not None:
        line += f", {c['fpr_if_region_linked']:.0%} if each were linked by a chance shared region"
    return line


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: attacker -> queries to detection per task (``results``: task -> an evaluation's JSON)."""
    tasks = list(results)
    head = "| attacker | keys | rate (x tier) | " + " | ".join(f"{t}: queries to detection" for t in tasks) + " |"
    lines = [head, "|---|---|---|" + "---|" * len(tasks)]
    first = results[tasks[0]]["attackers"]
    for i, a in enumerate(first):
        cells = []
        for t in tasks:
            b = results[t]["attackers"][i]
            q = b["queries_to_detection"]
            link = f", {b['linked_fraction']:.0%} keys linked" if b.get("linked_fraction") is not None else ""
            cells.append(f"{q if q is not None else 'not flagged'} / {b['queries']}{link}")
        row = f"| {a['name']} ({a['strategy']}) | {a['keys']} | {a['rate_fraction']} | "
        lines.append(row + " | ".join(cells) + " |")
    fprs = []
    for t in tasks:
        r = results[t]
        c = r.get("benign_customers")
        extra = f"; {long_customers_summary(c)}" if c else ""
        fprs.append(f"{t}: population {r['benign']['flagged']}/{r['benign']['clients']} flagged, "
                    f"{r['benign']['linked']} linked{extra}")
    return "\n".join(lines) + "\n\nBenign false positives: " + "; ".join(fprs) + "."


async def monitor_view(url: str, admin_key: str) -> dict[str, dict[str, Any]]:
    """``GET /v1/admin/clients`` as ``{client name: its risk row}``."""
    return await _monitor_view(url, admin_key)


async def escalation_timeline(url: str, admin_key: str, model: str, client: str, key: str, bodies: Sequence[bytes],
                              wait_s: float = 10.0) -> list[dict[str, Any]]:
    """Send ``bodies`` one at a time as ``client`` and read the monitor's view of it after each query.

    After query ``i`` the loop waits (up to ``wait_s``) until the monitor has seen ``i`` entries of the
    client, then records ``{"query": i, "status", "risk", "level", "flagged"}``: the escalation timeline.
    """
    out: list[dict[str, Any]] = []
    async with VictimClient(url) as vc, VictimAdminClient(url, admin_key) as admin:
        for i, body in enumerate(bodies, start=1):
            o = await _send(vc, model, key, body)
            row: dict[str, Any] = {}
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                try:
                    row = await admin.client_risk(client)
                    if row["queries"] >= i:
                        break
                except AdminApiError:
                    pass  # 404 unknown_client until the monitor has seen the first query
                await asyncio.sleep(0.05)
            out.append({"query": i, "status": o.status, "risk": float(row.get("risk", 0.0)),
                        "level": int(row.get("level", 0)), "flagged": bool(row.get("flagged", False))})
    return out
