"""Non-adaptive strategies: whole images, random crops, grid tiles, augmented crops.

All are deterministic in ``(seed, index)``: query ``i`` is the same after a crash and resume.
"""

from __future__ import annotations

import random

import torch

from attacker.strategies.base import STRATEGY_REGISTRY, Query, QueryStrategy, index_rng, torch_generator


@STRATEGY_REGISTRY.register("random")
class RandomImages(QueryStrategy):
    """Whole images in seeded random order, cycling through the set (a new shuffle per cycle).

    Queries beyond the number of images repeat images (with fresh noise when noise is on); use crops
    or tiles for more distinct pairs per image.
    """

    uses_crops = False

    def make(self, index: int) -> Query:
        n = len(self.sources)
        cycle, pos = divmod(index, n)
        order = list(range(n))
        random.Random(f"heist:perm:{self.seed}:{cycle}").shuffle(order)
        im = self.sources[order[pos]]
        x = self.fit_whole(im.image)
        x, tf = self.add_noise(x, index_rng(self.seed, index, "noise"))
        return Query(index, x.contiguous(), im.name, None, tf)


@STRATEGY_REGISTRY.register("crops")
class RandomCrops(QueryStrategy):
    """Uniformly placed ``crop_size`` crops, the attacker's photos taking turns (each gets an equal share
    of the queries; :meth:`QueryStrategy.random_crop`). Small crops buy more pairs per pixel of budget.
    Once the photos are used up, ``params.leaves`` of the queries are dead-leaves compositions."""

    fills_beyond_photos = True

    def make(self, index: int) -> Query:
        rng = index_rng(self.seed, index, "crop")
        im, box, x = self.random_crop(rng, index)
        return self.crop_query(index, im.name, box, x, rng)


@STRATEGY_REGISTRY.register("tiles")
class GridTiles(QueryStrategy):
    """Non-overlapping ``crop_size`` tiles of every image in a seeded order; once all tiles are used the
    grid is shifted by a seeded offset (half a tile on average) and the next round starts. Once the first
    round is used up, ``params.leaves`` of the queries are dead-leaves compositions."""

    fills_beyond_photos = True

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._rounds: dict[int, list[tuple[int, int, int]]] = {}

    def _round(self, r: int) -> list[tuple[int, int, int]]:
        if r not in self._rounds:
            ch, cw = self.crop_hw
            rng = random.Random(f"heist:tiles:{self.seed}:{r}")
            dy, dx = (0, 0) if r == 0 else (rng.randrange(ch), rng.randrange(cw))
            tiles = []
            for i, im in enumerate(self.sources):
                h, w = im.image.shape[-2:]
                oy, ox = (dy if h - ch >= dy else 0), (dx if w - cw >= dx else 0)
                tiles += [(i, t, le) for t in range(oy, h - ch + 1, ch) for le in range(ox, w - cw + 1, cw)]
            rng.shuffle(tiles)
            self._rounds = {r: tiles}  # keep one round in memory
        return self._rounds[r]

    def make(self, index: int) -> Query:
        n = len(self._round(0))
        r, pos = divmod(index, n)
        tiles = self._round(r)
        i, top, left = tiles[pos % len(tiles)]
        im = self.sources[i]
        ch, cw = self.crop_hw
        x = im.image[..., top : top + ch, left : left + cw]
        return self.crop_query(index, im.name, [top, left, ch, cw], x, index_rng(self.seed, index, "noise"))


def _augment(x: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, str]:
    """Dihedral transform + brightness/contrast/saturation/gamma jitter; ``(1, 3, H, W)`` in [0, 1].

    Non-square crops only get the rotations that keep their shape (0 and 180 degrees).
    """
    k = rng.randrange(4)
    if x.shape[-2] != x.shape[-1]:
        k = 2 * (k % 2)
    flip = rng.random() < 0.5
    x = torch.rot90(x, k, dims=(-2, -1))
    if flip:
        x = x.flip(-1)
    b, c, s, g = rng.uniform(-0.1, 0.1), rng.uniform(0.8, 1.2), rng.uniform(0.7, 1.3), rng.uniform(0.8, 1.25)
    mean = x.mean(dim=(-3, -2, -1), keepdim=True)
    x = (x - mean) * c + mean + b
    gray = x.mean(dim=-3, keepdim=True)
    x = (gray + (x - gray) * s).clamp(0.0, 1.0) ** g
    return x.clamp(0.0, 1.0), f"rot{k * 90}{'f' if flip else ''}:b{b:+.2f}c{c:.2f}s{s:.2f}g{g:.2f}"


@STRATEGY_REGISTRY.register("augment")
class AugmentedCrops(QueryStrategy):
    """Random crops with geometric (rot90, flip) and photometric (brightness, contrast, saturation,
    gamma) augmentation, so a small photo set yields more diverse queries."""

    def make(self, index: int) -> Query:
        rng = index_rng(self.seed, index, "augment")
        im, box, x = self.random_crop(rng, index)
        x, tf = _augment(x, rng)
        x, noise = self.add_noise(x, rng)
        return Query(index, x.contiguous(), im.name, box, tf if noise is None else f"{tf}:{noise}")


__all__ = ["AugmentedCrops", "GridTiles", "RandomCrops", "RandomImages", "torch_generator"]
