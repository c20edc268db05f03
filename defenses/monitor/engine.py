"""The monitor engine: folds query-log entries into per-client state, risk and escalation levels.

Pure and single-threaded: the service (``victim_service.monitor``) feeds it entries in log order and
persists the states it returns. Entries at or before a client's ``last_seq`` are skipped, so replaying a
batch after a crash never counts an entry twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from defenses.monitor.config import MonitorConfig
from defenses.monitor.embedding import decode_embedding
from defenses.monitor.linking import SybilIndex, shared_count
from defenses.monitor.regions import RegionIndex, decode_regions
from defenses.monitor.scoring import ClientState, Observation, observe, rescan, rescore


class MalformedEntryError(ValueError):
    """A log entry the monitor cannot use (not JSON, wrong types, bad embedding)."""


def observation_from_entry(d: Mapping[str, Any], seq: tuple[int, int] = (0, 0)) -> Observation | None:
    """A query-log entry (``QueryLogEntry`` as a dict) -> :class:`Observation`; None for entries without a
    client (bad keys are not a client's queries). Raises :class:`MalformedEntryError`."""
    try:
        client = d.get("client")
        if client is None:
            return None
        ts = float(d["ts"])
        status = int(d["status"])
        if not isinstance(client, str) or not math.isfinite(ts):
            raise MalformedEntryError("client must be a string and ts a finite number")
        raw = d.get("embedding")
        emb: np.ndarray | None = decode_embedding(raw) if isinstance(raw, str) and status == 200 else None
        raw_regions = d.get("regions")
        regions = decode_regions(raw_regions) if isinstance(raw_regions, str) and status == 200 else None
        sha = d.get("input_sha256")
        tier = d.get("tier")
        return Observation(client, str(tier) if tier is not None else None, ts, status == 200,
                           str(sha) if sha else None, emb, seq, regions)
    except MalformedEntryError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MalformedEntryError(f"{type(exc).__name__}: {exc}") from None


@dataclass(frozen=True)
class LevelChange:
    """A client whose escalation level went up: the monitor writes it to the level store."""

    client: str
    level: int
    risk: float
    reason: str


class MonitorEngine:
    """State of every client seen. ``tier_rates``: requests/s per tier (None = unlimited)."""

    def __init__(self, config: MonitorConfig, tier_rates: Mapping[str, float | None] | None = None) -> None:
        self.config = config
        self.tier_rates = dict(tier_rates or {})
        self.clients: dict[str, ClientState] = {}
        self.index = SybilIndex()
        self.regions = RegionIndex(config.signals.region_capacity)
        self.processed = 0
        self.skipped = 0

    def load(self, states: Iterable[ClientState]) -> None:
        """Start from persisted states (after a restart or a lease change); rebuilds the cross-key index of
        source descriptors. Region fingerprints are not persisted: the region index refills from new
        queries (shared regions already counted stay in the states)."""
        self.clients = {s.client: s for s in states}
        for s in self.clients.values():
            first = s.sources - len(s.embs)  # the kept embeddings are the client's last novel queries
            for j, e in enumerate(s.embs):
                self.index.add(s.client, e, first + j)

    def state(self, client: str) -> ClientState:
        s = self.clients.get(client)
        if s is None:
            s = self.clients[client] = ClientState(client)
        return s

    def _pool(self, s: ClientState) -> np.ndarray | None:
        """The recent embeddings of the keys ``s`` is linked to (at most ``history`` rows), or None."""
        partners = [self.clients[c].embs for c in s.linked_keys(self.config.signals) if c in self.clients]
        if not partners:
            return None
        return np.concatenate(partners)[-self.config.signals.history:]

    def _link(self, s: ClientState, others: dict[str, list[int]], changed: set[str]) -> list[str]:
        """Fold one match of ``s``'s newest query (number ``s.sources - 1``) with queries of each of ``others``
        into both sides' counts: matching queries (``links``) and the distinct query numbers on each side
        (``link_ids``, :func:`~defenses.monitor.linking.shared_count`); returns the others that just became
        linked (:meth:`~defenses.monitor.scoring.ClientState.source_linked`: their signals must be rescored)."""
        threshold = self.config.signals.link_shared
        q = s.sources - 1
        reached = []
        for other, their_q in others.items():
            o = self.state(other)
            mine, theirs = s.link_ids.get(other, [[], []])
            mine, theirs = shared_count(mine, theirs, q, their_q)
            s.link_ids[other], o.link_ids[s.client] = [mine, theirs], [theirs, mine]
            was = o.source_linked(s.client, threshold)
            s.links[other] = o.links[s.client] = o.links.get(s.client, 0) + 1
            changed.add(other)
            if not was and o.source_linked(s.client, threshold):
                reached.append(other)
        return reached

    def _count_regions(self, s: ClientState, others: list[str], changed: set[str]) -> list[str]:
        """Count one more shared region between ``s`` and each of ``others``, on both sides; returns the others
        whose region link just reached ``region_shared`` (their signals changed and must be rescored)."""
        threshold = self.config.signals.region_shared
        reached = []
        for other in others:
            mine, theirs = s.region_links, self.state(other).region_links
            mine[other] = mine.get(other, 0) + 1
            theirs[s.client] = theirs.get(s.client, 0) + 1
            changed.add(other)
            if theirs[s.client] == threshold:
                reached.append(other)
        return reached

    def process(self, obs: Observation) -> tuple[set[str], list[LevelChange]]:
        """Fold one observation in. Returns the clients whose state changed and any level increases."""
        p = self.config.signals
        s = self.state(obs.client)
        if obs.seq != (0, 0) and obs.seq <= s.last_seq:
            self.skipped += 1
            return set(), []
        self.processed += 1
        novel = obs.ok and obs.embedding is not None and not (obs.sha is not None and obs.sha in s.shas)
        observe(s, obs, p, self._pool(s))
        changed = {s.client}
        newly_linked: list[str] = []
        if novel:
            e = s.embs[-1]
            s.sources += 1
            newly_linked += self._link(s, self.index.matches(s.client, e, p.dup_distance), changed)
            self.index.add(s.client, e, s.sources - 1)
        if novel and obs.regions is not None and p.region_shared > 0:
            others = self.regions.matches(s.client, obs.regions)
            newly_linked += self._count_regions(s, others, changed)
            self.regions.add(s.client, obs.regions)
        if newly_linked and p.rescan_on_link:
            for c in dict.fromkeys([s.client, *newly_linked]):  # a link forms on both sides at once
                rescan(self.clients[c], p, self._pool(self.clients[c]))
        rescore_these = [s.client, *newly_linked]
        ups: list[LevelChange] = []
        for c in rescore_these:
            st = self.clients[c]
            if rescore(st, self.tier_rates.get(st.tier or "", None), self.config):
                top = ", ".join(f"{k}={v:.2f}" for k, v in sorted(st.signals.items()) if k != "prada_w" and v > 0)
                ups.append(LevelChange(c, st.level, st.risk, f"risk {st.risk:.2f} ({top})"))
        return changed, ups
