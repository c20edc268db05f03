"""Run a local model on inputs of any size: pad to its ``size_multiple``, translate, crop the output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evaluation.extraction import Translator, as_translator


def padded_translator(module: nn.Module, device: str | torch.device = "cpu") -> Translator:
    """Wrap ``module`` so inputs whose sides are not multiples of ``module.size_multiple`` still work.

    The input ``(1, 3, h, w)`` is padded bottom/right by edge replication, and the output cropped back to
    ``(1, 3, s*h, s*w)`` (``s`` = ``module.scale``, default 1).
    """
    multiple = int(getattr(module, "size_multiple", 1) or 1)
    scale = int(getattr(module, "scale", 1) or 1)
    run = as_translator(module, device)

    def translate(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % multiple, (-w) % multiple
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return run(x)[..., : h * scale, : w * scale]

    return translate
