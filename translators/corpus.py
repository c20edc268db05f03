"""The offline photo corpus: natural photos that ship inside installed Python packages, plus user folders.

Splits are deterministic and disjoint at the level of source photos (a *group*: the two views of the
scikit-image stereo motorcycle are one group), so no scene leaks from the victim's training data into
the attacker's queries or the benchmark. Assignment: within each stratum (colour, grayscale), groups
are ordered by ``sha256(seed:group)`` and dealt round-robin in the pattern
``victim, attacker, benchmark, victim`` (about 50/25/25).

Image specs accepted by :func:`load_images` (and every ``--images`` option):
``corpus:victim``, ``corpus:attacker``, ``corpus:benchmark``, ``corpus:all``, a folder path, or
``dataset:NAME[:SUBSET]`` for a public dataset fetched with ``heist data fetch NAME``
(see :mod:`translators.datasets`). A folder (or dataset) yields every PNG/JPEG/WebP/BMP/TIFF file below it
(:func:`image_files`: hidden files and folders, names starting with a dot, are left out); files that cannot
be decoded are logged by name and counted, then skipped.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from translators.codecs import probe_file, read_image
from translators.errors import CorpusError, ImageError
from translators.files import unusable_folder_reason
from translators.images import from_uint8, to_uint8_tensor

Split = Literal["victim", "attacker", "benchmark"]
SPLITS: tuple[Split, ...] = ("victim", "attacker", "benchmark")
DEFAULT_SEED = 1234
_PATTERN: tuple[Split, ...] = ("victim", "attacker", "benchmark", "victim")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
OTHER_IMAGE_SUFFIXES = {".gif", ".heic", ".heif", ".avif", ".jxl", ".svg", ".ico", ".jp2", ".psd", ".raw", ".dng"}
"""Image formats Heist does not read: skipped with a warning, so a folder's missing photos are never silent."""
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Photo:
    """One bundled photo: ``package`` and ``relpath`` locate it inside the installed package."""

    id: str
    package: str
    relpath: str
    group: str
    color: bool
    description: str

    def path(self) -> Path:
        mod = importlib.import_module(self.package)
        return Path(mod.__file__).parent / self.relpath  # type: ignore[arg-type]

    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels, reading only a PNG/JPEG's header."""
        p = self.path()
        if p.suffix == ".npz":
            with np.load(p) as z:
                h, w = z[z.files[0]].shape[:2]
            return int(w), int(h)
        from PIL import Image

        with Image.open(p) as im:
            return im.size

    def load(self) -> torch.Tensor:
        """``(1, 3, H, W)`` float in [0, 1]. Grayscale photos are replicated to 3 channels."""
        p = self.path()
        if p.suffix == ".npz":  # PyWavelets stores its images as npz arrays
            with np.load(p) as z:
                arr = z[z.files[0]]
            return from_uint8(np.repeat(arr.astype(np.uint8)[..., None], 3, axis=2))
        return read_image(p)


