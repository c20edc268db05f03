"""The bundled corpus: deterministic, disjoint splits (by group and by image content); folders; sampling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from translators.codecs import encode_image, read_image, write_image
from translators.corpus import (
    BUNDLED,
    DEFAULT_SEED,
    SPLITS,
    PatchSampler,
    available_photos,
    export_split,
    image_digest,
    image_sizes,
    load_images,
    photos_in_split,
    split_assignment,
    tiles,
)
from translators.errors import CorpusError

# The default split is part of every experiment's provenance: changing it silently would make old
# results incomparable, so it is pinned here. Change it only on purpose (and say so in the changelog).
PINNED_DEFAULT_SPLIT = {
    "astronaut": "victim", "coffee": "benchmark", "chelsea": "attacker", "motorcycle_left": "attacker",
    "motorcycle_right": "attacker", "ihc": "victim", "hubble": "benchmark", "retina": "victim", "rocket": "victim",
    "china": "benchmark", "flower": "attacker", "grace_hopper": "victim", "camera": "attacker", "coins": "victim",
    "moon": "victim", "gravel": "victim", "brick": "benchmark", "grass": "benchmark", "cell": "attacker",
    "ascent": "victim", "aero": "victim",
}


@pytest.fixture(scope="module")
def corpus() -> dict[str, torch.Tensor]:
    photos = available_photos()
    if len(photos) != len(BUNDLED):
        missing = sorted({p.package for p in BUNDLED} - {p.package for p in photos})
        pytest.fail(f"bundled photos missing; install the packages that ship them: {missing}")
    return {im.name: im.image for im in load_images("corpus:all")}


def test_default_split_is_pinned() -> None:
    assert split_assignment(DEFAULT_SEED) == PINNED_DEFAULT_SPLIT
    counts = Counter(PINNED_DEFAULT_SPLIT.values())
    assert counts == {"victim": 10, "attacker": 6, "benchmark": 5}


def test_split_is_identical_in_a_fresh_process_with_another_hash_seed() -> None:
    """sha256-based, not ``hash()``-based: PYTHONHASHSEED must not change the split."""
    code = ("import json; from translators.corpus import split_assignment; "
            "print(json.dumps({s: split_assignment(s) for s in (0, 7, 1234)}))")
    env = {**os.environ, "PYTHONHASHSEED": "987"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert json.loads(out.stdout) == {str(s): split_assignment(s) for s in (0, 7, 1234)}


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 42, 99, DEFAULT_SEED])
def test_every_seed_gives_disjoint_complete_group_respecting_splits(seed: int) -> None:
    assignment = split_assignment(seed)
    assert set(assignment) == {p.id for p in BUNDLED}
    assert set(assignment.values()) == set(SPLITS), "every split gets photos"
    by_group: dict[str, set[str]] = {}
    for p in BUNDLED:
        by_group.setdefault(p.group, set()).add(assignment[p.id])
    assert all(len(splits) == 1 for splits in by_group.values()), "a group never straddles two splits"
    assert assignment["motorcycle_left"] == assignment["motorcycle_right"]
    for color in (True, False):  # each stratum is dealt victim, attacker, benchmark, victim, ...
        groups = {p.group: assignment[p.id] for p in BUNDLED if p.color == color}
        c = Counter(groups.values())
        assert c["victim"] >= c["attacker"] >= c["benchmark"] >= 1
    ids = {s: {p.id for p in photos_in_split(s, seed)} for s in SPLITS}
    assert ids["victim"].isdisjoint(ids["attacker"])
    assert ids["victim"].isdisjoint(ids["benchmark"])
    assert ids["attacker"].isdisjoint(ids["benchmark"])
    assert set().union(*ids.values()) == {p.id for p in photos_in_split("all", seed)}


def test_seeds_change_the_split() -> None:
    assert len({tuple(sorted(split_assignment(s).items())) for s in range(6)}) > 1


def test_splits_are_disjoint_by_image_content(corpus: dict[str, torch.Tensor]) -> None:
    digests = {name: image_digest(x) for name, x in corpus.items()}
    assert len(set(digests.values())) == len(digests), "no photo is bundled twice"
    for seed in (0, DEFAULT_SEED):
        per_split = {s: {digests[p.id] for p in photos_in_split(s, seed)} for s in SPLITS}
        assert per_split["victim"].isdisjoint(per_split["attacker"] | per_split["benchmark"])
        assert per_split["attacker"].isdisjoint(per_split["benchmark"])


def test_corpus_images_are_rgb_unit_range_and_large(corpus: dict[str, torch.Tensor]) -> None:
    for name, x in corpus.items():
        assert x.shape[:2] == (1, 3), name
        assert x.dtype == torch.float32
        assert 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
        assert min(x.shape[-2:]) >= 300, f"{name} is smaller than the 300 px the corpus promises"
    gray = [p.id for p in BUNDLED if not p.color]
    for name in gray:
        x = corpus[name]
        torch.testing.assert_close(x[:, 0], x[:, 1])


def test_image_digest_is_content_based() -> None:
    x = torch.randint(0, 255, (1, 3, 8, 8), generator=torch.Generator().manual_seed(0)).float().div(255)
    assert image_digest(x) == image_digest(x.clone())
    y = x.clone()
    y[0, 0, 0, 0] += 1 / 255
    assert image_digest(y) != image_digest(x)
    assert image_digest(x + 0.4 / 255) == image_digest(x), "sub-quantum changes round to the same 8-bit image"


def test_load_images_errors() -> None:
    with pytest.raises(CorpusError, match="unknown corpus split 'train'"):
        load_images("corpus:train")
    with pytest.raises(CorpusError, match="not a folder"):
        load_images("/definitely/not/here")


def test_folder_spec(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    (tmp_path / "sub").mkdir()
    write_image(torch.rand(1, 3, 40, 60, generator=g), tmp_path / "b.png")
    write_image(torch.rand(1, 3, 30, 20, generator=g), tmp_path / "sub" / "a.jpg")
    (tmp_path / "broken.png").write_bytes(encode_image(torch.rand(1, 3, 8, 8))[:30])
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_images(str(tmp_path))
    assert [im.name for im in images] == ["b.png", "sub/a.jpg"], "sorted, nested names, unreadable skipped"
    torch.testing.assert_close(images[0].image, read_image(tmp_path / "b.png"))
    assert image_sizes(str(tmp_path)) == [("b.png", 60, 40), ("sub/a.jpg", 20, 30)]
    small = load_images(str(tmp_path), max_side=15)
    assert [tuple(im.image.shape[-2:]) for im in small] == [(10, 15), (15, 10)]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="no readable"):
        load_images(str(empty))


def test_corpus_image_sizes_match_loaded(corpus: dict[str, torch.Tensor]) -> None:
    sizes = image_sizes("corpus:benchmark")
    assert [n for n, _, _ in sizes] == [p.id for p in photos_in_split("benchmark")]
    for name, w, h in sizes:
        assert corpus[name].shape[-2:] == (h, w)


def test_export_split(tmp_path: Path, corpus: dict[str, torch.Tensor]) -> None:
    written = export_split("corpus:benchmark", tmp_path / "bench")
    assert sorted(p.stem for p in written) == sorted(p.id for p in photos_in_split("benchmark"))
    for p in written:
        torch.testing.assert_close(read_image(p), corpus[p.stem], rtol=0, atol=0)
    with pytest.raises(CorpusError):
        export_split("corpus:nope", tmp_path / "never")
    assert not (tmp_path / "never").exists(), "a bad spec creates no folder"


def test_patch_sampler_is_seeded_and_crops_real_windows() -> None:
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(1, 3, 20, 30, generator=g), torch.rand(1, 3, 12, 12, generator=g),
              torch.rand(1, 3, 8, 40, generator=g)]  # the last is too small for 10x10 crops
    a = PatchSampler(images, size=10, seed=5).sample(16)
    b = PatchSampler(images, size=10, seed=5).sample(16)
    c = PatchSampler(images, size=10, seed=6).sample(16)
    assert a.shape == (16, 3, 10, 10)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    windows = [w for im in images[:2] for t in range(im.shape[-2] - 9) for left in range(im.shape[-1] - 9)
               for w in (im[0, :, t:t + 10, left:left + 10],)]
    flipped = 0
    for crop in a:
        if any(torch.equal(crop, w) for w in windows):
            continue
        assert any(torch.equal(crop.flip(-1), w) for w in windows), "every crop is a (possibly mirrored) window"
        flipped += 1
    assert 0 < flipped < 16
    plain = PatchSampler(images, size=10, seed=5, flips=False).sample(8)
    assert all(any(torch.equal(crop, w) for w in windows) for crop in plain)
    first = next(iter(PatchSampler(images, size=10, seed=5)))
    assert first.shape == (1, 3, 10, 10)
    with pytest.raises(CorpusError, match="no image is at least 50x50"):
        PatchSampler(images, size=50)


def test_tiles() -> None:
    x = torch.arange(3 * 5 * 7, dtype=torch.float32).view(1, 3, 5, 7)
    out = tiles(x, 2)
    assert len(out) == 2 * 3
    torch.testing.assert_close(out[1], x[..., 0:2, 2:4])
    assert len(tiles(x, 3, stride=1)) == 3 * 5


def test_every_bundled_photo_reports_the_size_it_loads_at() -> None:
    """``heist corpus list`` printed "npz" for PyWavelets' photos; their size comes from the array now."""
    photos = available_photos()
    assert any(p.path().suffix == ".npz" for p in photos)
    for p in photos:
        w, h = p.size()
        assert p.load().shape[-2:] == (h, w), p.id
