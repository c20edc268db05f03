"""Seeded blocks that leave the caller's random state alone.

``torch.manual_seed`` reseeds the process-wide generator: inside the victim service (a defense building its
proxy at start-up) or a campaign (one cell after another) that silently changes every later draw of the
process. :func:`seeded` forks the CPU generator for the block instead, so the block draws exactly what it
would after ``torch.manual_seed(seed)`` and the caller's stream continues afterwards as if nothing ran.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global CPU generator seeded with ``seed`` (weight initialisation, ops
    without an explicit ``generator``); the generator's previous state is restored when the block ends."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