# Natural photos of at least 300 px a side shipped by scikit-image, scikit-learn, matplotlib and
# PyWavelets. Synthetic images (logos, chessboards, phantoms) are left out.
BUNDLED: tuple[Photo, ...] = (
    Photo("astronaut", "skimage", "data/astronaut.png", "astronaut", True, "Eileen Collins portrait"),
    Photo("coffee", "skimage", "data/coffee.png", "coffee", True, "cup of coffee on a table"),
    Photo("chelsea", "skimage", "data/chelsea.png", "chelsea", True, "a cat"),
    Photo("motorcycle_left", "skimage", "data/motorcycle_left.png", "motorcycle", True, "stereo pair, left"),
    Photo("motorcycle_right", "skimage", "data/motorcycle_right.png", "motorcycle", True, "stereo pair, right"),
    Photo("ihc", "skimage", "data/ihc.png", "ihc", True, "immunohistochemistry micrograph"),
    Photo("hubble", "skimage", "data/hubble_deep_field.jpg", "hubble", True, "Hubble deep field"),
    Photo("retina", "skimage", "data/retina.jpg", "retina", True, "fundus photograph"),
    Photo("rocket", "skimage", "data/rocket.jpg", "rocket", True, "rocket launch"),
    Photo("china", "sklearn", "datasets/images/china.jpg", "china", True, "Chinese temple"),
    Photo("flower", "sklearn", "datasets/images/flower.jpg", "flower", True, "flower close-up"),
    Photo("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "grace_hopper", True,
          "Grace Hopper portrait"),
    Photo("camera", "skimage", "data/camera.png", "camera", False, "cameraman"),
    Photo("coins", "skimage", "data/coins.png", "coins", False, "Greek coins"),
    Photo("moon", "skimage", "data/moon.png", "moon", False, "lunar surface"),
    Photo("gravel", "skimage", "data/gravel.png", "gravel", False, "gravel texture"),
    Photo("brick", "skimage", "data/brick.png", "brick", False, "brick wall texture"),
    Photo("grass", "skimage", "data/grass.png", "grass", False, "grass texture"),
    Photo("cell", "skimage", "data/cell.png", "cell", False, "cell micrograph"),
    Photo("ascent", "pywt", "data/ascent.npz", "ascent", False, "people climbing stairs"),
    Photo("aero", "pywt", "data/aero.npz", "aero", False, "aerial photograph"),
)


def _rank(seed: int, group: str) -> str:
    return hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()


@cache
def split_assignment(seed: int = DEFAULT_SEED) -> dict[str, Split]:
    """Photo id -> split, deterministic in ``seed``; whole groups go to one split."""
    out: dict[str, Split] = {}
    for color in (True, False):
        groups = sorted({p.group for p in BUNDLED if p.color == color}, key=lambda g: _rank(seed, g))
        by_group = {g: _PATTERN[i % len(_PATTERN)] for i, g in enumerate(groups)}
        for p in BUNDLED:
            if p.color == color:
                out[p.id] = by_group[p.group]
    return out


def available_photos() -> list[Photo]:
    """Bundled photos whose package is installed and whose file exists."""
    found = []
    for p in BUNDLED:
        try:
            if p.path().exists():
                found.append(p)
        except ImportError:
            continue
    return found


def photos_in_split(split: Split | Literal["all"], seed: int = DEFAULT_SEED) -> list[Photo]:
    assignment = split_assignment(seed)
    return [p for p in available_photos() if split == "all" or assignment[p.id] == split]


@dataclass(frozen=True)
class NamedImage:
    """An image with a stable name (used in pair stores, reports and per-image scores)."""

    name: str
    image: torch.Tensor  # (1, 3, H, W) in [0, 1]


def is_hidden(name: str) -> bool:
    """True for a hidden file or folder name (it starts with a dot): ``.DS_Store``, Mac ``._*`` resource
    forks, ``.thumbs/`` and similar are never photos."""
    return name.startswith(".")


def image_files(folder: Path) -> list[Path]:
    """Image files (by suffix, :data:`IMAGE_SUFFIXES`) under ``folder``, sorted, hidden files and folders
    below it left out (:func:`is_hidden`; ``folder`` itself may sit inside a hidden folder)."""
    if not folder.is_dir():
        raise CorpusError(
            f"{folder}: not a folder (give corpus:victim|attacker|benchmark|all, dataset:NAME or a folder path)"
        )
    found: list[Path] = []
    unsupported: list[Path] = []
    for top, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not is_hidden(d)]
        for f in files:
            suffix = Path(f).suffix.lower()
            if not is_hidden(f) and suffix in IMAGE_SUFFIXES:
                found.append(Path(top) / f)
            elif not is_hidden(f) and suffix in OTHER_IMAGE_SUFFIXES:
                unsupported.append(Path(top) / f)
    if unsupported:
        log.warning("%s: %d image file(s) in formats Heist does not read were skipped (e.g. %s; convert them to "
                    "PNG or JPEG)", folder, len(unsupported), sorted(unsupported)[0].name)
    broken = sorted(f for f in found if not f.is_file())
    if broken:
        log.warning("%s: %d broken link(s) or non-file(s) skipped (e.g. %s)", folder, len(broken), broken[0].name)
    out: list[Path] = []
    seen: dict[Path, Path] = {}
    for f in sorted(f for f in found if f.is_file()):
        real = f.resolve()
        if real in seen:  # a link to a photo already in the folder: one source, not two
            log.warning("%s: %s is the same file as %s; counted once", folder, f.name, seen[real].name)
            continue
        seen[real] = f
        out.append(f)
    return out


