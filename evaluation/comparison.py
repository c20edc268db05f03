"""Build one :class:`~evaluation.results.Comparison` image by image in constant memory.

A comparison scores outputs against references: per-image full-reference metrics into streaming
aggregators and, when a feature network is given, features for set-level FID and KID. Metrics an
image is too small for (MS-SSIM below 161 px) are dropped for the whole set with a note, so a
summary never mixes images scored and not scored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from evaluation.aggregate import ScoreAggregator
from evaluation.errors import EvaluationError
from evaluation.features import FeatureNetwork
from evaluation.fid import fid_result, kid_result
from evaluation.metrics import ImageMetric, MetricSettings, build_metric
from evaluation.results import Comparison, MetricScores


class ComparisonBuilder:
    """Accumulates ``(name, output, reference)`` image pairs ``(1, 3, H, W)`` in [0, data_range].

    ``finish()`` returns the :class:`Comparison` with summaries (bootstrap CI at ``confidence``,
    seeded), per-image scores and FID/KID (``kid_subsets`` subsets of up to ``kid_subset_size``).
    """

    def __init__(
        self,
        output: str,
        reference: str,
        image_set: str,
        metrics: Sequence[str | ImageMetric] = ("psnr", "ssim", "ms_ssim"),
        settings: MetricSettings | None = None,
        feature_network: FeatureNetwork | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        seed: int = 0,
    ) -> None:
        settings = settings or MetricSettings()
        self.output, self.reference, self.image_set = output, reference, image_set
        self.metrics = [m if isinstance(m, ImageMetric) else build_metric(m, settings) for m in metrics]
        self.aggs = {m.name: ScoreAggregator(m.name, seed=seed) for m in self.metrics}
        self.usable = {m.name: True for m in self.metrics}
        self.notes: list[str] = []
        self.network = feature_network
        self.kid_subsets, self.kid_subset_size, self.seed = kid_subsets, kid_subset_size, seed
        self._feats_out: list[np.ndarray] = []
        self._feats_ref: list[np.ndarray] = []
        self.n = 0

    def add(self, name: str, output: torch.Tensor, reference: torch.Tensor,
            output_features: np.ndarray | None = None, reference_features: np.ndarray | None = None) -> None:
        """Score one pair; ``*_features`` reuse feature-network outputs already computed for an image."""
        if output.shape != reference.shape:
            raise EvaluationError(f"{self.image_set}/{name}: {self.output} {tuple(output.shape)} and "
                                  f"{self.reference} {tuple(reference.shape)} differ in shape")
        for m in self.metrics:
            if not self.usable[m.name]:
                continue
            reason = m.check_size(*output.shape[-2:])
            if reason:
                self.usable[m.name] = False
                self.notes.append(f"{m.label} not computed on {self.image_set}: {name}: {reason}")
                continue
            self.aggs[m.name].add(m(output, reference), [name])
        if self.network is not None:
            out = output_features if output_features is not None else self.network(output).numpy()
            self._feats_out.append(out)
            ref = reference_features if reference_features is not None else self.network(reference).numpy()
            self._feats_ref.append(ref)
        self.n += 1

    def values(self, metric: str) -> list[float]:
        """Per-image scores kept for ``metric`` (all of them unless the aggregator overflowed)."""
        return self.aggs[metric].values() if self.usable.get(metric) else []

    def finish(self, confidence: float = 0.95) -> Comparison:
        comp = Comparison(output=self.output, reference=self.reference, image_set=self.image_set,
                          n_images=self.n, notes=list(self.notes))
        for m in self.metrics:
            if self.usable[m.name] and self.aggs[m.name].n:
                agg = self.aggs[m.name]
                comp.metrics[m.name] = MetricScores(
                    metric=m.name, unit=m.unit, higher_is_better=m.higher_is_better,
                    summary=agg.summary(confidence, seed=self.seed), per_image=agg.per_image())
        if self.network is None:
            comp.notes.append("FID/KID not computed: no feature network given (see docs/evaluation.md)")
        elif self.n < 2:
            comp.notes.append("FID/KID not computed: they need at least 2 images")
        else:
            fa, fb = np.concatenate(self._feats_out), np.concatenate(self._feats_ref)
            comp.fid = fid_result(fa, fb, self.network.info)
            comp.kid = kid_result(fa, fb, self.network.info, self.kid_subsets, self.kid_subset_size, seed=self.seed)
            if self.n < fa.shape[1]:
                comp.notes.append(f"FID on {self.n} images (< {fa.shape[1]} feature dimensions) is biased high; "
                                  "compare it only at equal set sizes")
        return comp
