"""Query strategies: registry, determinism per index, published limits respected, diversity works."""

from __future__ import annotations

import random

import pytest
import torch

from attacker.errors import ConfigError
from attacker.strategies import STRATEGY_REGISTRY, build_strategy, patch_features
from attacker.strategies.leaves import dead_leaves, power_law_radius
from attacker.victim_info import ModelInfo
from translators.corpus import NamedImage, load_images
from translators.images import bicubic_resize


@pytest.fixture(scope="module")
def photos() -> list[NamedImage]:
    return load_images("corpus:attacker", max_side=256)


SR = ModelInfo(name="sr4x", task="sr", scale=4, min_side=8)
DENOISE = ModelInfo(name="denoise25", task="denoise", scale=1)
UNET = ModelInfo(name="style", task="style", scale=1, size_multiple=16, min_side=16, max_pixels=64 * 64)


def test_registry_holds_the_documented_strategies() -> None:
    import attacker.strategies  # noqa: F401

    assert {"random", "crops", "tiles", "augment", "diversity"} <= set(STRATEGY_REGISTRY.names())


@pytest.mark.parametrize("name", ["random", "crops", "tiles", "augment", "diversity"])
def test_query_i_is_the_same_after_a_restart(name: str, photos: list[NamedImage]) -> None:
    a = build_strategy(name, photos, DENOISE, None, seed=3)
    b = build_strategy(name, photos, DENOISE, None, seed=3)
    qa = [a.make(i) for i in range(6)]
    qb = [b.make(i) for i in range(6)]
    for x, y in zip(qa, qb):
        assert torch.equal(x.image, y.image)
        assert (x.source, x.crop, x.transform) == (y.source, y.crop, y.transform)
    c = build_strategy(name, photos, DENOISE, None, seed=4)
    assert not all(torch.equal(x.image, c.make(i).image) for i, x in enumerate(qa))


@pytest.mark.parametrize("name", ["random", "crops", "tiles", "augment", "diversity"])
def test_queries_respect_the_published_limits(name: str, photos: list[NamedImage]) -> None:
    s = build_strategy(name, photos, UNET, {"crop_size": 50}, seed=0)
    for i in range(5):
        q = s.make(i)
        h, w = q.image.shape[-2:]
        assert UNET.accepts(h, w) is None, (h, w)
        assert float(q.image.min()) >= 0.0
        assert float(q.image.max()) <= 1.0


def test_sr_queries_are_downscaled_crops_of_the_photos(photos: list[NamedImage]) -> None:
    s = build_strategy("crops", photos, SR, None, seed=0)
    q = s.make(0)
    assert q.image.shape[-2:] == (32, 32)  # auto crop for x4: 128 // 4
    src = next(p for p in photos if p.name == q.source).image
    small = s.sources[[p.name for p in s.sources].index(q.source)].image
    assert small.shape[-1] == src.shape[-1] // 4
    top, left, h, w = q.crop
    assert torch.equal(q.image, small[..., top : top + h, left : left + w])


def test_denoise_queries_get_noise_by_default_and_not_when_disabled(photos: list[NamedImage]) -> None:
    noisy = build_strategy("crops", photos, DENOISE, None, seed=0)
    clean = build_strategy("crops", photos, DENOISE, {"noise_sigma": None}, seed=0)
    qn, qc = noisy.make(1), clean.make(1)
    assert str(qn.transform).startswith("noise")
    assert qc.transform is None
    assert qn.crop == qc.crop
    assert float((qn.image - qc.image).abs().mean()) > 0.01
    fixed = build_strategy("crops", photos, DENOISE, {"noise_sigma": 25}, seed=0)
    assert fixed.make(0).transform == "noise25.0"


def test_tiles_do_not_repeat_within_a_round(photos: list[NamedImage]) -> None:
    s = build_strategy("tiles", photos, DENOISE, {"crop_size": 64, "noise_sigma": None}, seed=0)
    n = len(s._round(0))
    boxes = [(q.source, tuple(q.crop)) for q in (s.make(i) for i in range(n))]
    assert len(set(boxes)) == n
    assert all(c[0] % 64 == 0 and c[1] % 64 == 0 for _, c in boxes)


def _mean_nn_distance(x: torch.Tensor) -> float:
    f = patch_features(x)
    d = torch.cdist(f, f)
    d.fill_diagonal_(float("inf"))
    return float(d.min(dim=1).values.mean())


