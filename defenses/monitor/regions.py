"""Shared-region fingerprints: do two queries show the same pixels of one photo (overlapping crops)?

Why: the source descriptor (:mod:`defenses.monitor.embedding`) is a bag of statistics of the whole query;
two 64 px crops of one 500 px photo are as far apart in it as two different photos (docs/monitor.md), so
Sybil keys fed with crops of one photo pool are not linked by it. Yet crops of a small pool overlap: in the
attacker strategies' own crop geometry, at 40 queries over 4 keys almost every key has a crop that covers
at least a quarter of a crop of another key (``bench/sybil_linking.py``). Overlapping crops share *pixels*,
and that is what this module detects, with a geometric check that different photos practically never pass.

Fingerprint (:func:`region_print`) of a query ``(3, H, W)`` in [0, 1]: one set of corners per blur scale of
:data:`SCALES`, each computed as follows.

* intensity = mean of the three channels (unchanged by a channel permutation), Gaussian-blurred by the
  scale (1.2 px keeps the corners of small clean crops, such as a super-resolution API's queries; 2.0 px
  averages down the query noise of a denoising API, sigma up to 0.2, that hides many of them at 1.2 px);
* corners: Harris & Stephens (1988) response ``det(M) - 0.05 tr(M)^2`` of the structure tensor ``M``
  (smoothed over :data:`TENSOR` px), local maxima over 3x3 above 1e-3 of the image's largest response, at
  least :data:`RADIUS` px from the border; the :data:`KEYPOINTS` strongest;
* descriptor per corner: the blurred intensity on a 7x7 grid of step 2 px around it, minus its mean,
  unit norm (so brightness and contrast changes do not matter), stored as int8.

Match (:func:`shared_corners` at each scale; :func:`shared_regions` takes the larger count of the scales):
for each of the 8 flips/rotations of one print, corners whose descriptors are mutual nearest neighbours
with cosine > :data:`MATCH_COS`, and pass Lowe's (2004) ratio test
(:data:`RATIO`: rejects corners of repeated patterns), vote for the translation between the two queries;
the count of the largest group of votes within :data:`OFFSET_TOL` px is the number of shared corners. Two
queries share a region when at least :data:`MIN_SHARED` corners agree on one rigid placement: a chance
match needs several unrelated descriptors to agree on one of ~10^4 translations. Calibrated on queries
that share no pixels only (``bench/sybil_linking.py`` reports that null, both scales together).

Not seen: crops rescaled between queries (scale changes move corners and descriptors), strong blur or
JPEG of one copy, crops that never overlap (the ``tiles`` strategy; whole distinct photos), and the parts
of inputs larger than :data:`WINDOW` px outside their central window. Corner positions are in the
window's pixels. Cost: a few Gaussian filters of (at most) the window per scale, a few milliseconds per query
on one core (``bench/monitor.py``); the log form is at most about 3.4 kB of base64 per scale.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi

SCALES = (1.2, 2.0)
"""Gaussian sigmas (px) of the intensity before corners and descriptors: one set of corners per scale.
Two queries are compared scale by scale (a noisy copy's fine corners never meet a clean copy's coarse ones).
A log form written with fewer scales (before the coarse scale existed) holds the first ones."""
TENSOR = 1.0
"""Gaussian sigma (px) of the structure-tensor smoothing."""
RADIUS = 6
"""Descriptor half-width (px): the 7x7 grid spans ``[-RADIUS, RADIUS]`` in steps of 2."""
KEYPOINTS = 48
WINDOW = 256
"""Inputs larger than ``WINDOW`` px a side are fingerprinted on their central ``WINDOW`` x ``WINDOW`` window
(bounded cost and log size; two large overlapping crops still share most of their centres)."""
MATCH_COS = 0.9
"""Least cosine between two corner descriptors that may match."""
RATIO = 0.8
"""Lowe's ratio: the nearest descriptor's distance must be below this times the second nearest's."""
OFFSET_TOL = 1.5
"""Corner pairs whose translations differ by at most this (px, Chebyshev) vote for one placement."""
MIN_SHARED = 5
"""Corner pairs agreeing on one placement that make two queries share a region (calibrated on the null of
``bench/sybil_linking.py``: pairs of queries that share no pixels; 4 let through five times as many chance
matches, mostly between photos of repeated round structures)."""
_GRID = np.arange(-RADIUS, RADIUS + 1, 2)
DESC_DIM = len(_GRID) ** 2
_HEADER = struct.Struct("<BHH")


