"""Cross-key similarity: link API keys whose queries come from the same source photos (Sybil keys).

Every admitted, embedded query of every client goes into a ring of the last ``capacity`` queries. A new
query of client ``a`` closer than ``dup_distance`` to a query of another client ``b`` is one shared source
for the pair; :class:`~defenses.monitor.scoring.ClientState.links` counts them on both sides, and a pair
with ``>= link_shared`` shared sources is linked (the ``link`` signal). Customers rarely send the same
photo as another customer; an attacker that spreads crops of one photo pool over many keys does.
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
        self.n = 0

    def matches(self, client: str, e: np.ndarray, dup_distance: float) -> list[str]:
        """Other clients with a recent query within ``dup_distance`` of ``e`` (each named once)."""
        m = min(self.n, self.capacity)
        if m == 0:
            return []
        # unit vectors: |a - b|^2 = 2 - 2 a.b (one matrix-vector product instead of an (m, DIM) difference)
        hits = np.flatnonzero(self.embs[:m] @ e.reshape(DIM) > 1.0 - dup_distance * dup_distance / 2)
        return sorted({o for i in hits if (o := self.owners[i]) is not None and o != client})

    def add(self, client: str, e: np.ndarray) -> None:
        i = self.n % self.capacity
        self.embs[i] = e
        self.owners[i] = client
        self.n += 1