def test_diversity_strategy_spreads_queries_more_than_random_crops(photos: list[NamedImage]) -> None:
    params = {"crop_size": 32, "noise_sigma": None, "pool": 32}
    div = build_strategy("diversity", photos, DENOISE, params, seed=0)
    rnd = build_strategy("crops", photos, DENOISE, params, seed=0)
    xd = torch.cat([div.make(i).image for i in range(24)])
    xr = torch.cat([rnd.make(i).image for i in range(24)])
    assert _mean_nn_distance(xd) > 1.3 * _mean_nn_distance(xr)


def test_diversity_resumes_from_observed_pairs(photos: list[NamedImage]) -> None:
    params = {"crop_size": 32, "noise_sigma": None}
    a = build_strategy("diversity", photos, DENOISE, params, seed=0)
    first = [a.make(i) for i in range(5)]
    b = build_strategy("diversity", photos, DENOISE, params, seed=0)
    for q in first:
        b.observe(q.index, q.image, None)
    assert torch.equal(a.make(5).image, b.make(5).image)


def test_bad_parameters_are_one_line_errors(photos: list[NamedImage]) -> None:
    with pytest.raises(ConfigError, match="unknown query strategy 'nope'"):
        build_strategy("nope", photos, DENOISE)
    with pytest.raises(ConfigError, match="crop_size"):
        build_strategy("crops", photos, DENOISE, {"crop_size": 0})
    with pytest.raises(ConfigError, match="colour: Extra inputs"):
        build_strategy("crops", photos, DENOISE, {"colour": 3})
    with pytest.raises(ConfigError, match="no image is at least"):
        build_strategy("crops", photos, DENOISE, {"crop_size": 4000})


@pytest.mark.parametrize("name", ["random", "crops", "tiles", "augment", "diversity"])
def test_a_fixed_size_model_gets_exactly_that_size(name: str, photos: list[NamedImage]) -> None:
    fixed = ModelInfo(name="exported", task="style", fixed_size=[48, 80])
    s = build_strategy(name, photos, fixed, None, seed=0)
    for i in range(4):
        q = s.make(i)
        assert q.image.shape[-2:] == (48, 80)
        assert fixed.accepts(48, 80) is None
    assert "only accepted size 80x48" in str(fixed.accepts(64, 64))


@pytest.mark.parametrize("name", ["crops", "augment"])
def test_photos_take_turns_whatever_their_size(name: str) -> None:
    """A big photo does not take every query when crops are nearly as big as the photos (the SR case:
    downscaled photos, crop close to their short side): each photo gets an equal share per round."""
    g = torch.Generator().manual_seed(0)
    sizes = [(130, 400), (126, 126), (140, 140), (128, 200)]
    photos = [NamedImage(f"p{i}", torch.rand(3, h, w, generator=g)) for i, (h, w) in enumerate(sizes)]
    s = build_strategy(name, photos, DENOISE, {"crop_size": 125, "leaves": 0}, seed=1)
    sources = [s.make(i).source for i in range(4 * len(photos))]
    assert all(sources.count(p.name) == 4 for p in photos), sources
    assert sources[:4] != sources[4:8] or sources[4:8] != sources[8:12]  # a new seeded order each round


def test_zoom_shrinks_the_photo_before_the_crop_and_keeps_the_crop_size(photos: list[NamedImage]) -> None:
    """``zoom`` cuts the same-size crop from a shrunk photo (more of the photo in each query), draws the
    factor from the query's own seed (a restart regenerates it) and never shrinks a photo below one crop."""
    info = ModelInfo(name="style", task="style", scale=1)
    plain = build_strategy("crops", photos, info, {"crop_size": 48}, seed=1)
    zoom = build_strategy("crops", photos, info, {"crop_size": 48, "zoom": [0.25, 0.25]}, seed=1)
    again = build_strategy("crops", photos, info, {"crop_size": 48, "zoom": [0.25, 0.25]}, seed=1)
    assert zoom.describe()["zoom"] == [0.25, 0.25]
    assert "zoom" not in plain.describe()  # harvests without zoom describe themselves as before
    for i in range(6):
        q, z = plain.make(i), zoom.make(i)
        assert q.source == z.source
        assert z.image.shape == q.image.shape == (1, 3, 48, 48)
        assert torch.equal(z.image, again.make(i).image)
        src = next(p for p in photos if p.name == z.source).image
        f = max(0.25, 48 / src.shape[-2], 48 / src.shape[-1])
        shrunk = bicubic_resize(src, (max(48, round(src.shape[-2] * f)), max(48, round(src.shape[-1] * f))))
        top, left, h, w = z.crop  # the box lies in the shrunk photo, not the original
        assert torch.equal(z.image, shrunk[..., top : top + h, left : left + w])
    with pytest.raises(ConfigError, match="zoom"):
        build_strategy("crops", photos, info, {"zoom": [0.5, 1.5]})
    with pytest.raises(ConfigError, match="zoom"):
        build_strategy("crops", photos, info, {"zoom": [0.0, 1.0]})