@dataclass(frozen=True)
class CornerPrint:
    """Corners of one query at one blur scale: ``points (n, 2)`` int (row, col) in its pixels,
    ``desc (n, DESC_DIM)`` float32 unit rows, ``size`` the query's ``(H, W)``."""

    points: np.ndarray
    desc: np.ndarray
    size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.points)


@dataclass(frozen=True)
class RegionPrint:
    """A query's region fingerprint: one :class:`CornerPrint` per entry of :data:`SCALES` (or fewer, when
    decoded from an older log form)."""

    scales: tuple[CornerPrint, ...]

    @property
    def size(self) -> tuple[int, int]:
        return self.scales[0].size

    def __len__(self) -> int:
        """The most corners at any scale (a print with fewer than :data:`MIN_SHARED` can match nothing)."""
        return max(len(c) for c in self.scales)


def _dihedral() -> list[tuple[int, bool, np.ndarray]]:
    """The 8 (rot90 count, flip) pairs and the permutation of the descriptor grid each one applies."""
    g = len(_GRID)
    idx = np.arange(g * g).reshape(g, g)
    out = []
    for k in range(4):
        for flip in (False, True):
            t = np.rot90(idx, k)
            out.append((k, flip, (t[:, ::-1] if flip else t).ravel().copy()))
    return out


DIHEDRAL = _dihedral()


def transform_points(points: np.ndarray, k: int, flip: bool, size: tuple[int, int]) -> np.ndarray:
    """Where ``points (n, 2)`` (row, col) of an image of ``size`` land after ``np.rot90(., k)`` and then a
    left-right flip (the same order as :data:`DIHEDRAL`'s descriptor permutations). Float ``(n, 2)``."""
    y, x = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    h, w = size
    for _ in range(k):  # np.rot90: new[i, j] = old[j, w - 1 - i], so old (y, x) -> (w - 1 - x, y)
        y, x = w - 1 - x, y
        h, w = w, h
    if flip:
        x = w - 1 - x
    return np.stack([y, x], 1)


