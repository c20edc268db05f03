"""Image bytes <-> tensors for PNG, JPEG and WebP, with limits checked before decoding.

Decoding reads only the header first (Pillow's lazy ``open``) so a decompression bomb is refused
before a single pixel is allocated. Mode policy (documented for API users):

- RGB: as is. Grayscale (L, I;16, I, F, 1): replicated to 3 channels. Palette (P): converted.
- RGBA / LA / PA: composited on white (``alpha="white"``, default) or refused (``alpha="refuse"``).
- 16-bit (grayscale, RGB, RGBA PNGs): scaled to 8 bits (``bit16="convert"``, default) or refused
  (``bit16="refuse"``). The bit depth is read from the PNG header, because Pillow silently opens
  16-bit colour PNGs as 8-bit ``RGB``/``RGBA``.
- CMYK / YCbCr: converted to RGB. Anything else: refused.
- Animated images: first frame (``animated="first"``, default) or refused.
- EXIF orientation (JPEG, WebP, PNG ``eXIf``): applied, so the image is decoded upright as browsers and
  phones display it (a photo stored sideways with "rotate 90" comes out portrait); sizes reported by
  :func:`probe_image` are those of the upright image.

Pillow's own ``DecompressionBombWarning`` is silenced (process-wide) because :class:`ImageLimits`
applies a stricter pixel limit of its own; Pillow still raises ``DecompressionBombError`` above twice
``Image.MAX_IMAGE_PIXELS`` (about 179 Mpx), which is reported as ``too_many_pixels`` too. (A
``warnings.catch_warnings`` block per call would not be thread-safe in a threaded server.)

PNG encoding uses zlib level 1 by default: ``bench/codecs.py`` measures it against Pillow's default.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from translators.errors import ImageError
from translators.images import from_uint8, to_uint8

ImageFormat = Literal["png", "jpeg", "webp"]
FORMATS: dict[str, ImageFormat] = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/webp": "webp",
}
MEDIA_TYPES: dict[ImageFormat, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "MPO": "jpeg"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Our own pixel limit is checked from the header; Pillow's warning would only add noise (see module doc).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _looks_like_image(data: bytes) -> bool:
    """True if ``data`` starts with a PNG, JPEG or WebP signature (so a failure to open means damage)."""
    return data.startswith((_PNG_SIGNATURE, b"\xff\xd8\xff")) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def png_bit_depth(data: bytes) -> int | None:
    """Bit depth per sample from a PNG's IHDR chunk (1, 2, 4, 8 or 16), or None if not a PNG."""
    if len(data) >= 25 and data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR":
        return data[24]
    return None



@dataclass(frozen=True)
class ImageLimits:
    """Limits for one decoded image. ``max_pixels`` is width*height, checked from the header."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    min_side: int = 1
    allowed_formats: tuple[ImageFormat, ...] = ("png", "jpeg", "webp")
    alpha: Literal["white", "refuse"] = "white"
    bit16: Literal["convert", "refuse"] = "convert"
    animated: Literal["first", "refuse"] = "first"


def _to_rgb(img: Image.Image, limits: ImageLimits) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        if limits.bit16 == "refuse" and mode.startswith("I;16"):
            raise ImageError("unsupported_mode", "16-bit images are refused by this server's policy", 415)
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or (mode == "I" and arr.max() > 255) else 255.0
        if mode == "F":
            hi = 1.0 if arr.max() <= 1.0 else 255.0
        g = np.clip(np.round(arr / hi * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        if limits.alpha == "refuse":
            raise ImageError("unsupported_mode", "images with an alpha channel are refused by this server", 415)
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode in ("RGB", "L", "1", "P", "CMYK", "YCbCr", "RGBX"):
        return np.asarray(img.convert("RGB"))
    raise ImageError("unsupported_mode", f"image mode {mode!r} is not supported; send RGB or grayscale", 415)


def probe_image(data: bytes, limits: ImageLimits | None = None) -> tuple[ImageFormat, int, int]:
    """Read only the header: returns ``(format, width, height)`` or raises :class:`ImageError`."""
    _, fmt, w, h = _open_checked(data, limits or ImageLimits())
    return fmt, w, h


_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}  # transpose, rotate 270, transverse, rotate 90


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1..8) of a lazily opened image; 1 (upright) when absent or unreadable."""
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError, TypeError, KeyError):
        return 1
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


