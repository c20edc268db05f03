"""The defense policy: which defense pipeline a request gets, from (model, client, tier, level).

Configuration (settings): a model's ``defenses`` then its tier's ``defenses`` form level 0. Escalation
levels 1, 2, ... come from ``levels`` lists on the model and on the tier: level ``n`` starts from level
``n - 1`` and applies the model's ``levels[n-1]`` then the tier's; a defense whose name is already in the
pipeline is replaced in place (strengthened, e.g. ``noise`` sigma 0.02 -> 0.05), any other is appended.
A client's level (:class:`victim_service.levels.LevelStore`, set by an admin or the query monitor) above
the highest level configured for its (model, tier) gets that highest level.

Pipelines are built and set up (``setup(device, model.handle())``) once per (model, tier, level) at
start-up; (model, tier, level) keys whose spec lists are equal share one pipeline object, so the
batcher, which groups jobs by pipeline, defends them together. Unknown defense names or parameters are
refused when the settings are read, with the valid choices and the place in the settings file.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from defenses import DefensePipeline, build_defenses
from victim_service.keys import Client
from victim_service.levels import LevelStore
from victim_service.models import ServedModel
from victim_service.settings import ModelSpec, Settings


def merge_level(base: list[dict[str, Any]], step: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``base`` with each spec of ``step`` replacing the same-named defense in place, or appended."""
    out = [dict(s) for s in base]
    for spec in step:
        names = [s["name"] for s in out]
        if spec["name"] in names:
            out[names.index(spec["name"])] = dict(spec)
        else:
            out.append(dict(spec))
    return out


@dataclass(frozen=True)
class Resolved:
    """The pipeline a request gets and the level that chose it (after clamping to the configured levels)."""

    pipeline: DefensePipeline
    level: int


class DefensePolicy:
    """Resolves pipelines per request; built from the settings, filled by :meth:`setup_model` at start-up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pipelines: dict[tuple[str, str, int], DefensePipeline] = {}
        self._top: dict[tuple[str, str], int] = {}

    def top_level(self, spec: ModelSpec, tier: str) -> int:
        """Highest level configured for (model, tier): the longer of the two ``levels`` lists."""
        t = self.settings.tiers[tier]
        return max(len(spec.levels), len(t.levels))

    @property
    def max_level(self) -> int:
        """Highest level configured anywhere (what an admin may set)."""
        return max(self._top.values(), default=0)

    def specs(self, spec: ModelSpec, tier: str, level: int) -> list[dict[str, Any]]:
        """The defense specs of (model, tier) at ``level`` (clamped to :meth:`top_level`)."""
        t = self.settings.tiers[tier]
        out = [*spec.defenses, *t.defenses]
        for n in range(min(level, self.top_level(spec, tier))):
            step = [*(spec.levels[n] if n < len(spec.levels) else []), *(t.levels[n] if n < len(t.levels) else [])]
            out = merge_level(out, step)
        return out

    async def setup_model(
        self, model: ServedModel, run: Callable[..., Awaitable[Any]]
    ) -> None:
        """Build and set up every (tier, level) pipeline of ``model``; ``run(fn, *args)`` runs on its device thread."""
        shared: dict[str, DefensePipeline] = {}
        for tier in self.settings.tiers:
            top = self.top_level(model.spec, tier)
            self._top[(model.name, tier)] = top
            for level in range(top + 1):
                specs = self.specs(model.spec, tier, level)
                key = json.dumps(specs, sort_keys=True)
                pipe = shared.get(key)
                if pipe is None:
                    pipe = shared[key] = DefensePipeline(build_defenses(specs))
                    await run(pipe.setup, model.device, model.handle())
                self._pipelines[(model.name, tier, level)] = pipe

    def resolve(self, model: str, tier: str, level: int) -> Resolved:
        """The pipeline for (model, tier) at ``level`` (clamped); an empty one for an unknown pair."""
        top = self._top.get((model, tier))
        if top is None:
            return Resolved(DefensePipeline(), 0)
        eff = max(0, min(level, top))
        return Resolved(self._pipelines[(model, tier, eff)], eff)

    async def for_client(self, model: str, client: Client, levels: LevelStore) -> Resolved:
        """The pipeline for ``client`` on ``model``: its tier, at the level ``levels`` holds for it."""
        return self.resolve(model, client.tier, await levels.get(client.name))