def region_print(image: torch.Tensor) -> RegionPrint:
    """``(1, 3, H, W)`` or ``(3, H, W)`` in [0, 1] -> its :class:`RegionPrint` (see the module doc)."""
    x = image[0] if image.ndim == 4 else image
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected (3, H, W), got {tuple(image.shape)}")
    top, left = max(0, (x.shape[1] - WINDOW) // 2), max(0, (x.shape[2] - WINDOW) // 2)
    x = x[:, top : top + WINDOW, left : left + WINDOW]
    intensity = x.float().clamp(0, 1).mean(0).cpu().numpy().astype(np.float32)
    return RegionPrint(tuple(_corners(ndi.gaussian_filter(intensity, blur)) for blur in SCALES))


def _corners(g: np.ndarray) -> CornerPrint:
    """Harris corners and descriptors of the blurred intensity ``g (H, W)`` (module doc)."""
    h, w = g.shape
    empty = CornerPrint(np.zeros((0, 2), np.int64), np.zeros((0, DESC_DIM), np.float32), (h, w))
    if h <= 2 * RADIUS + 2 or w <= 2 * RADIUS + 2:
        return empty
    gy, gx = np.gradient(g)
    sxx, syy, sxy = (ndi.gaussian_filter(a, TENSOR) for a in (gx * gx, gy * gy, gx * gy))
    resp = sxx * syy - sxy * sxy - 0.05 * (sxx + syy) ** 2
    peak = float(resp.max())
    cand = (resp == ndi.maximum_filter(resp, size=3)) & (resp > max(1e-12, 1e-3 * peak))
    cand[:RADIUS] = cand[-RADIUS:] = False
    cand[:, :RADIUS] = cand[:, -RADIUS:] = False
    ys, xs = np.nonzero(cand)
    if len(ys) == 0:
        return empty
    strongest = np.argsort(-resp[ys, xs], kind="stable")[:KEYPOINTS]
    ys, xs = ys[strongest], xs[strongest]
    patches = g[ys[:, None, None] + _GRID[None, :, None], xs[:, None, None] + _GRID[None, None, :]]
    d = patches.reshape(len(ys), -1)
    d = d - d.mean(1, keepdims=True)
    norm = np.linalg.norm(d, axis=1, keepdims=True)
    keep = norm[:, 0] > 1e-4
    return CornerPrint(np.stack([ys[keep], xs[keep]], 1), (d[keep] / norm[keep]).astype(np.float32), (h, w))


def encode_regions(rp: RegionPrint) -> str:
    """Compact text form for the query log: base64 of one block per scale, each ``n, H, W`` then ``n``
    (row, col) uint16 pairs and ``n x DESC_DIM`` int8 descriptors (``round(127 d)``)."""
    body = b""
    for c in rp.scales:
        h, w = (min(v, 65535) for v in c.size)
        body += (_HEADER.pack(len(c), h, w) + c.points.astype("<u2").tobytes()
                 + np.clip(np.round(c.desc * 127), -127, 127).astype(np.int8).tobytes())
    return base64.b64encode(body).decode()


def decode_regions(s: str) -> RegionPrint:
    """Inverse of :func:`encode_regions` (descriptors re-normalised); ``ValueError`` on anything else. A
    log form with one block (written before :data:`SCALES` had two entries) gives a one-scale print."""
    raw = base64.b64decode(s, validate=True)
    if len(raw) < _HEADER.size:
        raise ValueError("region print too short")
    scales: list[CornerPrint] = []
    at = 0
    while at < len(raw):
        if len(scales) == len(SCALES) or len(raw) - at < _HEADER.size:
            raise ValueError(f"region print has {len(raw) - at} bytes after its {len(scales)} scale(s)")
        n, h, w = _HEADER.unpack_from(raw, at)
        want = _HEADER.size + n * 4 + n * DESC_DIM
        if len(raw) - at < want or n > KEYPOINTS:
            raise ValueError(f"region print has {len(raw) - at} bytes, expected {want} for {n} corners")
        if scales and (h, w) != scales[0].size:
            raise ValueError("region print's scales disagree on the image size")
        pts = np.frombuffer(raw, "<u2", n * 2, at + _HEADER.size).astype(np.int64).reshape(n, 2)
        if n and (pts[:, 0].max() >= h or pts[:, 1].max() >= w):
            raise ValueError("region print has corners outside its image")
        d = np.frombuffer(raw, np.int8, n * DESC_DIM, at + _HEADER.size + n * 4).astype(np.float32)
        d = d.reshape(n, DESC_DIM)
        norm = np.linalg.norm(d, axis=1, keepdims=True)
        if n and float(norm.min()) == 0.0:
            raise ValueError("region print holds an empty descriptor")
        scales.append(CornerPrint(pts, d / np.maximum(norm, 1e-12), (h, w)))
        at += want
    return RegionPrint(tuple(scales))


def regions_for_log(image: torch.Tensor) -> str:
    """:func:`region_print` in the query log's text form (what the translate route stores)."""
    return encode_regions(region_print(image))


def _largest_group(offsets: np.ndarray) -> int:
    """Size of the largest set of ``offsets (m, 2)`` within :data:`OFFSET_TOL` (Chebyshev) of one of them."""
    if len(offsets) == 0:
        return 0
    close = np.abs(offsets[:, None, :] - offsets[None, :, :]).max(2) <= OFFSET_TOL
    return int(close.sum(1).max())


def _distinct(sim: np.ndarray) -> np.ndarray:
    """Lowe's (2004) ratio test per row of ``sim`` (cosines): the nearest descriptor must be clearly nearer
    than the second nearest (distance ratio < :data:`RATIO`), which rejects corners of repeated patterns."""
    if sim.shape[1] < 2:
        return np.ones(sim.shape[0], bool)
    top2 = -np.partition(-sim, 1, axis=1)[:, :2]
    d = np.sqrt(np.maximum(2.0 - 2.0 * top2, 0.0))
    return d[:, 0] < RATIO * d[:, 1]


def shared_regions(a: RegionPrint, b: RegionPrint) -> int:
    """:func:`shared_corners` at each scale both prints have; the larger count. ``>= MIN_SHARED`` = shared."""
    return max(shared_corners(ca, cb) for ca, cb in zip(a.scales, b.scales, strict=False))


def shared_corners(a: CornerPrint, b: CornerPrint) -> int:
    """Corners of ``a`` and ``b`` (one scale) that agree on one placement of ``b`` in ``a`` (a flip/rotation
    and a translation): the largest such count over the 8 transforms (module doc)."""
    if len(a) < MIN_SHARED or len(b) < MIN_SHARED:
        return 0
    best = 0
    rows = np.arange(len(a))
    for k, flip, perm in DIHEDRAL:
        sim = a.desc @ b.desc[:, perm].T
        j = sim.argmax(1)
        ok = (sim.argmax(0)[j] == rows) & (sim[rows, j] > MATCH_COS) & _distinct(sim)
        if int(ok.sum()) <= best or int(ok.sum()) < MIN_SHARED:
            continue
        off = a.points[rows[ok]] - transform_points(b.points[j[ok]], k, flip, b.size)
        best = max(best, _largest_group(off))
    return best


class RegionIndex:
    """The region prints of the last ``capacity`` queries of all clients, searchable for shared regions.

    A ring of ``capacity`` slots of :data:`KEYPOINTS` descriptor rows per scale (unused rows are zero, so
    they never match). :meth:`matches` prefilters, per scale, with one matrix product of the new print's 8
    transformed descriptor sets against every stored corner of that scale (a stored query needs
    ``MIN_SHARED`` of the new print's corners above :data:`MATCH_COS` under one transform at one scale) and
    runs :func:`shared_regions` only on the candidates that pass.
    """

    def __init__(self, capacity: int = 512) -> None:
        self.capacity = capacity
        self.desc = np.zeros((len(SCALES), capacity * KEYPOINTS, DESC_DIM), np.float32)
        self.slots: list[tuple[str, RegionPrint] | None] = [None] * capacity
        self.n = 0

    def matches(self, client: str, rp: RegionPrint) -> list[str]:
        """Other clients with a recent query that shares a region with ``rp`` (each named once)."""
        if len(rp) < MIN_SHARED or self.n == 0:
            return []
        used = min(self.n, self.capacity)
        votes = np.zeros(used, np.int64)
        for s, c in enumerate(rp.scales[: len(SCALES)]):
            if len(c) < MIN_SHARED:
                continue
            variants = np.concatenate([c.desc[:, perm] for _, _, perm in DIHEDRAL])  # (8 n, DESC_DIM)
            hits = variants @ self.desc[s, : used * KEYPOINTS].T > MATCH_COS
            # per stored query: own corners with a match, best transform, best scale
            votes = np.maximum(votes, hits.reshape(8, len(c), used, KEYPOINTS).any(3).sum(1).max(0))
        out: set[str] = set()
        for i in np.flatnonzero(votes >= MIN_SHARED):
            slot = self.slots[int(i)]
            if slot is None:
                continue
            owner, other = slot
            if owner != client and owner not in out and shared_regions(rp, other) >= MIN_SHARED:
                out.add(owner)
        return sorted(out)

    def add(self, client: str, rp: RegionPrint) -> None:
        if len(rp) < MIN_SHARED:
            return
        i = self.n % self.capacity
        rows = self.desc[:, i * KEYPOINTS : (i + 1) * KEYPOINTS]
        rows[:] = 0.0
        for s, c in enumerate(rp.scales[: len(SCALES)]):
            rows[s, : len(c)] = c.desc
        self.slots[i] = (client, rp)
        self.n += 1
