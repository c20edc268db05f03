"""Image bytes <-> tensors for PNG, JPEG and WebP (plus BMP and TIFF for local files), with limits checked
before decoding.

Decoding reads only the header first (Pillow's lazy ``open``) so a decompression bomb is refused
before a single pixel is allocated. Mode policy (documented for API users):

- RGB: as is. Grayscale (L, I;16, I, F, 1): replicated to 3 channels. Palette (P): converted.
- RGBA / LA / PA: composited on white (``alpha="white"``, default) or refused (``alpha="refuse"``).
- 16-bit (grayscale, RGB, RGBA PNGs and TIFFs): scaled to 8 bits (``bit16="convert"``, default) or
  refused (``bit16="refuse"``). The bit depth is read from the PNG header (TIFF: its BitsPerSample tag),
  because Pillow silently opens 16-bit colour PNGs and TIFFs as 8-bit ``RGB``/``RGBA``.
- CMYK / YCbCr: converted to RGB. Anything else: refused.
- Animated images: first frame (``animated="first"``, default) or refused.
- EXIF orientation (JPEG, WebP, PNG ``eXIf``, TIFF): applied, so the image is decoded upright as browsers and
  phones display it (a photo stored sideways with "rotate 90" comes out portrait); sizes reported by
  :func:`probe_image`, :func:`probe_header` and :func:`probe_file` are those of the upright image.

Pillow's own ``DecompressionBombWarning`` is silenced (process-wide) because :class:`ImageLimits`
applies a stricter pixel limit of its own; Pillow still raises ``DecompressionBombError`` above twice
``Image.MAX_IMAGE_PIXELS`` (about 179 Mpx), which is reported as ``too_many_pixels`` too. (A
``warnings.catch_warnings`` block per call would not be thread-safe in a threaded server.)

Formats: :class:`ImageLimits` allows PNG, JPEG and WebP by default (what the HTTP API accepts; BMP, TIFF,
GIF, ... are ``unsupported_format`` there). Local files (:func:`read_image`, :func:`probe_file`, so every
folder of photos) are read with :func:`local_limits`, which adds BMP and TIFF under the same mode policy
(16-bit TIFFs are scaled to 8 bits, RGBA composited on white, TIFF orientation tags applied).

PNG encoding uses zlib level 1 by default: ``bench/codecs.py`` measures it against Pillow's default.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from translators.errors import ImageError
from translators.files import atomic_write_bytes
from translators.images import from_uint8, to_uint8, to_uint8_tensor

ImageFormat = Literal["png", "jpeg", "webp"]
"""Formats the HTTP API accepts and answers, and :func:`encode_image` writes."""
FileFormat = Literal["png", "jpeg", "webp", "bmp", "tiff"]
"""Formats the decoder identifies; BMP and TIFF are read only where a caller allows them (local files)."""
FORMATS: dict[str, ImageFormat] = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/webp": "webp",
}
MEDIA_TYPES: dict[ImageFormat, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
FILE_FORMATS: tuple[FileFormat, ...] = ("png", "jpeg", "webp", "bmp", "tiff")
LOCAL_MAX_PIXELS = 64_000_000  # pixel limit for local files (folders of photos): only a memory guard
_WEB_FORMATS: tuple[FileFormat, ...] = ("png", "jpeg", "webp")
_PIL_FORMATS: dict[str, FileFormat] = {
    "PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "MPO": "jpeg", "BMP": "bmp", "TIFF": "tiff",
}
_NAMES: dict[FileFormat, str] = {"png": "PNG", "jpeg": "JPEG", "webp": "WebP", "bmp": "BMP", "tiff": "TIFF"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_WIDTH, _TIFF_LENGTH, _TIFF_BITS_PER_SAMPLE = 256, 257, 258
Source = Literal["body", "file"]

# Our own pixel limit is checked from the header; Pillow's warning would only add noise (see module doc).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _signature_format(head: bytes) -> FileFormat | None:
    """The format whose signature ``head`` (the first bytes) starts with, or None."""
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    return None


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def format_names(formats: tuple[FileFormat, ...]) -> str:
    """``PNG, JPEG or WebP``, with other formats after: ``PNG, JPEG or WebP (nor BMP or TIFF)``."""
    web = [_NAMES[f] for f in formats if f in _WEB_FORMATS]
    other = [_NAMES[f] for f in formats if f not in _WEB_FORMATS]
    if not web:
        return _join(other)
    return _join(web) + (f" (nor {_join(other)})" if other else "")


def png_bit_depth(data: bytes) -> int | None:
    """Bit depth per sample from a PNG's IHDR chunk (1, 2, 4, 8 or 16), or None if not a PNG."""
    if len(data) >= 25 and data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR":
        return data[24]
    return None


def _tiff_bit_depth(img: Image.Image) -> int | None:
    """The largest BitsPerSample of a TIFF (Pillow opens 16-bit colour TIFFs as 8-bit ``RGB``), or None."""
    try:
        bits = img.tag_v2.get(_TIFF_BITS_PER_SAMPLE)  # type: ignore[attr-defined]
    except AttributeError:
        return None
    if isinstance(bits, tuple):
        return max(int(b) for b in bits) if bits else None
    return int(bits) if isinstance(bits, int) else None


