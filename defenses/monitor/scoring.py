"""Per-client monitor state and the signals that turn it into a risk score (pure: no I/O, no clock).

Signals, each in [0, 1] (parameters: :class:`~defenses.monitor.config.SignalParams`):

* ``rate``: sustained request rate over the client's recent queries as a fraction of its tier's rate
  (anchor: the tier itself; an extraction run lives at the rate limit, customers mostly do not).
* ``reuse``: input novelty/coverage. Fraction of recent admitted queries whose nearest earlier query of
  the client is a near-duplicate of another source (distance < ``dup_distance`` in the crop-tolerant
  embedding) without being a byte-identical resend. Crops and tiles of few photos reuse sources; customers
  send new photos (anchor: single-example imitation builds its whole training set from one photo's crops).
* ``knn``: stateful detection (Chen, Carlini & Wagner 2019, "Stateful detection of black-box adversarial
  attacks"): per query, the mean distance to its ``k`` nearest past queries of the client; a query below the
  benign-percentile threshold is a hit.
* ``prada``: PRADA (Juuti et al. 2019): the minimum distance of each new query to the client's earlier ones
  is collected; benign streams give roughly normal minimum distances, so Shapiro-Wilk ``W < delta`` alarms.
* ``link``: cross-key similarity: the key shares >= ``link_shared`` near-duplicate sources with another key
  (Sybil keys fed from one photo pool; :class:`~defenses.monitor.linking.SybilIndex`).
* ``region``: >= ``region_shared`` of the key's queries overlap a query of another key pixel for pixel (crops
  of one photo; :class:`~defenses.monitor.regions.RegionIndex`). Its default weight is below ``flag_risk``:
  a chance match between unrelated photos is rare but not rare enough at a busy service's volume
  (docs/monitor.md), so a region link alone never flags; with any other evidence it does.

Byte-identical resends (same SHA-256 as a past query: retries) only count towards volume.
"""

from __future__ import annotations

import base64
import json
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from defenses.monitor.config import MonitorConfig, SignalParams, SignalWeights
from defenses.monitor.embedding import DIM
from defenses.monitor.regions import RegionPrint

TIMES_KEPT = 64
PRADA_EVERY = 4
"""Shapiro-Wilk W is recomputed every this many new minimum distances."""


@dataclass(frozen=True)
class Observation:
    """One query-log entry as the monitor sees it. ``ts`` Unix seconds; ``embedding`` ``(DIM,)`` or None
    (refused or undecodable request); ``seq`` orders entries (stream id or line number) for exactly-once."""

    client: str
    tier: str | None
    ts: float
    ok: bool
    sha: str | None
    embedding: np.ndarray | None
    seq: tuple[int, int] = (0, 0)
    regions: RegionPrint | None = None


