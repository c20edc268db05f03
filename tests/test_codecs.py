"""Image codecs: round trips, every bad-input code, the mode policy, and limits checked before decoding."""

from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from translators.codecs import (
    FORMATS,
    MEDIA_TYPES,
    ImageLimits,
    decode_image,
    encode_image,
    png_bit_depth,
    probe_image,
    read_image,
    write_image,
)
from translators.errors import ImageError
from translators.images import from_uint8, to_uint8


def _quantised(h: int = 24, w: int = 32, seed: int = 0) -> torch.Tensor:
    """A random image already on the 8-bit grid, so lossless formats must give it back exactly."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 3, h, w), generator=g).float().div(255)


def _smooth(h: int = 48, w: int = 64) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return torch.stack([xx, yy, (xx + yy) / 2]).unsqueeze(0)


def _pil_bytes(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes | None) -> bytes:
    """A PNG built by hand. ``rows=None`` gives a header-only bomb: huge declared size, 12-byte IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"\0")
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / torch.mean((a - b) ** 2)))


def _code(data: bytes, limits: ImageLimits | None = None) -> str:
    with pytest.raises(ImageError) as info:
        decode_image(data, limits)
    return info.value.code


# --- round trips -------------------------------------------------------------------------------------------


def test_png_round_trip_is_lossless_at_every_compress_level() -> None:
    x = _quantised()
    for level in (0, 1, 6, 9):
        y = decode_image(encode_image(x, "png", png_compress_level=level))
        assert y.dtype == torch.float32
        assert y.shape == (1, 3, 24, 32)
        torch.testing.assert_close(y, x, rtol=0, atol=0)
    smooth = _smooth()  # noise does not compress; a gradient does
    sizes = [len(encode_image(smooth, "png", png_compress_level=level)) for level in (0, 9)]
    assert sizes[0] > sizes[1]


@pytest.mark.parametrize(("fmt", "min_psnr"), [("jpeg", 35.0), ("webp", 35.0)])
def test_lossy_round_trips_are_close(fmt: str, min_psnr: float) -> None:
    x = _smooth()
    data = encode_image(x, fmt, quality=95)  # type: ignore[arg-type]
    assert probe_image(data) == (fmt, 64, 48)
    y = decode_image(data)
    assert y.shape == x.shape
    assert _psnr(y, x) > min_psnr
    assert _psnr(decode_image(encode_image(x, fmt, quality=10)), x) < _psnr(y, x)  # type: ignore[arg-type]


def test_media_type_tables_agree() -> None:
    for media, fmt in FORMATS.items():
        assert MEDIA_TYPES[fmt] in (media, "image/jpeg")
    with pytest.raises(ValueError, match="unknown format 'gif'"):
        encode_image(_quantised(), "gif")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one image, got a batch of 2"):
        encode_image(torch.rand(2, 3, 8, 8))


def test_values_outside_the_unit_range_are_clamped_not_wrapped() -> None:
    x = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.7]).view(1, 1, 1, 5).expand(1, 3, 1, 5).contiguous()
    arr = to_uint8(x)
    assert arr[0, :, 0].tolist() == [0, 0, 128, 255, 255]
    torch.testing.assert_close(from_uint8(arr), x.clamp(0, 1).mul(255).round().div(255))


def test_read_and_write_files_atomically(tmp_path: Path) -> None:
    x = _quantised(seed=3)
    for name in ("a.png", "b.jpg", "c.webp"):
        write_image(x, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.jpg", "c.webp"], "no temp files left"
    torch.testing.assert_close(read_image(tmp_path / "a.png"), x, rtol=0, atol=0)
    assert probe_image((tmp_path / "b.jpg").read_bytes())[0] == "jpeg"
    assert probe_image((tmp_path / "c.webp").read_bytes())[0] == "webp"
    with pytest.raises(ImageError, match=r"cannot read .*missing\.png") as info:
        read_image(tmp_path / "missing.png")
    assert info.value.code == "unreadable"
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageError, match=r"bad\.png: ") as info:
        read_image(tmp_path / "bad.png")
    assert info.value.code == "corrupt_image"