@dataclass(frozen=True)
class ImageLimits:
    """Limits for one decoded image. ``max_pixels`` is width*height, checked from the header.

    ``allowed_formats`` defaults to what the HTTP API accepts; :func:`local_limits` adds BMP and TIFF.
    """

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    min_side: int = 1
    allowed_formats: tuple[FileFormat, ...] = _WEB_FORMATS
    alpha: Literal["white", "refuse"] = "white"
    bit16: Literal["convert", "refuse"] = "convert"
    animated: Literal["first", "refuse"] = "first"


def local_limits(n_bytes: int) -> ImageLimits:
    """Limits for a local file of ``n_bytes``: every format in :data:`FILE_FORMATS`, no byte limit."""
    return ImageLimits(max_bytes=max(n_bytes, 1), max_pixels=LOCAL_MAX_PIXELS, allowed_formats=FILE_FORMATS)


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


_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}  # transpose, rotate 270, transverse, rotate 90


def exif_orientation(img: Image.Image, *, decoded: bool = False) -> int:
    """The EXIF orientation tag (1..8) of a lazily opened image; 1 (upright) when absent or unreadable.

    Reads headers only unless ``decoded`` (the pixels are already loaded): a PNG's ``eXIf`` chunk may
    follow the pixel data, and Pillow decodes the whole image to reach it, swallowing a damaged stream here
    and leaving a half-decoded image that a later ``load()`` would pass as whole (all black). Such a PNG's
    orientation is read after its pixels are decoded; the size limits do not depend on it (they are
    symmetric in width and height).
    """
    if not decoded and img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError, TypeError, KeyError):
        return 1
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


def _stored_size(img: Image.Image) -> tuple[int, int]:
    """``(width, height)`` as stored. Pillow's TIFF plugin reports a TIFF's size already rotated by its
    orientation tag (and rotates on load), so a TIFF's stored size is read from its width/length tags."""
    if img.format == "TIFF":
        tags = getattr(img, "tag_v2", {})
        w, h = tags.get(_TIFF_WIDTH), tags.get(_TIFF_LENGTH)
        if isinstance(w, int) and isinstance(h, int):
            return w, h
    return img.size


def upright_size(img: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of a lazily opened image once its EXIF orientation is applied."""
    w, h = _stored_size(img)
    return (h, w) if exif_orientation(img) in _SWAPS_SIDES else (w, h)


def _check_bytes(n: int, limits: ImageLimits, source: Source) -> None:
    if n == 0:
        text = "the request body is empty; send image bytes" if source == "body" else "the file is empty"
        raise ImageError("empty_body", text)
    if n > limits.max_bytes:
        raise ImageError("too_many_bytes", f"image is {n} bytes; the limit is {limits.max_bytes}", 413)


def check_dimensions(width: int, height: int, limits: ImageLimits) -> None:
    """The size limits (``too_many_pixels``, ``too_small``) for an image of ``width x height`` (upright)."""
    if width * height > limits.max_pixels:
        raise ImageError(
            "too_many_pixels", f"image is {width}x{height} = {width * height} pixels; the limit is "
            f"{limits.max_pixels}", 413
        )
    if min(width, height) < limits.min_side:
        raise ImageError(
            "too_small", f"image is {width}x{height}; the shorter side must be at least {limits.min_side}"
        )


def _open(fp: IO[bytes], head: bytes, limits: ImageLimits, source: Source) -> tuple[Image.Image, FileFormat]:
    """Pillow's lazy open (header only) plus the format check; no pixel is decoded."""
    try:
        img = Image.open(fp)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        if isinstance(exc, Image.DecompressionBombError):
            raise ImageError(
                "too_many_pixels", f"image refused before decoding: its header declares over {limits.max_pixels} "
                "pixels (decompression bomb guard)", 413) from None
        if isinstance(exc, ValueError) and "too large" in str(exc).lower():
            raise ImageError("corrupt_image", "a metadata chunk of the image (text or colour profile) "
                             "decompresses to more than the decoder allows") from None
        if _signature_format(head) in (*_WEB_FORMATS, *limits.allowed_formats):
            raise ImageError("corrupt_image", "the image header is damaged or truncated") from None
        names = format_names(limits.allowed_formats)
        raise ImageError("not_an_image", f"the {source} is not a {names} image") from None
    fmt = _PIL_FORMATS.get(img.format or "")
    if fmt is None or fmt not in limits.allowed_formats:
        allowed = ", ".join(limits.allowed_formats)
        raise ImageError("unsupported_format", f"format {img.format} is not accepted; send {allowed}", 415)
    return img, fmt


def _open_bytes(data: bytes, limits: ImageLimits, source: Source) -> tuple[Image.Image, FileFormat]:
    _check_bytes(len(data), limits, source)
    return _open(io.BytesIO(data), data[:16], limits, source)


def probe_header(data: bytes, limits: ImageLimits | None = None) -> tuple[FileFormat, int, int]:
    """``(format, width, height)`` from the header, the size upright (EXIF orientation applied).

    Applies the byte and format checks but not the size limits, so a caller can record the size of an
    image before :func:`check_dimensions` refuses it. Raises :class:`ImageError`.
    """
    img, fmt = _open_bytes(data, limits or ImageLimits(), "body")
    return (fmt, *upright_size(img))


def probe_image(data: bytes, limits: ImageLimits | None = None) -> tuple[FileFormat, int, int]:
    """Read only the header: returns ``(format, width, height)`` (upright) or raises :class:`ImageError`."""
    limits = limits or ImageLimits()
    fmt, w, h = probe_header(data, limits)
    check_dimensions(w, h, limits)
    return fmt, w, h


def _bit_depth(img: Image.Image, fmt: FileFormat, data: bytes) -> int | None:
    if fmt == "png":
        return png_bit_depth(data)
    return _tiff_bit_depth(img) if fmt == "tiff" else None


def _decode(data: bytes, limits: ImageLimits, source: Source) -> torch.Tensor:
    img, fmt = _open_bytes(data, limits, source)
    check_dimensions(*upright_size(img), limits)
    if limits.bit16 == "refuse" and _bit_depth(img, fmt, data) == 16:
        raise ImageError("unsupported_mode", "16-bit images are refused by this server's policy", 415)
    try:
        if getattr(img, "is_animated", False) and limits.animated == "refuse":
            raise ImageError("unsupported_mode", "animated images are refused by this server", 415)
        img.load()
        if exif_orientation(img, decoded=True) != 1:
            img = ImageOps.exif_transpose(img)
        arr = _to_rgb(img, limits)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, TypeError) as exc:  # TypeError: Pillow 13, bad interlace
        raise ImageError("corrupt_image", f"the image could not be decoded ({exc})") from None
    return from_uint8(arr)


