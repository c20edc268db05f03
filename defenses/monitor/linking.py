"""Cross-key similarity: link API keys whose queries come from the same source photos (Sybil keys).

Every admitted, embedded query of every client goes into a ring of the last ``capacity`` queries, with its
client's query number. A new query of client ``a`` closer than ``dup_distance`` to queries of another
client ``b`` is a match. :class:`~defenses.monitor.scoring.ClientState.links` counts, on both sides, the
*shared sources* of the pair: the smaller of the number of distinct queries of ``a`` and of ``b`` that
took part in a match (:func:`shared_count`). A pair with ``>= link_shared`` of them is linked (the
``link`` signal). Counting distinct queries on both sides means that one customer re-uploading a photo
another customer also sent (at three sizes, say) shares one source with that customer, not three, while
two keys that both send many crops of one photo pool share as many as the fewer of their matching queries.
Customers rarely send the same photo as another customer; an attacker that spreads crops of one photo
pool over many keys does.
"""

from __future__ import annotations

import numpy as np

from defenses.monitor.embedding import DIM


class SybilIndex:
    """Recent embeddings of all clients: ``(capacity, DIM)`` ring with the owner of each row."""

    def __init__(self, capacity: int = 8192) -> None:
        self.capacity = capacity
        self.embs = np.zeros((capacity, DIM), np.float32)
        self.owners: list[str | None] = [None] * capacity
        self.qids = [0] * capacity
        self.n = 0

    def matches(self, client: str, e: np.ndarray, dup_distance: float) -> dict[str, list[int]]:
        """Other clients with recent queries within ``dup_distance`` of ``e``: ``{client: [their query
        numbers]}``, sorted by client."""
        m = min(self.n, self.capacity)
        if m == 0:
            return {}
        # unit vectors: |a - b|^2 = 2 - 2 a.b (one matrix-vector product instead of an (m, DIM) difference)
        hits = np.flatnonzero(self.embs[:m] @ e.reshape(DIM) > 1.0 - dup_distance * dup_distance / 2)
        out: dict[str, list[int]] = {}
        for i in hits:
            o = self.owners[i]
            if o is not None and o != client:
                out.setdefault(o, []).append(self.qids[i])
        return dict(sorted(out.items()))

    def add(self, client: str, e: np.ndarray, qid: int) -> None:
        """Remember query number ``qid`` of ``client`` (``e``: its unit embedding ``(DIM,)``)."""
        i = self.n % self.capacity
        self.embs[i] = e
        self.owners[i] = client
        self.qids[i] = qid
        self.n += 1


IDS_KEPT = 64
"""Query numbers remembered per side of a pair: the shared-source count saturates there (far above any
``link_shared``)."""


def shared_count(mine: list[int], theirs: list[int], q: int, matched: list[int]) -> tuple[list[int], list[int]]:
    """One pair's distinct matching query numbers after query ``q`` of this side matched ``matched`` of the
    other side (sorted, at most :data:`IDS_KEPT` each); the pair's shared sources are the smaller length."""
    if len(mine) < IDS_KEPT and q not in mine:
        mine = sorted([*mine, q])
    extra = sorted(set(matched) - set(theirs))
    theirs = sorted([*theirs, *extra[: max(0, IDS_KEPT - len(theirs))]])
    return mine, theirs
