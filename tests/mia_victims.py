"""A tiny memorising victim for membership tests: the mia-edges recipe shrunk (8 members, 16 px crops)."""

from __future__ import annotations

from pathlib import Path

from translators.checkpoint import ModelCard, save_checkpoint
from translators.zoo import train_recipe
from translators.zoo.membership import MembershipRecipe
from translators.zoo.recipes import TrainSpec

TINY_MIA = MembershipRecipe(
    name="mia-test", task="edges2photo", arch="unet", loss="l1", description="tiny memorising test victim",
    members={"tiny": 8},
    specs={"tiny": TrainSpec({"norm": "none", "residual": False, "base": 24, "depth": 4, "max_channels": 96},
                             steps=300, batch=8, patch=16, lr=3e-3)},
)


def tiny_membership_victim(folder: Path, seed: int = 0) -> Path:
    """Train (once per folder) and save the tiny victim with its membership split; returns the checkpoint."""
    path = folder / "mia-test.safetensors"
    if path.exists():
        return path
    model, provenance = train_recipe(TINY_MIA, "tiny", seed=seed)
    spec = TINY_MIA.specs["tiny"]
    card = ModelCard(name="mia-test", arch="unet", kwargs=spec.arch_kwargs, task="edges2photo",
                     size_multiple=16, min_side=16, description=TINY_MIA.description, training=provenance,
                     **TINY_MIA.card_extras("tiny", path, seed))
    save_checkpoint(model, path, card)
    return path