_NAMED_SKIPS = 10  # unreadable files named one by one in the log; the rest are only counted


def _report_skipped(folder: Path, skipped: list[ImageError], total: int) -> None:
    """Log each unreadable file (the first few by name) and how many were skipped."""
    for exc in skipped[:_NAMED_SKIPS]:
        log.warning("skipped an unreadable image: %s", exc)
    if skipped:
        more = f" ({len(skipped) - _NAMED_SKIPS} more not named)" if len(skipped) > _NAMED_SKIPS else ""
        log.warning("%s: %d of %d image files could not be read and were skipped%s", folder, len(skipped), total,
                    more)


def _files(n: int) -> str:
    return f"{n} image file{'' if n == 1 else 's'}"


def _nothing_readable(folder: Path, skipped: list[ImageError]) -> CorpusError:
    why = f" ({_files(len(skipped))} could not be read, e.g. {skipped[0]})" if skipped else ""
    return CorpusError(f"{folder}: no readable PNG/JPEG/WebP/BMP/TIFF image inside{why}")


def _folder_images(folder: Path, max_side: int | None = None) -> list[NamedImage]:
    """Decode every readable image under ``folder``; each is downsized as soon as it is read, so a folder
    of 2K photos never sits in memory at full resolution when ``max_side`` is given. Unreadable files are
    logged by name, counted and skipped; none readable is a :class:`CorpusError`."""
    out: list[NamedImage] = []
    skipped: list[ImageError] = []
    files = image_files(folder)
    for f in files:
        try:
            x = read_image(f)
        except ImageError as exc:
            skipped.append(exc)
            continue
        out.append(NamedImage(str(f.relative_to(folder)), _limit_side(x, max_side) if max_side else x))
    if not out:
        raise _nothing_readable(folder, skipped)
    _report_skipped(folder, skipped, len(files))
    return out


def _spec_folder(spec: str) -> Path | None:
    """The folder a non-corpus spec names (``dataset:NAME[:SUBSET]`` or a path); None for ``corpus:``."""
    if spec.startswith("corpus:"):
        return None
    if spec.startswith("dataset:"):
        from translators.datasets import dataset_images_dir

        name, _, subset = spec.split(":", 1)[1].partition(":")
        return dataset_images_dir(name, subset or None)
    return Path(spec).expanduser()


def _corpus_split(spec: str) -> str:
    split = spec.split(":", 1)[1]
    if split not in (*SPLITS, "all"):
        raise CorpusError(f"unknown corpus split {split!r}; use victim, attacker, benchmark or all")
    return split


def load_images(spec: str, seed: int = DEFAULT_SEED, max_side: int | None = None) -> list[NamedImage]:
    """Load images named by ``spec`` (``corpus:SPLIT``, ``dataset:NAME[:SUBSET]`` or a folder).

    ``max_side`` downsizes large photos (each one as it is read). The order is stable: bundled order
    for the corpus, sorted relative paths for folders.
    """
    folder = _spec_folder(spec)
    if folder is not None:
        return _folder_images(folder, max_side)
    split = _corpus_split(spec)
    images = [NamedImage(p.id, p.load()) for p in photos_in_split(split, seed)]  # type: ignore[arg-type]
    if not images:
        raise CorpusError(f"corpus split {split!r} is empty: install scikit-image, scikit-learn, matplotlib")
    if max_side:
        images = [NamedImage(im.name, _limit_side(im.image, max_side)) for im in images]
    return images


def check_spec(spec: str) -> None:
    """Raise the :class:`CorpusError` that :func:`load_images` would for a spec naming nothing (an unknown
    split, a dataset not fetched, a missing or image-less folder) without decoding any image, so a command
    that loads its images late refuses a typo before its work starts."""
    folder = _spec_folder(spec)
    if folder is None:
        _corpus_split(spec)
    elif not image_files(folder):
        raise _nothing_readable(folder, [])


