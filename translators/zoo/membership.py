"""Victims that memorise: pix2pix-style U-Nets trained on a small *private* paired set until they overfit.

The akd-membership-privacy paper attacks pix2pix models trained on CMP Facades (400 pairs) and
Cityscapes: small paired sets whose members the model reproduces far better than unseen pairs. Here the
private set is ``n_private`` fixed crops of the corpus ``victim`` split, translated edges -> photo:
the input is an edge map of the photo (Sobel magnitude, dark lines on white), the target the photo.
The crops are dealt into members (the training pairs) and non-members (held-out crops of the same
photos' distribution, never trained on); both are exported beside the checkpoint as pair folders
(``inputs/NAME.png`` + ``targets/NAME.png``) and named in the model card's ``membership`` field.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from translators.corpus import load_images
from translators.images import crop_to_multiple, quantize_8bit
from translators.zoo.recipes import Recipe, TrainSpec, _add


def edge_map(photo: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` photo in [0, 1] -> ``(N, 3, H, W)`` edge sketch: ``1 - clamp(4 * |Sobel(luma)|)``."""
    luma = (0.299 * photo[:, :1] + 0.587 * photo[:, 1:2] + 0.114 * photo[:, 2:3])
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3) / 8
    p = F.pad(luma, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(p, kx.to(p)), F.conv2d(p, kx.transpose(-1, -2).to(p))
    edges = 1 - (4 * (gx.square() + gy.square()).sqrt()).clamp(0, 1)
    return quantize_8bit(edges).expand(-1, 3, -1, -1).contiguous()


def edge_pairs(images: str, side: int, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` (edge map, photo) pairs from random ``side`` crops of ``images`` (public data: attacker's
    reference model, defenders' proxy sets). Raises ``ValueError`` when no image is large enough."""
    ims = [im.image for im in load_images(images, max_side=512) if min(im.image.shape[-2:]) >= side]
    if not ims:
        raise ValueError(f"{images}: no image of at least {side}x{side}")
    rng = random.Random(f"reference:{seed}")
    out = []
    for _ in range(n):
        im = ims[rng.randrange(len(ims))]
        h, w = im.shape[-2:]
        top, left = rng.randint(0, h - side), rng.randint(0, w - side)
        y = im[..., top : top + side, left : left + side].contiguous()
        out.append((edge_map(y), y))
    return out


class _FixedSetSampler:
    """Batches drawn (with replacement, seeded) from a fixed list of ``(1, 3, s, s)`` crops, no flips."""

    def __init__(self, crops: list[torch.Tensor], seed: int) -> None:
        self.crops = crops
        self.rng = random.Random(seed)

    def sample(self, n: int) -> torch.Tensor:
        return torch.cat([self.crops[self.rng.randrange(len(self.crops))] for _ in range(n)], dim=0)


PRIVATE_IMAGE_SETS = ("corpus:victim", "corpus:all")
"""Image sources that contain the membership victims' private crops (:func:`private_crops` draws from the victim
split): neither a defense's proxy set nor the attacker's public reference data may come from them."""


def private_crops(n: int, side: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` distinct ``(1, 3, side, side)`` crops of the corpus ``victim`` split (deterministic in ``seed``)."""
    images = [im.image for im in load_images("corpus:victim", max_side=512) if min(im.image.shape[-2:]) >= side]
    rng = random.Random(f"membership:{seed}")
    crops = []
    for i in range(n):
        im = images[i % len(images)]
        h, w = im.shape[-2:]
        top, left = rng.randint(0, h - side), rng.randint(0, w - side)
        crops.append(im[..., top : top + side, left : left + side].contiguous())
    return crops


@dataclass(frozen=True)
class MembershipRecipe(Recipe):
    """A recipe whose victim trains on ``members[profile]`` fixed crops; as many more are non-members."""

    members: dict[str, int] | None = None

    def n_members(self, profile: str) -> int:
        return (self.members or {}).get(profile, 32)

    def make_pair(self, clean: torch.Tensor, seed: int = 0, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        target = crop_to_multiple(clean, multiple)
        return edge_map(target), target

    def ground_truth(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{self.name}: the ground truth is the photo the edge map came from")

    def split(self, profile: str, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(members, non-members): ``2 * n_members`` private crops dealt alternately."""
        n = self.n_members(profile)
        crops = private_crops(2 * n, self.specs[profile].patch, seed)
        return crops[0::2], crops[1::2]

    def training_sampler(self, images: list[torch.Tensor], spec: TrainSpec, seed: int) -> Any:
        profile = next(p for p, s in self.specs.items() if s is spec)
        members, _ = self.split(profile, seed)
        return _FixedSetSampler(members, seed)

    def card_extras(self, profile: str, checkpoint: Path, seed: int) -> dict[str, Any]:
        from translators.codecs import write_image
        from translators.corpus import image_digest

        members, non_members = self.split(profile, seed)
        root = checkpoint.with_suffix(".membership")
        fields: dict[str, Any] = {"root": root.name, "pair_layout": "inputs/NAME.png -> targets/NAME.png"}
        for label, crops in (("members", members), ("non_members", non_members)):
            (root / label / "inputs").mkdir(parents=True, exist_ok=True)
            (root / label / "targets").mkdir(parents=True, exist_ok=True)
            for i, c in enumerate(crops):
                x, y = self.make_pair(c)
                write_image(x, root / label / "inputs" / f"{label[:3]}{i:04d}.png")
                write_image(y, root / label / "targets" / f"{label[:3]}{i:04d}.png")
            fields[label] = {"dir": str(root / label), "n": len(crops), "side": int(crops[0].shape[-1]),
                             "digests": [image_digest(c) for c in crops]}
        return {"membership": fields}


_UNET = {"norm": "none", "residual": False, "dropout": 0.0}
_add(MembershipRecipe(
    name="mia-edges",
    task="edges2photo",
    arch="unet",
    loss="l1",
    description="edge map -> photo on a small private set (overfits on purpose: the membership-inference victim)",
    members={"tiny": 24, "default": 64, "full": 400},
    specs={
        "tiny": TrainSpec({**_UNET, "base": 24, "depth": 4, "max_channels": 96}, steps=1000, batch=8, patch=32,
                          lr=2e-3, eval_side=64),
        "default": TrainSpec({**_UNET, "base": 32, "depth": 5, "max_channels": 128}, steps=2000, batch=8,
                             patch=64, lr=1e-3, eval_side=128),
        "full": TrainSpec({**_UNET, "base": 64, "depth": 8, "max_channels": 512}, steps=80_000, batch=1,
                          patch=256, lr=2e-4, eval_side=256),
    },
))