@dataclass
class ClientState:
    """Everything the monitor remembers about one client (serialisable with :meth:`to_json`)."""

    client: str
    tier: str | None = None
    queries: int = 0
    admitted: int = 0
    resends: int = 0
    times: list[float] = field(default_factory=list)
    embs: np.ndarray = field(default_factory=lambda: np.zeros((0, DIM), np.float32))
    shas: list[str] = field(default_factory=list)
    dmins: list[float] = field(default_factory=list)
    reuse_flags: list[int] = field(default_factory=list)
    knn_flags: list[int] = field(default_factory=list)
    knn_values: list[float] = field(default_factory=list)
    prada_w: float | None = None
    n_dmins: int = 0
    links: dict[str, int] = field(default_factory=dict)  # other client -> matching queries of the pair
    link_ids: dict[str, list[list[int]]] = field(default_factory=dict)  # other -> [my, their] matching query numbers
    sources: int = 0  # novel embedded queries so far (the query numbers of the cross-key index)
    region_links: dict[str, int] = field(default_factory=dict)
    risk: float = 0.0
    signals: dict[str, float] = field(default_factory=dict)
    flagged_at_query: int | None = None
    level: int = 0
    last_seq: tuple[int, int] = (0, 0)

    @property
    def flagged(self) -> bool:
        return self.flagged_at_query is not None

    def to_json(self) -> str:
        d = {k: v for k, v in self.__dict__.items() if k != "embs"}
        d["embs"] = base64.b64encode(self.embs.astype(np.float16).tobytes()).decode()
        d["last_seq"] = list(self.last_seq)
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> ClientState:
        d = json.loads(raw)
        embs = np.frombuffer(base64.b64decode(d.pop("embs")), dtype=np.float16).astype(np.float32)
        d["last_seq"] = tuple(d.get("last_seq", (0, 0)))
        return cls(embs=embs.reshape(-1, DIM), **d)

    def summary(self, p: SignalParams) -> dict[str, object]:
        """The admin view: risk, flag, level, counts, the contributing signals and the keys linked under ``p``
        (the monitor's own rule, :meth:`linked_keys`)."""
        return {"client": self.client, "tier": self.tier, "risk": round(self.risk, 4), "flagged": self.flagged,
                "level": self.level, "queries": self.queries, "admitted": self.admitted, "resends": self.resends,
                "flagged_at_query": self.flagged_at_query,
                "signals": {k: round(v, 4) for k, v in self.signals.items()},
                "linked": self.linked_keys(p)}

    def distinct_shared(self, other: str) -> int:
        """The fewer of the pair's distinct matching queries on either side (the matching-query count for states
        written before query numbers were kept)."""
        ids = self.link_ids.get(other)
        return min(len(ids[0]), len(ids[1])) if ids else self.links.get(other, 0)

    def source_linked(self, other: str, threshold: int) -> bool:
        """Linked to ``other`` by shared sources: ``>= threshold`` matching queries, from at least
        ``min(threshold, 2)`` distinct queries on *each* side. One customer re-uploading, at several sizes, one
        photo that another customer also sent matches one query of the other: no link."""
        return self.links.get(other, 0) >= threshold and self.distinct_shared(other) >= min(threshold, 2)

    def linked_keys_at(self, threshold: int | None, region_threshold: int = 1) -> list[str]:
        """Other clients linked by shared sources (:meth:`source_linked` at ``threshold``; None: any match) or
        with ``>= region_threshold`` shared regions (0: regions ignored)."""
        if threshold is None:
            by_source = {c for c, n in self.links.items() if n >= 1}
        else:
            by_source = {c for c in self.links if self.source_linked(c, threshold)}
        by_region = {c for c, n in self.region_links.items() if n >= region_threshold} if region_threshold else set()
        return sorted(by_source | by_region)

    def linked_keys(self, p: SignalParams) -> list[str]:
        """The clients this one is linked to under ``p``, by shared sources or shared regions."""
        return self.linked_keys_at(p.link_shared, p.region_shared)


def unit_distances(history: np.ndarray, e: np.ndarray) -> np.ndarray:
    """L2 distances ``(m,)`` from unit vector ``e`` ``(DIM,)`` to each unit row of ``history`` ``(m, DIM)``."""
    return np.sqrt(np.maximum(2.0 - 2.0 * (history @ e), 0.0))


def _push(xs: list, v: object, keep: int) -> None:  # type: ignore[type-arg]
    xs.append(v)
    if len(xs) > keep:
        del xs[: len(xs) - keep]


def observe(state: ClientState, obs: Observation, p: SignalParams, pool: np.ndarray | None = None) -> float | None:
    """Fold one observation into ``state`` (in place). Returns the query's minimum distance to the client's
    earlier queries (None when it had no embedding, was a resend, or is the first).

    ``pool`` ``(m, DIM)``: embeddings of the keys this client is linked to; the query's distances (reuse,
    k-NN, PRADA) are then measured against the client's history *and* theirs, so linked keys are scored as
    one history (the monitor engine passes them; ``state.embs`` keeps the client's own queries only).
    """
    state.queries += 1
    state.tier = obs.tier or state.tier
    state.last_seq = max(state.last_seq, obs.seq)
    _push(state.times, obs.ts, TIMES_KEPT)
    if not obs.ok:
        return None
    state.admitted += 1
    if obs.embedding is None:
        return None
    if obs.sha is not None and obs.sha in state.shas:
        state.resends += 1
        return None
    e = np.asarray(obs.embedding, np.float32).reshape(1, DIM)
    dmin: float | None = None
    history = state.embs if pool is None or not len(pool) else np.concatenate([state.embs, pool])
    if len(history):
        d = unit_distances(history, e[0])
        dmin = float(d.min())
        _push(state.dmins, dmin, p.prada_max)
        state.n_dmins += 1
        n = state.n_dmins
        if n >= p.prada_min and (n - p.prada_min) % PRADA_EVERY == 0:
            state.prada_w = shapiro_w(state.dmins)  # every few queries: the test costs ~0.5 ms
        _record_hits(state, d, p)
    state.embs = np.concatenate([state.embs, e])[-p.history:]
    _push(state.shas, obs.sha or "", p.history)
    return dmin