@pytest.mark.parametrize("name", ["crops", "tiles"])
def test_half_the_queries_beyond_the_photos_are_dead_leaves(name: str, photos: list[NamedImage]) -> None:
    """By default the first ``content_queries`` queries are crops as in round 1; of the later ones (the
    photos are used up) every other one, starting with the first, is a dead-leaves composition of the
    photos; the others are the crops they would have been; a restart regenerates the same queries;
    ``leaves=0`` gives round 1's queries throughout."""
    info = ModelInfo(name="style", task="style", scale=1)
    plain = build_strategy(name, photos, info, {"crop_size": 96, "leaves": 0}, seed=2)
    mixed = build_strategy(name, photos, info, {"crop_size": 96}, seed=2)
    n = mixed.content_queries()
    assert n == sum((p.image.shape[-2] // 96) * (p.image.shape[-1] // 96) for p in photos)
    assert mixed.describe()["content_queries"] == n
    assert mixed.describe()["leaves"] == 0.5
    assert "leaves" not in plain.describe()  # harvests without leaves describe themselves as before
    for i in range(n + 6):
        p, m = plain.make(i), mixed.make(i)
        assert p.transform is None
        assert p.source != "dead-leaves"
        if i < n or (i - n) % 2 == 1:
            assert torch.equal(m.image, p.image)
            assert (m.source, m.crop, m.transform) == (p.source, p.crop, None)
            continue
        assert (m.source, m.crop, m.transform) == ("dead-leaves", None, "leaves")
        assert m.image.shape == p.image.shape
        assert float(m.image.min()) >= 0.0
        assert float(m.image.max()) <= 1.0
        assert not torch.equal(m.image, p.image)
        assert torch.equal(m.image, build_strategy(name, photos, info, {"crop_size": 96}, seed=2).make(i).image)
    thirds = build_strategy(name, photos, info, {"crop_size": 96, "leaves": 1 / 3}, seed=2)
    assert sum(thirds.is_leaves(i) for i in range(n, n + 30)) == 10
    assert all(build_strategy(name, photos, info, {"crop_size": 96, "leaves": 1}).is_leaves(i) for i in range(n, n + 5))
    with pytest.raises(ConfigError, match="leaves"):
        build_strategy(name, photos, info, {"leaves": 1.5})
    augment = build_strategy("augment", photos, info, {"crop_size": 96}, seed=2)  # builds its own queries
    assert not any(augment.is_leaves(i) for i in range(n, n + 4))
    assert "leaves" not in augment.describe()


def test_dead_leaves_are_cut_from_the_photos_with_power_law_radii() -> None:
    """Every pixel of a dead-leaves image comes from one of the photos (here: flat colours, so the image
    holds only those colours), small leaves outnumber big ones as ``r^-3`` says, and it is seeded."""
    colours = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]
    flat = [NamedImage(f"c{i}", torch.tensor(c).view(3, 1, 1).expand(3, 40, 60).clone()) for i, c in enumerate(colours)]
    x = dead_leaves(70, 50, flat, random.Random(5))
    assert x.shape == (1, 3, 70, 50)
    assert {tuple(v) for v in x[0].permute(1, 2, 0).reshape(-1, 3).tolist()} <= set(colours)
    assert len({tuple(v) for v in x[0].permute(1, 2, 0).reshape(-1, 3).tolist()}) == 3
    assert torch.equal(x, dead_leaves(70, 50, flat, random.Random(5)))
    r = [power_law_radius(u / 1000, 3.0, 100.0) for u in range(1000)]
    assert min(r) == pytest.approx(3.0)
    assert sum(v < 6 for v in r) > 0.7 * len(r)  # P(r < 2 r_min) = 1 - 1/4 (almost) for alpha = 3
