"""What the attacker may know about a victim model: the public ``GET /v1/models`` entry."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ModelInfo(BaseModel):
    """One entry of ``GET /v1/models``. Never holds the architecture (the API does not reveal it).

    ``scale`` is output side / input side (4 for x4 SR). Sizes are in input pixels; ``max_pixels`` is
    ``width * height`` of the input and ``max_bytes`` the encoded request body.
    """

    model_config = ConfigDict(extra="allow")

    name: str
    task: str = "translation"
    scale: int = 1
    min_side: int = 1
    size_multiple: int = 1
    max_pixels: int | None = None
    max_bytes: int | None = None
    max_batch: int | None = None
    fixed_size: list[int] | None = None  # [height, width] when the model takes only one size

    def accepts(self, height: int, width: int) -> str | None:
        """None when an input of ``height`` x ``width`` fits the published limits, else the reason."""
        if self.fixed_size is not None and [height, width] != list(self.fixed_size):
            fh, fw = self.fixed_size
            return f"{width}x{height} is not the only accepted size {fw}x{fh}"
        if min(height, width) < self.min_side:
            return f"{width}x{height} is smaller than min_side {self.min_side}"
        if self.size_multiple > 1 and (height % self.size_multiple or width % self.size_multiple):
            return f"{width}x{height} is not a multiple of {self.size_multiple}"
        if self.max_pixels is not None and height * width > self.max_pixels:
            return f"{width}x{height} exceeds max_pixels {self.max_pixels}"
        return None