def decode_image(data: bytes, limits: ImageLimits | None = None) -> torch.Tensor:
    """Bytes -> ``(1, 3, H, W)`` float32 in [0, 1]. Raises :class:`ImageError` on any bad input."""
    return _decode(data, limits or ImageLimits(), "body")


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


JpegSubsampling = Literal["4:4:4", "4:2:2", "4:2:0"]
_JPEG_SUBSAMPLING: dict[str, int] = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


def jpeg_roundtrip(images: torch.Tensor, quality: int, subsampling: JpegSubsampling = "4:2:0") -> torch.Tensor:
    """Encode each image of ``(N, 3, H, W)`` [0, 1] as JPEG at ``quality`` (Pillow's 1..100 scale, chroma
    ``subsampling``) and decode it again: ``(N, 3, H, W)`` in the input's dtype and device, values on the
    8-bit grid. Used by the JPEG output defense and the attacker's JPEG counter-measure."""
    arr = to_uint8_tensor(images.detach()).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(arr)
    for i in range(arr.shape[0]):
        buf = io.BytesIO()
        Image.fromarray(arr[i], "RGB").save(buf, "JPEG", quality=quality,
                                            subsampling=_JPEG_SUBSAMPLING[subsampling])
        buf.seek(0)
        with Image.open(buf) as im:
            out[i] = np.asarray(im.convert("RGB"))
    t = torch.from_numpy(out).permute(0, 3, 1, 2).to(dtype=images.dtype).div_(255.0)
    return t.to(images.device)


def read_image(path: str | os.PathLike[str], limits: ImageLimits | None = None) -> torch.Tensor:
    """Read an image file with the same policy as :func:`decode_image`; by default :func:`local_limits`
    (PNG, JPEG, WebP, BMP and TIFF, no byte limit). Errors name the file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ImageError("unreadable", f"cannot read {p}: {exc.strerror or exc}") from None
    try:
        return _decode(data, limits or local_limits(len(data)), "file")
    except ImageError as exc:
        raise ImageError(exc.code, f"{p}: {exc}", exc.status) from None


def probe_file(path: str | os.PathLike[str], limits: ImageLimits | None = None) -> tuple[FileFormat, int, int]:
    """``(format, width, height)`` of an image file from its header only (upright, as :func:`read_image`
    would load it), with the same checks as :func:`probe_image`; by default :func:`local_limits`."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            n = os.fstat(f.fileno()).st_size
            lim = limits or local_limits(n)
            _check_bytes(n, lim, "file")
            head = f.read(16)
            f.seek(0)
            img, fmt = _open(f, head, lim, "file")
            with img:
                w, h = upright_size(img)
        check_dimensions(w, h, lim)
    except OSError as exc:
        raise ImageError("unreadable", f"cannot read {p}: {exc.strerror or exc}") from None
    except ImageError as exc:
        raise ImageError(exc.code, f"{p}: {exc}", exc.status) from None
    return fmt, w, h


def write_image(t: torch.Tensor, path: str | os.PathLike[str]) -> None:
    """Write atomically (temp file + rename); format from the suffix (.png, .jpg/.jpeg, .webp)."""
    p = Path(path)
    fmt: ImageFormat = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(
        p.suffix.lower(), "png"
    )  # type: ignore[assignment]
    atomic_write_bytes(p, encode_image(t, fmt), durable=False)
