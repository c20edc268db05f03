"""Adaptive strategy: maximise patch diversity (greedy k-centre / core-set, Sener & Savarese 2018).

For query ``index`` the strategy draws ``pool`` random candidate crops (seeded by ``(seed, index)``)
and sends the one farthest, in a cheap appearance feature space, from every input already harvested
or already issued. Features (per crop): a 4x4 average-pooled RGB thumbnail (48 values in [0, 1]) and a
4x4 map of mean gradient magnitude (16 values, x4 so texture counts as much as colour).

On resume the harvested inputs are fed back through :meth:`observe`, so the choice depends only on
the pairs held, and the manifest still holds each index once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attacker.strategies.base import STRATEGY_REGISTRY, Query, QueryStrategy, index_rng


def patch_features(x: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` in [0, 1] -> ``(N, 64)`` appearance features (colour layout + texture energy)."""
    colour = F.adaptive_avg_pool2d(x, 4).flatten(1)
    gray = x.mean(dim=1, keepdim=True)
    gx = (gray[..., :, 1:] - gray[..., :, :-1]).abs()
    gy = (gray[..., 1:, :] - gray[..., :-1, :]).abs()
    grad = F.adaptive_avg_pool2d(gx[..., :-1, :] + gy[..., :, :-1], 4).flatten(1)
    return torch.cat([colour, 4.0 * grad], dim=1)


@STRATEGY_REGISTRY.register("diversity")
class DiversityCrops(QueryStrategy):
    """Greedy farthest-point selection of crops among ``pool`` random candidates per query."""

    adaptive = True

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._feats: dict[int, torch.Tensor] = {}
        self._stack: torch.Tensor | None = None

    def _selected(self) -> torch.Tensor | None:
        if self._stack is None and self._feats:
            self._stack = torch.stack([self._feats[i] for i in sorted(self._feats)])
        return self._stack

    def _register(self, index: int, feat: torch.Tensor) -> None:
        if index not in self._feats:
            self._feats[index] = feat
            self._stack = None

    def make(self, index: int) -> Query:
        rng = index_rng(self.seed, index, "diversity")
        cands = [self.random_crop(rng) for _ in range(self.params.pool)]
        batch = torch.cat([c[2] for c in cands])
        feats = patch_features(batch)
        chosen = 0
        sel = self._selected()
        if sel is not None and len(cands) > 1:
            dmin = torch.cdist(feats, sel).min(dim=1).values
            chosen = int(torch.argmax(dmin).item())
        im, box, x = cands[chosen]
        self._register(index, feats[chosen])
        x, tf = self.add_noise(x, rng)
        return Query(index, x.contiguous(), im.name, box, tf)

    def observe(self, index: int, inp: torch.Tensor, out: torch.Tensor | None) -> None:
        self._register(index, patch_features(inp)[0])
