"""JPEG re-compression of outputs: removes the fine detail a surrogate would learn from.

The single-example-imitation paper discusses JPEG compression of the API's outputs as a cheap defense;
its cost to honest users is the usual JPEG loss at ``quality`` (PSNR around 30-40 dB for natural images
at quality 50-95).
"""

from __future__ import annotations

import torch
from pydantic import Field

from defenses.base import DefenseContext, DefenseParams, OutputDefense
from defenses.registry import DEFENSE_REGISTRY
from translators.codecs import JpegSubsampling, jpeg_roundtrip

__all__ = ["JPEG_PHASES", "JpegDefense", "JpegParams", "jpeg_phase_average", "jpeg_roundtrip"]


class JpegParams(DefenseParams):
    """``quality``: libjpeg quality 1..100 (Pillow's scale). ``subsampling``: chroma subsampling."""

    quality: int = Field(75, ge=1, le=100)
    subsampling: JpegSubsampling = "4:2:0"


#: Grid phases of :func:`jpeg_phase_average`: the 8x8 block grid at offset 0 and at 4 px in both directions.
JPEG_PHASES: tuple[tuple[int, int], ...] = ((0, 0), (4, 4))


def jpeg_phase_average(images: torch.Tensor, quality: int,
                       phases: tuple[tuple[int, int], ...] = JPEG_PHASES) -> torch.Tensor:
    """:func:`jpeg_roundtrip` averaged over 8x8 block-grid phases: ``(N, 3, H, W) -> (N, 3, H, W)``.

    For each ``(dy, dx)`` the images are reflect-padded by ``dy`` rows on top and ``dx`` columns on the left,
    round-tripped and cropped back, so the block grid falls at another offset of the content. A surrogate
    trained on random crops of JPEG files learns the codec's effect averaged over phases, not at one."""
    outs = []
    for dy, dx in phases:
        x = images if not (dy or dx) else torch.nn.functional.pad(images.float(), (dx, 0, dy, 0), mode="reflect")
        outs.append(jpeg_roundtrip(x, quality)[..., dy:, dx:].to(images.dtype))
    return torch.stack(outs).mean(0)


@DEFENSE_REGISTRY.register("jpeg")
class JpegDefense(OutputDefense):
    """Re-encode outputs as JPEG at ``quality`` and decode them: ``(N, 3, H, W) -> (N, 3, H, W)``."""

    name = "jpeg"
    Params = JpegParams
    params: JpegParams

    def apply(self, outputs: torch.Tensor, inputs: torch.Tensor, ctx: DefenseContext) -> torch.Tensor:
        return jpeg_roundtrip(outputs, self.params.quality, self.params.subsampling)

    def apply_batch(self, outputs: torch.Tensor, inputs: torch.Tensor, ctxs: object) -> torch.Tensor:
        # JPEG does not depend on the request: one pass over the whole batch.
        return jpeg_roundtrip(outputs, self.params.quality, self.params.subsampling)
