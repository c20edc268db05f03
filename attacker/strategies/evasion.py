"""Evasion strategies: crops that try to look like a customer's traffic to a query monitor.

Spreading over Sybil keys and slowing to a benign rate are not choices of *which* image to send; they are
how the harvest schedules queries (several ``--api-key``s, ``--max-rate``) and the monitor evaluation
(``evaluation.monitor_eval``) exercises them with any strategy.

* ``interleave``: every ``every``-th query is a whole photo at a random size (what a customer sends),
  the others are random crops, so the crop share of the stream drops.
* ``novel``: random crops of random size (``scale`` range, resampled to the crop size), with a colour
  transform per query strong enough to move colour statistics (channel permutation, hue-like mixing,
  gamma), plus the dihedral group: each crop should look like a new source.
"""

from __future__ import annotations

import random

import torch
from pydantic import Field

from attacker.strategies.base import STRATEGY_REGISTRY, Query, QueryStrategy, StrategyParams, index_rng
from attacker.strategies.simple import _augment
from translators.images import bicubic_resize, crop_to_multiple


class InterleaveParams(StrategyParams):
    """``every``: one whole photo per ``every`` queries (2 = half the queries are whole photos)."""

    every: int = Field(2, ge=2, le=1000)
    min_side: int = Field(24, ge=1)


@STRATEGY_REGISTRY.register("interleave")
class Interleave(QueryStrategy):
    """Random crops with whole photos interleaved (see the module doc)."""

    Params = InterleaveParams

    def make(self, index: int) -> Query:
        rng = index_rng(self.seed, index, "interleave")
        p: InterleaveParams = self.params  # type: ignore[assignment]
        if index % p.every == p.every - 1:
            im = rng.choice(self.sources)
            x = self.fit_whole(im.image)
            h, w = x.shape[-2:]
            low = max(p.min_side, self.info.min_side)
            if min(h, w) < low:  # a photo too small for the model: sent as it is, so the harvest refuses it
                return Query(index, x.contiguous(), im.name, None, "whole")
            side = rng.randint(low, max(p.min_side, min(h, w)))
            f = side / min(h, w)
            if f < 1.0:
                x = crop_to_multiple(bicubic_resize(x, (max(1, round(h * f)), max(1, round(w * f)))), self.mult)
            return Query(index, x.contiguous(), im.name, None, "whole")
        im, box, x = self.random_crop(rng, index)
        x, tf = self.add_noise(x, rng)
        return Query(index, x.contiguous(), im.name, box, tf)


class NovelParams(StrategyParams):
    """``scale``: (lo, hi) side of the cut region relative to the crop size before resampling."""

    scale: tuple[float, float] = (1.0, 3.0)


def _colour_shift(x: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, str]:
    """Permute channels and mix them with a random near-identity 3x3 matrix; ``(1, 3, H, W)`` in [0, 1]."""
    perm = list(range(3))
    rng.shuffle(perm)
    m = torch.eye(3) * rng.uniform(0.6, 1.0) + torch.tensor([[rng.uniform(-0.2, 0.4) for _ in range(3)]
                                                             for _ in range(3)])
    m = m / m.sum(dim=1, keepdim=True).clamp(min=0.3)
    y = torch.einsum("ij,bjhw->bihw", m, x[:, perm]).clamp(0.0, 1.0)
    return y, f"perm{''.join(map(str, perm))}"


@STRATEGY_REGISTRY.register("novel")
class NovelCrops(QueryStrategy):
    """Crops of random extent resampled to the crop size, colour-shifted and augmented per query."""

    Params = NovelParams

    def make(self, index: int) -> Query:
        rng = index_rng(self.seed, index, "novel")
        p: NovelParams = self.params  # type: ignore[assignment]
        ch, cw = self.crop_hw
        f = rng.uniform(*p.scale)
        cands = [im for im in self.sources if im.image.shape[-2] >= ch and im.image.shape[-1] >= cw]
        im = rng.choice(cands)
        h, w = im.image.shape[-2:]
        rh, rw = min(h, max(ch, round(ch * f))), min(w, max(cw, round(cw * f)))
        top, left = rng.randint(0, h - rh), rng.randint(0, w - rw)
        x = im.image[..., top : top + rh, left : left + rw]
        if (rh, rw) != (ch, cw):
            x = bicubic_resize(x, (ch, cw))
        x, tf1 = _colour_shift(x, rng)
        x, tf2 = _augment(x, rng)
        x, noise = self.add_noise(x, rng)
        tf = f"{tf1}:{tf2}" + (f":{noise}" if noise else "")
        return Query(index, x.contiguous(), im.name, [top, left, rh, rw], tf)