# --- bad inputs: one code per case ----------------------------------------------------------------------------


def test_empty_and_non_image_bodies() -> None:
    assert _code(b"") == "empty_body"
    assert _code(b"hello, this is text and not an image") == "not_an_image"
    assert _code(b"%PDF-1.7\n" + b"\0" * 100) == "not_an_image"


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.95])
def test_truncated_images_are_corrupt(fmt: str, fraction: float) -> None:
    data = encode_image(_quantised(64, 64), fmt)  # type: ignore[arg-type]
    assert _code(data[: max(20, int(len(data) * fraction))]) == "corrupt_image"


def test_byte_limit_is_checked_first() -> None:
    data = encode_image(_quantised())
    with pytest.raises(ImageError, match=f"image is {len(data)} bytes; the limit is 100") as info:
        decode_image(data, ImageLimits(max_bytes=100))
    assert (info.value.code, info.value.status) == ("too_many_bytes", 413)


@pytest.mark.parametrize(("width", "height"), [(100_000, 100_000), (5000, 4000), (4097, 4096)])
def test_decompression_bomb_is_refused_from_the_header(width: int, height: int) -> None:
    """A 100-byte PNG that declares billions of pixels is refused before any pixel is allocated."""
    bomb = _raw_png(width, height, 8, 2, rows=None)
    assert len(bomb) < 100
    with pytest.raises(ImageError, match="pixels") as info:
        decode_image(bomb)
    assert (info.value.code, info.value.status) == ("too_many_pixels", 413)
    with pytest.raises(ImageError):
        probe_image(bomb)


def test_pixel_limit_just_fits() -> None:
    data = encode_image(_quantised(16, 16))
    assert decode_image(data, ImageLimits(max_pixels=256)).shape == (1, 3, 16, 16)
    assert _code(data, ImageLimits(max_pixels=255)) == "too_many_pixels"


def test_too_small_and_unsupported_formats() -> None:
    tiny = encode_image(_quantised(4, 9))
    with pytest.raises(ImageError, match="image is 9x4; the shorter side must be at least 8") as info:
        decode_image(tiny, ImageLimits(min_side=8))
    assert info.value.code == "too_small"
    rgb = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    for fmt in ("GIF", "BMP", "TIFF"):
        with pytest.raises(ImageError, match=f"format {fmt} is not accepted") as info:
            decode_image(_pil_bytes(rgb, fmt))
        assert (info.value.code, info.value.status) == ("unsupported_format", 415)
    assert _code(encode_image(_quantised()), ImageLimits(allowed_formats=("jpeg",))) == "unsupported_format"