def _open_checked(data: bytes, limits: ImageLimits) -> tuple[Image.Image, ImageFormat, int, int]:
    """Pillow's lazy open (header only) plus every check that needs no pixel: the image is not decoded."""
    if not data:
        raise ImageError("empty_body", "the request body is empty; send image bytes")
    if len(data) > limits.max_bytes:
        raise ImageError("too_many_bytes", f"image is {len(data)} bytes; the limit is {limits.max_bytes}", 413)
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        if isinstance(exc, Image.DecompressionBombError):
            raise ImageError(
                "too_many_pixels", f"image refused before decoding: its header declares over {limits.max_pixels} "
                "pixels (decompression bomb guard)", 413) from None
        if _looks_like_image(data):
            raise ImageError("corrupt_image", "the image header is damaged or truncated") from None
        raise ImageError("not_an_image", "the body is not a PNG, JPEG or WebP image") from None
    fmt = _PIL_FORMATS.get(img.format or "")
    if fmt is None or fmt not in limits.allowed_formats:
        allowed = ", ".join(limits.allowed_formats)
        raise ImageError("unsupported_format", f"format {img.format} is not accepted; send {allowed}", 415)
    w, h = img.size
    if w * h > limits.max_pixels:
        raise ImageError(
            "too_many_pixels", f"image is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels}", 413
        )
    if min(w, h) < limits.min_side:
        raise ImageError("too_small", f"image is {w}x{h}; the shorter side must be at least {limits.min_side}")
    if exif_orientation(img) in _SWAPS_SIDES:
        w, h = h, w
    return img, fmt, w, h


def decode_image(data: bytes, limits: ImageLimits | None = None) -> torch.Tensor:
    """Bytes -> ``(1, 3, H, W)`` float32 in [0, 1]. Raises :class:`ImageError` on any bad input."""
    limits = limits or ImageLimits()
    img, fmt, _, _ = _open_checked(data, limits)
    if fmt == "png" and limits.bit16 == "refuse" and png_bit_depth(data) == 16:
        raise ImageError("unsupported_mode", "16-bit images are refused by this server's policy", 415)
    try:
        if getattr(img, "is_animated", False) and limits.animated == "refuse":
            raise ImageError("unsupported_mode", "animated images are refused by this server", 415)
        img.load()
        if exif_orientation(img) != 1:
            img = ImageOps.exif_transpose(img)
        arr = _to_rgb(img, limits)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError("corrupt_image", f"the image could not be decoded ({exc})") from None
    return from_uint8(arr)


def encode_image(
    t: torch.Tensor, fmt: ImageFormat = "png", *, quality: int = 95, png_compress_level: int = 1
) -> bytes:
    """``(1, 3, H, W)`` float in [0, 1] -> encoded bytes.

    Args:
        quality: JPEG/WebP quality 1..100.
        png_compress_level: zlib level 0..9; 1 encodes natural 256 px images about 2-3x faster than
            Pillow's default 6 for files about 7% larger (measured by ``bench/codecs.py``).
    """
    img = Image.fromarray(to_uint8(t), "RGB")
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", compress_level=png_compress_level)
    elif fmt == "jpeg":
        img.save(buf, "JPEG", quality=quality)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=quality)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return buf.getvalue()


def read_image(path: str | os.PathLike[str], limits: ImageLimits | None = None) -> torch.Tensor:
    """Read an image file with the same policy as :func:`decode_image` (no byte limit for local files)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ImageError("unreadable", f"cannot read {p}: {exc.strerror or exc}") from None
    lim = limits or ImageLimits(max_bytes=max(len(data), 1), max_pixels=64_000_000)
    try:
        return decode_image(data, lim)
    except ImageError as exc:
        raise ImageError(exc.code, f"{p}: {exc}", exc.status) from None


def write_image(t: torch.Tensor, path: str | os.PathLike[str]) -> None:
    """Write atomically (temp file + rename); format from the suffix (.png, .jpg/.jpeg, .webp)."""
    p = Path(path)
    fmt: ImageFormat = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(
        p.suffix.lower(), "png"
    )  # type: ignore[assignment]
    data = encode_image(t, fmt)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, p)
