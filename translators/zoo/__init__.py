"""The victim zoo: recipes that train victims on the corpus ``victim`` split and cache them.

>>> from translators.zoo import build, ZOO
>>> path = build("sr4x", profile="tiny")  # doctest: +SKIP

See :mod:`translators.zoo.recipes` for the tasks and :mod:`translators.zoo.stylizers` for the hidden
style templates.
"""

from translators.zoo.build import build, cached_checkpoint, evaluate_recipe_model, train_recipe, zoo_checkpoint
from translators.zoo.recipes import PROFILES, ZOO, Recipe, TrainSpec, get_recipe

__all__ = [
    "PROFILES",
    "ZOO",
    "Recipe",
    "TrainSpec",
    "build",
    "cached_checkpoint",
    "evaluate_recipe_model",
    "get_recipe",
    "train_recipe",
    "zoo_checkpoint",
]

import translators.zoo.membership  # noqa: F401 - registers the membership-inference victims