def test_random_damage_only_ever_raises_image_error() -> None:
    """Truncations and byte flips of valid files: decoded or refused with an ImageError, never anything else."""
    rng = random.Random(0)
    for fmt in ("png", "jpeg", "webp"):
        data = encode_image(_quantised(32, 40, seed=5), fmt)  # type: ignore[arg-type]
        cases = [data[:n] for n in range(0, len(data), max(1, len(data) // 60))]
        for _ in range(150):
            damaged = bytearray(data)
            for _ in range(3):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            cases.append(bytes(damaged))
        for case in cases:
            try:
                y = decode_image(case)
            except ImageError:
                continue
            assert y.shape[:2] == (1, 3)


# --- the mode policy -------------------------------------------------------------------------------------------


def test_grayscale_is_replicated_to_three_channels() -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    y = decode_image(_pil_bytes(Image.fromarray(gray, "L"), "PNG"))
    assert y.shape == (1, 3, 8, 8)
    for c in range(3):
        torch.testing.assert_close(y[0, c], torch.from_numpy(gray).float() / 255)
    bw = decode_image(_pil_bytes(Image.fromarray(gray > 100), "PNG"))  # mode "1"
    assert set(bw.unique().tolist()) == {0.0, 1.0}


def test_16_bit_grayscale_is_scaled_or_refused() -> None:
    arr = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    data = _pil_bytes(Image.fromarray(arr), "PNG")
    assert png_bit_depth(data) == 16
    y = decode_image(data)
    assert (y[0, 0, 0] * 255).round().tolist() == [0, 1, 128, 255]
    with pytest.raises(ImageError, match="16-bit images are refused") as info:
        decode_image(data, ImageLimits(bit16="refuse"))
    assert (info.value.code, info.value.status) == ("unsupported_mode", 415)


def test_16_bit_colour_png_is_scaled_or_refused() -> None:
    """Pillow opens 16-bit RGB/RGBA PNGs as 8-bit modes, so the policy reads the bit depth from IHDR."""
    rgb16 = np.array([[[65535, 32896, 0], [257, 0, 65535]]], dtype=">u2")  # 1 x 2 pixels
    rows = b"\0" + rgb16.tobytes()
    data = _raw_png(2, 1, 16, 2, rows)
    y = decode_image(data)
    assert (y[0, :, 0, 0] * 255).round().tolist() == [255, 128, 0]
    assert (y[0, :, 0, 1] * 255).round().tolist() == [1, 0, 255]
    assert _code(data, ImageLimits(bit16="refuse")) == "unsupported_mode"
    rgba16 = _raw_png(1, 1, 16, 6, b"\0" + np.array([65535, 0, 0, 65535], dtype=">u2").tobytes())
    assert _code(rgba16, ImageLimits(bit16="refuse")) == "unsupported_mode"
    assert decode_image(rgba16)[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert png_bit_depth(encode_image(_quantised())) == 8
    assert png_bit_depth(b"not a png at all, definitely") is None


def test_alpha_is_composited_on_white_or_refused() -> None:
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent -> white
    rgba[0, 2] = (0, 0, 255, 128)  # half blue over white
    data = _pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG")
    y = (decode_image(data)[0] * 255).round()
    assert y[:, 0, 0].tolist() == [255, 0, 0]
    assert y[:, 0, 1].tolist() == [255, 255, 255]
    assert y[:, 0, 2].tolist() == [127, 127, 255]
    with pytest.raises(ImageError, match="alpha channel") as info:
        decode_image(data, ImageLimits(alpha="refuse"))
    assert (info.value.code, info.value.status) == ("unsupported_mode", 415)
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA")
    assert decode_image(_pil_bytes(la, "PNG"))[0, 0, 0].tolist() == [1.0, 0.0]
    webp_alpha = _pil_bytes(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True)
    assert (decode_image(webp_alpha)[0, :, 0, 1] * 255).round().tolist() == [255, 255, 255]


def test_palette_images_are_converted() -> None:
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 200, 100, 0] + [0] * (256 * 3 - 6))
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    y = (decode_image(_pil_bytes(pal, "PNG"))[0] * 255).round()
    assert y[:, 0, 0].tolist() == [10, 20, 30]
    assert y[:, 0, 1].tolist() == [200, 100, 0]
    transparent = _pil_bytes(pal, "PNG", transparency=0)  # palette entry 0 is transparent -> white
    y = (decode_image(transparent)[0] * 255).round()
    assert y[:, 0, 0].tolist() == [255, 255, 255]
    assert y[:, 0, 1].tolist() == [200, 100, 0]
    assert _code(transparent, ImageLimits(alpha="refuse")) == "unsupported_mode"


def test_cmyk_jpeg_is_converted() -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    y = decode_image(_pil_bytes(cmyk, "JPEG", quality=100))
    assert (y[0, :, 4, 4] * 255).round().tolist() == [255, 0, 0]


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_images_first_frame_or_refused(fmt: str) -> None:
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (10, 200)]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = _pil_bytes(frames[0], fmt, save_all=True, append_images=frames[1:], **kw)
    y = decode_image(data)
    assert (y * 255).round().unique().tolist() == [10.0]
    with pytest.raises(ImageError, match="animated images are refused") as info:
        decode_image(data, ImageLimits(animated="refuse"))
    assert info.value.code == "unsupported_mode"
