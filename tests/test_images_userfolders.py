"""Folders of the user's photos (folder specs, ``dataset:`` specs, ``heist data inspect``): every format the
docs name (BMP and TIFF too, 8/16-bit, grayscale, RGBA), EXIF orientation applied and reported upright,
undecodable files reported, hidden files and folders skipped."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from translators.codecs import decode_image, read_image
from translators.corpus import image_sizes, load_images
from translators.datasets import MARKER
from translators.errors import CorpusError, ImageError

ROOT = Path(__file__).resolve().parents[1]
_ORIENTATION = 0x0112


def heist(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``heist`` command in a wide terminal (rich does not wrap its table)."""
    return subprocess.run([str(ROOT / ".venv" / "bin" / "heist"), *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "250"}, cwd=ROOT, timeout=180, check=False)


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.astype(np.float32) / 255).permute(2, 0, 1).unsqueeze(0)


def _tiff_rgb16(path: Path, arr: np.ndarray) -> None:
    """An uncompressed 16-bit RGB TIFF written by hand (Pillow cannot write one)."""
    h, w, _ = arr.shape
    pixels = arr.astype("<u2").tobytes()
    n = 10
    bits_at = 8 + 2 + n * 12 + 4
    data_at = bits_at + 6
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, bits_at), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, data_at), (277, 3, 1, 3), (278, 4, 1, h), (279, 4, 1, len(pixels)), (284, 3, 1, 1)]
    out = b"II*\0" + struct.pack("<IH", 8, n)
    for tag, kind, count, value in entries:
        out += struct.pack("<HHIHH", tag, kind, count, value, 0) if kind == 3 and count == 1 else \
            struct.pack("<HHII", tag, kind, count, value)
    path.write_bytes(out + struct.pack("<I", 0) + struct.pack("<3H", 16, 16, 16) + pixels)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[_ORIENTATION] = orientation
    return exif.tobytes()


# --- bug 1: BMP and TIFF in user folders ----------------------------------------------------------------------


def test_bmp_and_tiff_photos_in_a_folder_are_read_like_png(tmp_path: Path) -> None:
    rgb = _rgb(12, 16, seed=1)
    gray = _rgb(12, 16, seed=2)[..., 0]
    rgba = np.dstack([_rgb(12, 16, seed=3), np.linspace(0, 255, 16 * 12).astype(np.uint8).reshape(12, 16)])
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "b.bmp")
    Image.fromarray(gray, "L").save(tmp_path / "c_gray.bmp")
    Image.fromarray(rgb).save(tmp_path / "d.tiff")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "e_gray16.tif")  # mode I;16
    Image.fromarray(rgba, "RGBA").save(tmp_path / "f_rgba.tiff")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "f_rgba.png")
    _tiff_rgb16(tmp_path / "g_rgb16.TIF", rgb.astype(np.uint16) * 257)
    images = {im.name: im.image for im in load_images(str(tmp_path))}
    assert sorted(images) == ["a.png", "b.bmp", "c_gray.bmp", "d.tiff", "e_gray16.tif", "f_rgba.png", "f_rgba.tiff",
                              "g_rgb16.TIF"]
    exact = _as_tensor(rgb)
    for name in ("a.png", "b.bmp", "d.tiff", "g_rgb16.TIF"):
        torch.testing.assert_close(images[name], exact, rtol=0, atol=0, msg=name)
    gray3 = _as_tensor(np.repeat(gray[..., None], 3, axis=2))
    for name in ("c_gray.bmp", "e_gray16.tif"):
        torch.testing.assert_close(images[name], gray3, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(images["f_rgba.tiff"], images["f_rgba.png"], rtol=0, atol=0)
    assert ("g_rgb16.TIF", 16, 12) in image_sizes(str(tmp_path))


def test_a_folder_of_only_tiff_photos_loads(tmp_path: Path) -> None:
    Image.fromarray(_rgb(20, 30)).save(tmp_path / "x.tif")
    assert [im.name for im in load_images(str(tmp_path))] == ["x.tif"]
    assert image_sizes(str(tmp_path)) == [("x.tif", 30, 20)]


def test_tiff_orientation_is_applied(tmp_path: Path) -> None:
    Image.fromarray(_rgb(48, 64)).save(tmp_path / "rot.tiff", tiffinfo={_ORIENTATION: 6})
    assert tuple(read_image(tmp_path / "rot.tiff").shape[-2:]) == (64, 48)
    assert image_sizes(str(tmp_path)) == [("rot.tiff", 48, 64)]


def test_the_api_codec_still_refuses_bmp_and_tiff(tmp_path: Path) -> None:
    for fmt in ("bmp", "tiff"):
        Image.fromarray(_rgb(8, 8)).save(tmp_path / f"x.{fmt}")
        with pytest.raises(ImageError, match="is not accepted") as info:
            decode_image((tmp_path / f"x.{fmt}").read_bytes())
        assert (info.value.code, info.value.status) == ("unsupported_format", 415)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's own warning about broken.tiff
def test_undecodable_files_are_reported_by_name_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Image.fromarray(_rgb(8, 8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    (tmp_path / "broken.tiff").write_bytes(b"II*\0" + b"\xff" * 20)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="translators.corpus"):
        assert [im.name for im in load_images(str(tmp_path))] == ["good.png"]
    text = caplog.text
    for name in ("broken.png", "broken.tiff", "empty.jpg"):
        assert name in text
    assert "3 of 4" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="translators.corpus"):
        assert image_sizes(str(tmp_path)) == [("good.png", 8, 8)]
    assert "broken.png" in caplog.text
    assert "3 of 4" in caplog.text
    (tmp_path / "good.png").unlink()
    with pytest.raises(CorpusError, match=r"no readable .* \(3 image files could not be read, e.g\. .*broken\.png"):
        load_images(str(tmp_path))


# --- bug 2: hidden files and folders ---------------------------------------------------------------------------


def _folder_with_hidden_files(folder: Path) -> None:
    (folder / ".thumbs").mkdir(parents=True)
    (folder / "sub").mkdir()
    Image.fromarray(_rgb(12, 16)).save(folder / "a.png")
    Image.fromarray(_rgb(12, 16)).save(folder / "sub" / "b.jpg")
    Image.fromarray(_rgb(12, 16)).save(folder / ".hidden.png")
    Image.fromarray(_rgb(4, 4)).save(folder / ".thumbs" / "thumb.png")
    Image.fromarray(_rgb(4, 4)).save(folder / "sub" / ".thumb.png")
    (folder / "._a.png").write_bytes(b"\0\x05\x16\x07 Mac resource fork junk")


def test_hidden_files_and_folders_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _folder_with_hidden_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="translators.corpus"):
        assert [im.name for im in load_images(str(tmp_path))] == ["a.png", "sub/b.jpg"]
        assert [n for n, _, _ in image_sizes(str(tmp_path))] == ["a.png", "sub/b.jpg"]
    assert "._a.png" not in caplog.text, "hidden junk is not even reported as unreadable"