def image_sizes(spec: str, seed: int = DEFAULT_SEED) -> list[tuple[str, int, int]]:
    """``(name, width, height)`` for every image ``spec`` names, read from headers only (cheap for big folders).

    Sizes are upright (EXIF orientation applied), as :func:`load_images` loads them. Files whose header
    cannot be read are logged, counted and left out, as :func:`load_images` does with undecodable ones; a
    folder with no readable image is a :class:`CorpusError`, as there.
    """
    folder = _spec_folder(spec)
    if folder is None:
        split = _corpus_split(spec)
        return [(p.id, im.shape[-1], im.shape[-2]) for p in photos_in_split(split, seed)  # type: ignore[arg-type]
                for im in (p.load(),)]
    out = []
    skipped: list[ImageError] = []
    files = image_files(folder)
    for f in files:
        try:
            _, w, h = probe_file(f)
        except ImageError as exc:
            skipped.append(exc)
            continue
        out.append((str(f.relative_to(folder)), w, h))
    if not out:
        raise _nothing_readable(folder, skipped)
    _report_skipped(folder, skipped, len(files))
    return out


def _limit_side(x: torch.Tensor, max_side: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if max(h, w) <= max_side:
        return x
    s = max_side / max(h, w)
    return torch.nn.functional.interpolate(
        x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bicubic", antialias=True, align_corners=False
    ).clamp(0, 1)


def tiles(image: torch.Tensor, size: int, stride: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping (or ``stride``-spaced) ``size`` x ``size`` tiles of a ``(1, 3, H, W)`` image."""
    stride = stride or size
    h, w = image.shape[-2:]
    return [
        image[..., t : t + size, left : left + size]
        for t in range(0, h - size + 1, stride)
        for left in range(0, w - size + 1, stride)
    ]


class PatchSampler:
    """Random ``size`` x ``size`` crops (with optional flips) from a list of images, seeded.

    ``sample(n)`` returns an ``(n, 3, size, size)`` batch. Images smaller than ``size`` are skipped.
    """

    def __init__(self, images: Sequence[torch.Tensor], size: int, seed: int = 0, flips: bool = True) -> None:
        self.images = [im for im in images if min(im.shape[-2:]) >= size]
        if not self.images:
            raise CorpusError(f"no image is at least {size}x{size}")
        self.size = size
        self.flips = flips
        self.rng = random.Random(seed)

    def crop(self) -> torch.Tensor:
        im = self.images[self.rng.randrange(len(self.images))]
        h, w = im.shape[-2:]
        top, left = self.rng.randint(0, h - self.size), self.rng.randint(0, w - self.size)
        c = im[..., top : top + self.size, left : left + self.size]
        if self.flips and self.rng.random() < 0.5:
            c = c.flip(-1)
        return c

    def sample(self, n: int) -> torch.Tensor:
        return torch.cat([self.crop() for _ in range(n)], dim=0)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.crop()


def export_split(spec: str, out_dir: str | Path, seed: int = DEFAULT_SEED) -> list[Path]:
    """Write the images of ``spec`` as PNG files into ``out_dir``; returns the written paths."""
    from translators.codecs import write_image

    images = load_images(spec, seed)  # fail on a bad spec before creating any folder
    out = Path(out_dir)
    if (why := unusable_folder_reason(out)) is not None:
        raise CorpusError(f"{out}: {why}; name a folder to export into")
    written = []
    for im in images:
        path = out / f"{Path(im.name).stem}.png"
        write_image(im.image, path)
        written.append(path)
    return written


def image_digest(x: torch.Tensor) -> str:
    """sha256 of the PNG-quantised image, stable across runs (used to prove splits are disjoint)."""
    buf = io.BytesIO()
    arr = to_uint8_tensor(x[0]).permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(buf, "PNG", compress_level=0)
    return hashlib.sha256(buf.getvalue()).hexdigest()
