"""Pluggable query strategies (registry :data:`STRATEGY_REGISTRY`): ``random``, ``crops``, ``tiles``,
``augment``, the adaptive ``diversity`` and the monitor-evasion
``interleave`` and ``novel``. Build one with :func:`build_strategy`."""

from attacker.strategies.base import STRATEGY_REGISTRY, Query, QueryStrategy, StrategyParams, build_strategy
from attacker.strategies.diversity import DiversityCrops, patch_features
from attacker.strategies.evasion import Interleave, NovelCrops
from attacker.strategies.simple import AugmentedCrops, GridTiles, RandomCrops, RandomImages

__all__ = [
    "STRATEGY_REGISTRY",
    "AugmentedCrops",
    "DiversityCrops",
    "GridTiles",
    "Interleave",
    "NovelCrops",
    "Query",
    "QueryStrategy",
    "RandomCrops",
    "RandomImages",
    "StrategyParams",
    "build_strategy",
    "patch_features",
]
