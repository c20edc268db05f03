"""Shared-region fingerprints: overlapping crops of one photo match through noise, flips, rotations and colour
changes; crops of different photos and disjoint crops of one photo do not; the engine links Sybil keys by them."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch

from defenses.monitor.config import MonitorConfig, SignalParams
from defenses.monitor.engine import MalformedEntryError, MonitorEngine, observation_from_entry
from defenses.monitor.regions import (
    MIN_SHARED,
    SCALES,
    RegionIndex,
    RegionPrint,
    decode_regions,
    encode_regions,
    region_print,
    regions_for_log,
    shared_corners,
    shared_regions,
    transform_points,
)
from translators.corpus import load_images


def _photos() -> list[torch.Tensor]:
    return [im.image for im in load_images("corpus:attacker")]


def _crop(x: torch.Tensor, top: int, left: int, side: int = 64) -> torch.Tensor:
    return x[..., top : top + side, left : left + side]


def _noisy(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


def test_transform_points_follows_numpy_rot90_and_flip() -> None:
    img = np.zeros((5, 7))
    img[1, 5] = 1
    for k in range(4):
        for flip in (False, True):
            t = np.rot90(img, k)
            t = t[:, ::-1] if flip else t
            want = np.argwhere(t == 1)[0]
            got = transform_points(np.array([[1, 5]]), k, flip, (5, 7))[0]
            assert tuple(got) == tuple(want), (k, flip)


def _overlap_rates(sigma: float, pairs: int = 24) -> tuple[float, ...]:
    """Share of pairs of overlapping 64 px crops (shifted by 0-19 px each way) that share a region: both
    scales together (the rule), then each scale of :data:`SCALES` alone."""
    photos = _photos()
    rng = np.random.default_rng(0)
    hits = np.zeros(1 + len(SCALES))
    for t in range(pairs):
        p = photos[t % len(photos)]
        h, w = p.shape[-2:]
        y, x = int(rng.integers(0, h - 90)), int(rng.integers(0, w - 90))
        dy, dx = int(rng.integers(0, 20)), int(rng.integers(0, 20))
        a = region_print(_noisy(_crop(p, y, x), sigma, t))
        b = region_print(_noisy(_crop(p, y + dy, x + dx), sigma, 100 + t))
        per_scale = [shared_corners(ca, cb) for ca, cb in zip(a.scales, b.scales, strict=True)]
        hits += np.array([shared_regions(a, b), *per_scale]) >= MIN_SHARED
    return tuple(float(v) for v in hits / pairs)


def _overlap_rate(sigma: float, pairs: int = 24) -> float:
    return _overlap_rates(sigma, pairs)[0]


def test_overlapping_crops_share_regions_through_noise_and_transforms() -> None:
    photo = _photos()[1]  # motorcycle_left, 500 x 741
    a = _crop(photo, 150, 250)
    b = _crop(photo, 162, 258)  # overlaps a by 52 x 56 px
    ra = region_print(a)
    assert len(ra) >= 20
    assert shared_regions(ra, region_print(b)) >= MIN_SHARED
    rotated = torch.flip(torch.rot90(b, 1, dims=(-2, -1)), dims=(-1,))
    assert shared_regions(ra, region_print(rotated)) >= MIN_SHARED
    graded = (b[:, [2, 0, 1]] * 1.1 - 0.02).clamp(0, 1) ** 0.9  # channel permutation, contrast, gamma
    assert shared_regions(ra, region_print(graded)) >= MIN_SHARED
    # many pairs: clean crops nearly always match; a denoising API's query noise (sigma 0.1 on each copy)
    # halves that (measured 0.88 and 0.58), which a thief's many overlapping pairs make up for
    assert _overlap_rate(0.0) >= 0.85
    assert _overlap_rate(0.1) >= 0.4


def test_the_coarse_scale_finds_noisy_overlaps_the_fine_scale_misses() -> None:
    """At a denoising API's query noise (sigma 0.15 on each copy), the coarse scale (2 px blur) matches
    overlapping crops the fine one (1.2 px) loses to the noise (measured over 48 pairs: fine 0.31, coarse
    0.46, both 0.46); without noise the fine scale does at least as well as the coarse one."""
    both, fine, coarse = _overlap_rates(0.15, pairs=48)
    assert coarse >= fine + 0.05
    assert both >= max(fine, coarse)
    both, fine, coarse = _overlap_rates(0.0, pairs=24)
    assert fine >= coarse
    assert both >= 0.85


def test_distinct_photos_and_disjoint_crops_do_not_share_regions() -> None:
    """The null: queries that share no pixels. Every pair of 64 px crops from different photos (and disjoint
    crops of one photo) scores below MIN_SHARED. (The two motorcycle photos are a stereo pair of one scene:
    they do share regions, rightly, so one of them is left out.)"""
    photos = [im.image for im in load_images("corpus:attacker") if im.name != "motorcycle_right"]
    prints = []
    for i, p in enumerate(photos):
        h, w = p.shape[-2:]
        for top, left in ((0, 0), (h // 2, w // 2), (h - 64, w - 64)):
            prints.append((i, region_print(_noisy(_crop(p, top, left), 0.05, i))))
    worst = max(shared_regions(a, b) for (_, a), (_, b) in itertools.combinations(prints, 2))
    assert worst < MIN_SHARED


def test_log_form_round_trips_and_rejects_garbage() -> None:
    x = _crop(_photos()[0], 100, 100)
    rp = region_print(x)
    back = decode_regions(regions_for_log(x))
    assert back.size == rp.size
    assert len(back.scales) == len(rp.scales) == len(SCALES)
    for b, c in zip(back.scales, rp.scales, strict=True):
        assert np.array_equal(b.points, c.points)
        assert np.abs(b.desc - c.desc).max() < 0.02
        assert shared_corners(c, b) >= len(c) - 1
    # a one-scale log form (written before the coarse scale) still decodes, and matches at its scale
    old = decode_regions(encode_regions(RegionPrint(rp.scales[:1])))
    assert len(old.scales) == 1
    assert shared_regions(rp, old) >= len(rp.scales[0]) - 1
    three = encode_regions(RegionPrint(rp.scales + rp.scales[:1]))
    for bad, why in (("AAAA", "too short"), ("not base64!", "base64|Non-base64|Incorrect padding"),
                     (encode_regions(rp)[:-8], "bytes"), (three, "after its 2 scale")):
        with pytest.raises(ValueError, match=why):
            decode_regions(bad)
    with pytest.raises(MalformedEntryError):
        observation_from_entry({"client": "a", "ts": 1.0, "status": 200, "regions": "AAAA"})
    flat = region_print(torch.full((3, 64, 64), 0.5))
    assert len(flat) == 0
    assert decode_regions(encode_regions(flat)).size == (64, 64)


def test_index_finds_the_owner_of_an_overlapping_crop_only() -> None:
    photos = _photos()
    idx = RegionIndex(capacity=16)
    idx.add("thief-1", region_print(_crop(photos[1], 200, 300)))
    idx.add("customer", region_print(_crop(photos[3], 100, 100)))
    assert idx.matches("thief-2", region_print(_noisy(_crop(photos[1], 220, 315), 0.05, 1))) == ["thief-1"]
    assert idx.matches("thief-1", region_print(_crop(photos[1], 220, 315))) == []  # its own queries
    assert idx.matches("x", region_print(_crop(photos[2], 10, 10))) == []


def _obs(client: str, x: torch.Tensor, i: int) -> dict:
    from defenses.monitor.embedding import embed_for_log

    return {"client": client, "tier": "free", "ts": float(i), "status": 200, "input_sha256": f"{client}{i}",
            "embedding": embed_for_log(x), "regions": regions_for_log(x)}


def _two_key_stream(n: int, key_of: Callable[[int], str]) -> list[tuple[str, torch.Tensor]]:
    """``n`` crops of one part of one photo (they overlap often), query ``i`` sent by key ``key_of(i)``."""
    photo = _photos()[1]
    rng = np.random.default_rng(0)
    stream = []
    for i in range(n):
        top, left = int(rng.integers(150, 260)), int(rng.integers(250, 380))
        stream.append((key_of(i), _crop(photo, top, left)))
    return stream


def _engine_after(stream: list[tuple[str, torch.Tensor]], params: SignalParams) -> MonitorEngine:
    eng = MonitorEngine(MonitorConfig(signals=params), {"free": 1.0})
    for i, (c, x) in enumerate(stream):
        eng.process(observation_from_entry(_obs(c, x, i), (1, i)))
    return eng


def test_engine_links_keys_that_send_overlapping_crops() -> None:
    """Two keys taking turns over crops of one photo are linked by shared regions, under one shared region
    and under the default rule (two); with region linking off (``region_shared = 0``) the same stream is
    not."""
    stream = _two_key_stream(12, lambda i: f"k{i % 2}")
    assert SignalParams().region_shared == 2
    for shared, want in ((1, True), (2, True), (0, False)):
        eng = _engine_after(stream, SignalParams(region_shared=shared))
        assert ("k1" in eng.clients["k0"].linked_keys(eng.config.signals)) is want
        assert (eng.clients["k0"].signals.get("region", 0.0) == 1.0) is want


def test_linked_keys_are_scored_as_one_history() -> None:
    """``observe`` with a pool measures a key's query against its linked keys' queries too: a query that
    repeats a partner's source is a reuse hit for this key, and without the pool it is this key's first."""
    from defenses.monitor.embedding import source_embedding
    from defenses.monitor.scoring import ClientState, Observation, observe

    x = _crop(_photos()[0], 100, 100)
    e = source_embedding(x)
    p = SignalParams()
    alone, pooled = ClientState("a"), ClientState("a")
    obs = Observation("a", "free", 1.0, True, "sha", e, (1, 0))
    assert observe(alone, obs, p) is None
    assert observe(pooled, obs, p, pool=e[None]) == pytest.approx(0.0, abs=1e-3)
    assert pooled.reuse_flags == [1]
    assert len(pooled.embs) == 1  # the pool is not copied into the key's own history


def test_a_new_link_rescores_the_queries_sent_before_it() -> None:
    """When two keys become linked, each key's earlier queries are scored again against the pooled history
    (``rescan``): queries that repeat a partner's sources become reuse hits, which they were not when they
    arrived alone. With ``rescan_on_link = False`` only the queries after the link see the pool."""
    from defenses.monitor.scoring import ClientState, rescan

    g = np.random.default_rng(3)
    own = g.normal(size=(3, 80)).astype(np.float32)
    own /= np.linalg.norm(own, axis=1, keepdims=True)
    state = ClientState("a", embs=own, reuse_flags=[0, 0], knn_flags=[], knn_values=[])
    p = SignalParams(k=1)
    rescan(state, p, pool=own + 0.001)  # a partner key that sent the same three sources
    assert state.reuse_flags == [1, 1, 1]
    assert len(state.knn_flags) == 3
    assert state.knn_flags == [1, 1, 1]  # k = 1: the nearest pooled query is the partner's copy
    before = list(state.reuse_flags)
    rescan(state, p, pool=None)  # no partner: nothing to rescore
    assert state.reuse_flags == before

    # k0 sends its 8 crops first, then k1 8 more of the same part of the photo: k0 sends nothing after the
    # link, so without the rescan its queries are never compared with k1's
    stream = _two_key_stream(16, lambda i: f"k{i // 8}")
    flags = {}
    for on in (True, False):
        eng = _engine_after(stream, SignalParams(rescan_on_link=on))
        k0 = eng.clients["k0"]
        assert "k1" in k0.linked_keys(eng.config.signals)
        flags[on] = (list(k0.reuse_flags), list(k0.knn_flags))
    assert len(flags[True][0]) == 8  # every query scored, the first one too
    assert len(flags[False][0]) == 7
    assert sum(flags[True][1]) > sum(flags[False][1])
