"""Streaming score aggregation in constant memory.

:class:`ScoreAggregator` takes per-image scores batch by batch and keeps

- exact running count, mean and variance (Welford), min and max;
- the per-image ``(name, score)`` list while it holds at most ``capacity`` entries, and a uniform
  reservoir sample of ``capacity`` scores (Vitter's algorithm R, seeded) from which median, IQR and
  the bootstrap CI are computed once more images than that arrive (``summary().exact`` is then False);
- optionally, every ``(name, score)`` streamed to a JSON-lines ``sink`` so nothing is lost.

Memory is ``O(capacity)`` whatever the number of images; images themselves are never kept.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from typing import TextIO

import torch

from evaluation.errors import EvaluationError
from evaluation.stats import ScoreSummary, Statistic, summarize


class ScoreAggregator:
    """Per-image scores of one metric, aggregated in constant memory.

    Args:
        name: metric name (written to the sink lines).
        capacity: how many scores are kept for quantiles, bootstrap and the per-image list.
        seed: seed of the reservoir sampler.
        sink: optional text stream; each score is written as ``{"metric", "image", "value"}`` JSON line.
    """

    def __init__(self, name: str, capacity: int = 100_000, seed: int = 0, sink: TextIO | None = None) -> None:
        if capacity < 1:
            raise EvaluationError(f"aggregator capacity must be >= 1, got {capacity}")
        self.name = name
        self.capacity = capacity
        self.sink = sink
        self._rng = random.Random(seed)
        self.n = 0
        self._mean = 0.0
        self._m2 = 0.0
        self.min = math.inf
        self.max = -math.inf
        self._reservoir: list[float] = []
        self._per_image: dict[str, float] | None = {}

    def add(self, scores: torch.Tensor | Sequence[float], names: Sequence[str] | None = None) -> None:
        """Add one batch: ``scores`` shaped ``(N,)``; ``names`` (N image names) default to running indices."""
        values = scores.detach().double().cpu().reshape(-1).tolist() if isinstance(scores, torch.Tensor) else [
            float(v) for v in scores
        ]
        if names is not None and len(names) != len(values):
            raise EvaluationError(f"{len(values)} scores but {len(names)} image names")
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise EvaluationError(f"{self.name}: non-finite score {v} for image {names[i] if names else i}")
            name = names[i] if names is not None else str(self.n)
            self._push(name, v)

    def extend(self, items: Iterable[tuple[str, float]]) -> None:
        """Add ``(image name, score)`` pairs one by one."""
        for name, v in items:
            self.add([v], [name])

    def _push(self, name: str, v: float) -> None:
        self.n += 1
        delta = v - self._mean
        self._mean += delta / self.n
        self._m2 += delta * (v - self._mean)
        self.min = min(self.min, v)
        self.max = max(self.max, v)
        if len(self._reservoir) < self.capacity:
            self._reservoir.append(v)
        else:
            j = self._rng.randrange(self.n)
            if j < self.capacity:
                self._reservoir[j] = v
        if self._per_image is not None:
            if name in self._per_image:
                raise EvaluationError(f"{self.name}: image {name!r} scored twice")
            if len(self._per_image) < self.capacity:
                self._per_image[name] = v
            else:
                self._per_image = None  # too many to keep: the sink (if any) has them all
        if self.sink is not None:
            self.sink.write(json.dumps({"metric": self.name, "image": name, "value": v}) + "\n")

    @property
    def mean(self) -> float:
        return self._mean if self.n else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (``ddof=1``); 0 for one score."""
        return math.sqrt(self._m2 / (self.n - 1)) if self.n > 1 else 0.0

    @property
    def exact(self) -> bool:
        return self.n <= self.capacity

    def per_image(self) -> dict[str, float] | None:
        """``{image name: score}`` in arrival order, or None once more than ``capacity`` were added."""
        return dict(self._per_image) if self._per_image is not None else None

    def values(self) -> list[float]:
        """All scores when ``exact``, else the reservoir sample."""
        return list(self._reservoir)

    def summary(
        self, confidence: float = 0.95, statistic: Statistic = "mean", n_resamples: int = 2000, seed: int = 0
    ) -> ScoreSummary:
        """Mean/std/min/max exact; median, IQR and bootstrap CI from the kept scores."""
        if self.n == 0:
            return ScoreSummary(n=0, ci_level=confidence, ci_statistic=statistic)
        s = summarize(
            self._reservoir, confidence, statistic, n_resamples, seed, exact=self.exact,
            mean=self._mean, std=self.std, vmin=self.min, vmax=self.max,
        )
        return s.model_copy(update={"n": self.n})