def test_a_photo_folder_inside_a_hidden_folder_still_loads(tmp_path: Path) -> None:
    folder = tmp_path / ".cache" / "photos"
    _folder_with_hidden_files(folder)
    assert [im.name for im in load_images(str(folder))] == ["a.png", "sub/b.jpg"]


def test_hidden_files_are_skipped_in_a_dataset_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set5 = tmp_path / "datasets" / "set5"
    _folder_with_hidden_files(set5 / "Set5_HR")
    (set5 / MARKER).write_text(json.dumps({"name": "set5"}))
    monkeypatch.setenv("HEIST_DATA_DIR", str(tmp_path))
    assert [im.name for im in load_images("dataset:set5")] == ["a.png", "sub/b.jpg"]
    assert [n for n, _, _ in image_sizes("dataset:set5")] == ["a.png", "sub/b.jpg"]


# --- bug 3: inspect reports the upright size ----------------------------------------------------------------------


def test_inspect_reports_the_upright_size_of_exif_rotated_photos(tmp_path: Path) -> None:
    Image.fromarray(_rgb(48, 64)).save(tmp_path / "rot.jpg", exif=_exif(6))
    _folder_with_hidden_files(tmp_path / "more")
    loaded = load_images(str(tmp_path))[-1]
    assert loaded.name == "rot.jpg"
    assert tuple(loaded.image.shape[-2:]) == (64, 48)
    assert image_sizes(str(tmp_path))[-1] == ("rot.jpg", 48, 64)
    result = heist("data", "inspect", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "3 images" in result.stdout
    assert "48x64" in result.stdout
    assert "64x48" not in result.stdout
    assert "thumb" not in result.stdout
    assert "hidden" not in result.stdout


# --- bug 4: the docs say what the code does ---------------------------------------------------------------------


def test_foundation_doc_says_exif_orientation_is_applied() -> None:
    text = (ROOT / "docs" / "foundation.md").read_text()
    assert "EXIF orientation is not applied" not in text
    assert "EXIF orientation is applied" in text


def test_gifs_broken_links_and_duplicate_links_are_said_not_silent(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A GIF (a format Heist does not read), a dangling link and a link to a photo already in the folder:
    each is named in a warning; the linked photo counts once, not twice."""
    Image.fromarray(_rgb(12, 16)).save(tmp_path / "a.png")
    Image.fromarray(_rgb(12, 16, seed=1)).save(tmp_path / "anim.gif")
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    (tmp_path / "z-link.png").symlink_to(tmp_path / "a.png")
    with caplog.at_level(logging.WARNING, logger="translators.corpus"):
        assert [im.name for im in load_images(str(tmp_path))] == ["a.png"]
    assert "formats Heist does not read were skipped (e.g. anim.gif" in caplog.text
    assert "broken link(s) or non-file(s) skipped (e.g. gone.png)" in caplog.text
    assert "z-link.png is the same file as a.png; counted once" in caplog.text
