"""Surrogate kinds (``pix2pix``, ``srresnet``, ``unet-l2``) and their profiles."""

from attacker.surrogates.base import (
    SURROGATE_REGISTRY,
    Surrogate,
    SurrogateProfile,
    auto_kind,
    get_surrogate,
)
from attacker.surrogates.kinds import Pix2Pix, SRResNetSurrogate, UNetL2

__all__ = [
    "SURROGATE_REGISTRY",
    "Pix2Pix",
    "SRResNetSurrogate",
    "Surrogate",
    "SurrogateProfile",
    "UNetL2",
    "auto_kind",
    "get_surrogate",
]
