"""Surrogate kinds (``resunet``, ``pix2pix``, ``srresnet``, ``unet-l2``) and their profiles."""

from attacker.surrogates.base import (
    SURROGATE_REGISTRY,
    Surrogate,
    SurrogateProfile,
    auto_candidates,
    auto_kind,
    get_surrogate,
    paper_kind,
)
from attacker.surrogates.kinds import Pix2Pix, ResUNetL2, SRResNetSurrogate, UNetL2

__all__ = [
    "SURROGATE_REGISTRY",
    "Pix2Pix",
    "ResUNetL2",
    "SRResNetSurrogate",
    "Surrogate",
    "SurrogateProfile",
    "UNetL2",
    "auto_candidates",
    "auto_kind",
    "get_surrogate",
    "paper_kind",
]