def rescan(state: ClientState, p: SignalParams, pool: np.ndarray | None) -> None:
    """Re-measure the reuse and k-NN hits of the client's last ``window`` novel queries against its own
    earlier queries *and* ``pool`` (the embeddings of the keys it is now linked to), in place.

    :func:`observe` compares each query with the history that existed when it arrived, so the queries a
    Sybil key sent before its link was found were scored alone, and a short key never builds a window of
    hits. When a link forms, the key's recent queries are scored again as part of the pooled history
    (all of ``pool``, sent before or after them: linked keys are treated as one client). PRADA's
    minimum-distance sequence is not rewritten (it is a test of the arrival order)."""
    if pool is None or not len(pool) or not len(state.embs):
        return
    embs, n = state.embs, len(state.embs)
    everything = np.concatenate([embs, pool])
    state.reuse_flags, state.knn_flags, state.knn_values = [], [], []
    for j in range(max(0, n - p.window), n):
        d = unit_distances(everything, embs[j])
        _record_hits(state, np.concatenate([d[:j], d[n:]]), p)  # own earlier queries and the whole pool


def _record_hits(state: ClientState, d: np.ndarray, p: SignalParams) -> None:
    """Append one query's reuse and k-NN hits (``d``: its distances to the history it is compared with)."""
    _push(state.reuse_flags, int(float(d.min()) < p.dup_distance), p.window)
    if len(d) >= p.k:
        m = float(np.partition(d, p.k - 1)[: p.k].mean())
        _push(state.knn_values, m, p.window)
        _push(state.knn_flags, int(m < p.knn_threshold), p.window)


def shapiro_w(values: list[float]) -> float | None:
    """Shapiro-Wilk W of ``values`` (None when fewer than 3 or all equal)."""
    if len(values) < 3 or float(np.std(values)) < 1e-6:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.shapiro(np.asarray(values, np.float64)).statistic)


def signals(state: ClientState, tier_rate: float | None, p: SignalParams) -> dict[str, float]:
    """The signals of ``state`` (see the module doc). ``tier_rate``: requests/s, None = unlimited tier."""
    out: dict[str, float] = {}
    t = state.times
    if len(t) >= p.rate_min_queries:
        span = max(t[-1] - t[0], 1e-3)
        ratio = (len(t) - 1) / span / (tier_rate or p.unlimited_rate)
        out["rate"] = float(np.clip((ratio - p.rate_floor) / p.rate_span, 0.0, 1.0))
    novel = len(state.embs)
    if novel >= p.min_queries and state.reuse_flags:
        frac = float(np.mean(state.reuse_flags))
        out["reuse"] = float(np.clip((frac - p.reuse_floor) / p.reuse_span, 0.0, 1.0))
    if novel >= p.min_queries and state.knn_flags:
        out["knn"] = min(1.0, sum(state.knn_flags) / p.knn_hits)
    if len(state.dmins) >= p.prada_min:
        w = state.prada_w
        if w is not None:
            out["prada_w"] = w
            out["prada"] = float(np.clip((p.prada_delta + p.prada_margin - w) / p.prada_margin, 0.0, 1.0))
    out["link"] = 1.0 if state.linked_keys_at(p.link_shared, 0) else 0.0
    if p.region_shared > 0:
        out["region"] = 1.0 if any(n >= p.region_shared for n in state.region_links.values()) else 0.0
    return out


def combine(sig: dict[str, float], w: SignalWeights) -> float:
    """Noisy-OR of the weighted signals: ``1 - prod(1 - w_i s_i)`` in [0, 1]."""
    keep = 1.0
    for name in ("rate", "reuse", "knn", "prada", "link", "region"):
        keep *= 1.0 - getattr(w, name) * sig.get(name, 0.0)
    return float(min(1.0, max(0.0, 1.0 - keep)))


def rescore(state: ClientState, tier_rate: float | None, cfg: MonitorConfig) -> bool:
    """Recompute ``state.risk``/``signals``/flag/level; True when the level went up (levels never go down)."""
    state.signals = signals(state, tier_rate, cfg.signals)
    state.risk = combine(state.signals, cfg.weights)
    if state.flagged_at_query is None and state.risk >= cfg.flag_risk:
        state.flagged_at_query = state.queries
    level = cfg.level_for(state.tier, state.risk)
    if level > state.level:
        state.level = level
        return True
    return False
