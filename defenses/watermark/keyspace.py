"""Where the ownership key lives, and how the test reads a filter there.

A key is a filter ``k (3, F)``: output channel ``c`` adds ``sum_f k[c, f] * phi_f(x)`` for the carrier's ``F``
feature maps ``phi`` (:mod:`defenses.watermark.carriers`). The test (``OwnershipTest``) estimates the
filter ``u (3, F)`` a suspect adds, maps both to *test coordinates* with :meth:`KeySpace.coords`, and takes
the cosine there. The p-value is exact when the key's test coordinates are a standard Gaussian on a
``dim``-dimensional subspace, whatever linear map ``coords`` is, as long as the map does not depend on the
key (docs/defenses.md, "The test and its null"). Two colour subspaces:

- ``rgb``: every grey-free colour filter (:func:`grey_free`), ``dim = 3 F - F / 3``; ``coords`` is the
  projection itself. The key's energy goes mostly to chroma, which JPEG's chroma subsampling removes.
- ``luma``: the same filter ``v (F,)`` on every output channel, so the mark adds grey (luminance only),
  which JPEG keeps (docs/defenses.md, "Surviving JPEG"); ``dim = F``. ``whiten = gamma`` draws
  ``v = M^{-1/2} kappa`` with ``kappa ~ N(0, I_F)`` and ``M = G0^gamma`` for ``G0`` the features' Gram on a
  fixed reference (:func:`reference_gram`), and reads ``coords(u) = M^{1/2} mean_c u[c]``
  (:func:`grey_reading`). The test weighs
  directions by how much picture energy they carry (``gamma = 1``: fully whitened, i.e. pixel-space
  correlation; ``gamma = 0``: plain parameter-space cosine).
- ``split``: both at once, in orthogonal parts (at every pixel a chroma mark, whose R, G, B sum to zero,
  is orthogonal to a grey one). The *chroma* part: filters whose rows sum to zero, grey-free, on the ring
  orbits within :data:`CHROMA_RADIUS` only (the 5x5 ring every thief learns, :func:`chroma_basis`); the
  *luma* part as above on all orbits of ``radius``. Each part is tested on its own (exact)
  and the test reports ``p = min(1, 2 min(p_chroma, p_luma))`` (Bonferroni: valid whatever the parts'
  dependence). The chroma part catches thieves that copy fine detail; the luma part survives JPEG.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Literal

import numpy as np
import torch

from defenses.watermark.carriers import features, n_features, ring_kernels

#: The key's colour subspace (see the module docstring).
Colour = Literal["rgb", "luma", "split"]

#: ``split``: the chroma part's ring radius (the orbits of the 5x5 window).
CHROMA_RADIUS = 2


def grey_reading(u: torch.Tensor) -> torch.Tensor:
    """The grey component of a filter ``u (3, F)``: the mean of its rows, ``(F,)`` (for a grey filter, whose
    three rows are equal, the row). Weighing R, G, B by JPEG's luminance weights (0.299, 0.587, 0.114)
    instead was measured worse on the same thieves (docs/defenses.md, "Surviving JPEG")."""
    return u.mean(0)


#: The reference for :func:`reference_gram`: coloured 1/f noise fields (the average power spectrum of natural
#: photos, van der Schaaf & van Hateren 1996), channels correlated at this coefficient.
REFERENCE_FIELDS = 8
REFERENCE_SIDE = 128
REFERENCE_CHANNEL_CORR = 0.9


def grey_free(u: torch.Tensor) -> torch.Tensor:
    """Project a filter ``u (3, 3 * n)`` off the "same filter on every channel" subspace.

    For each feature ``o``, the mean over ``c`` of the diagonal entries ``u[c, c*n + o]`` is subtracted from
    them. That subspace (a grey-level blur or sharpening) is where an innocent surrogate's own errors
    concentrate; the key lives in the orthogonal complement, and the test looks only there.
    """
    n = u.shape[1] // 3
    v = u.reshape(3, 3, n).clone()
    mean = torch.stack([v[c, c] for c in range(3)]).mean(0)
    for c in range(3):
        v[c, c] -= mean
    return v.reshape(3, 3 * n)


def reference_fields() -> torch.Tensor:
    """``(REFERENCE_FIELDS, 3, S, S)`` float64 in [0, 1]: fixed coloured 1/f noise (numpy's legacy
    ``RandomState(0)``, whose stream never changes), mean 0.5, standard deviation 0.2."""
    rs = np.random.RandomState(0)
    n = REFERENCE_SIDE
    fy, fx = np.fft.fftfreq(n)[:, None], np.fft.rfftfreq(n)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / n)
    rho = REFERENCE_CHANNEL_CORR

    def noise() -> np.ndarray:
        return (rs.standard_normal(amp.shape) + 1j * rs.standard_normal(amp.shape)) * amp

    out = []
    for _ in range(REFERENCE_FIELDS):
        common = noise()
        chans = [np.fft.irfft2(np.sqrt(rho) * common + np.sqrt(1 - rho) * noise(), s=(n, n)) for _ in range(3)]
        x = np.stack(chans)
        out.append(np.clip((x - x.mean()) / x.std() * 0.2 + 0.5, 0.0, 1.0))
    return torch.from_numpy(np.stack(out))


@lru_cache(maxsize=16)
def chroma_basis(radius: int) -> torch.Tensor:
    """Orthonormal columns ``(3 F, d)`` (float64; ``F = 3 * n_orbits(radius)``) spanning the ``split`` key's
    chroma part: filters ``u (3, F)`` whose rows sum to zero (no grey component), grey-free
    (:func:`grey_free`), using only the orbits within :data:`CHROMA_RADIUS` (``d = 25``)."""
    n = ring_kernels(radius).shape[0]
    keep = ring_kernels(min(radius, CHROMA_RADIUS)).shape[0]
    f = 3 * n
    rows = []
    for j in range(f):  # every column sums to zero over the output channels
        a = torch.zeros(3, f, dtype=torch.float64)
        a[:, j] = 1.0
        rows.append(a.flatten())
    for o in range(n):  # grey-free: the diagonal entries of each orbit sum to zero
        a = torch.zeros(3, f, dtype=torch.float64)
        for c in range(3):
            a[c, c * n + o] = 1.0
        rows.append(a.flatten())
    for c in range(3):  # no orbit beyond the chroma radius
        for cp in range(3):
            for o in range(keep, n):
                a = torch.zeros(3, f, dtype=torch.float64)
                a[c, cp * n + o] = 1.0
                rows.append(a.flatten())
    _, sv, vh = torch.linalg.svd(torch.stack(rows), full_matrices=True)
    rank = int((sv > 1e-9).sum())
    return vh[rank:].T.contiguous()


@lru_cache(maxsize=16)
def reference_gram(radius: int, carrier: str = "ring", scales: tuple[int, ...] = (1,)) -> torch.Tensor:
    """``G0 (F, F)`` float64: the carrier's feature Gram on :func:`reference_fields`, scaled to trace ``F``.
    A constant of the method (no data, no download)."""
    phi = features(reference_fields(), radius, carrier, scales)  # (N, F, H, W)
    flat = phi.transpose(0, 1).flatten(1)
    g = flat @ flat.T
    return g * (g.shape[0] / torch.trace(g))


@dataclass(frozen=True)
class KeySpace:
    """The key's subspace and test coordinates for one carrier (``radius``, ``carrier``, ``scales``),
    ``colour`` and ``whiten`` (``gamma`` in [0, 1], ``luma`` and ``split`` only)."""

    radius: int
    carrier: str = "ring"
    scales: tuple[int, ...] = (1,)
    colour: str = "rgb"
    whiten: float = 0.0

    def __post_init__(self) -> None:
        if self.colour not in ("rgb", "luma", "split"):
            raise ValueError(f"colour must be rgb, luma or split, got {self.colour!r}")
        if self.whiten and self.colour == "rgb":
            raise ValueError("whiten applies to colour=luma or colour=split only")
        if self.colour == "split" and (self.carrier != "ring" or tuple(self.scales) != (1,) or self.radius < 2):
            raise ValueError("colour=split needs the ring carrier at scale 1 and radius >= 2")

    @property
    def parts(self) -> tuple[str, ...]:
        """The separately tested parts: ``("rgb",)``, ``("luma",)`` or ``("chroma", "luma")``."""
        return ("chroma", "luma") if self.colour == "split" else (self.colour,)

    @property
    def n_feat(self) -> int:
        """``F``: feature maps per output channel."""
        return n_features(self.radius, self.carrier, self.scales)

    def dim(self, part: str | None = None) -> int:
        """Dimension ``d`` of a part's subspace (default: the first part): ``3 F - F / 3`` (``rgb``), ``F``
        (``luma``), 25 (``chroma``)."""
        part = part or self.parts[0]
        f = self.n_feat
        if part == "chroma":
            return int(chroma_basis(self.radius).shape[1])
        return f if part == "luma" else 3 * f - f // 3

    @cached_property
    def _metric(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M^{1/2}, M^{-1/2})`` for ``M = G0^whiten`` (identity when ``whiten = 0``)."""
        f = self.n_feat
        if not self.whiten:
            eye = torch.eye(f, dtype=torch.float64)
            return eye, eye
        ev, vec = torch.linalg.eigh(reference_gram(self.radius, self.carrier, self.scales))
        ev = ev.clamp_min(1e-12 * float(ev.max()))
        return (vec * ev.pow(self.whiten / 2)) @ vec.T, (vec * ev.pow(-self.whiten / 2)) @ vec.T

    def draw(self, g: torch.Generator) -> torch.Tensor:
        """A key ``(3, F)`` float64 whose test coordinates in every part are a standard Gaussian on that
        part's subspace (``split``: the chroma part plus the luma part; :func:`split_key` separates them)."""
        f = self.n_feat
        if self.colour == "rgb":
            return grey_free(torch.randn(3, f, generator=g, dtype=torch.float64))
        key = torch.zeros(3, f, dtype=torch.float64)
        if self.colour == "split":
            basis = chroma_basis(self.radius)
            key += (basis @ torch.randn(basis.shape[1], generator=g, dtype=torch.float64)).reshape(3, f)
        v = self._metric[1] @ torch.randn(f, generator=g, dtype=torch.float64)
        return key + v.unsqueeze(0).repeat(3, 1)

    def basis(self, part: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """An orthonormal basis of a part's key subspace, as ``(B, filters)``: ``B (D, d)`` orthonormal columns
        in test coordinates (``D`` = :meth:`coords`' length, ``d`` = :meth:`dim`) and ``filters (d, 3, F)``
        with ``coords(filters[i]) = B[:, i]``. Every key's test coordinates are ``B kappa`` with ``kappa`` a
        standard Gaussian on ``R^d`` (:meth:`draw`), so ``B^T coords(key)`` is that ``kappa``."""
        part = part or self.parts[0]
        f = self.n_feat
        if part == "luma":
            inv = self._metric[1]
            return torch.eye(f, dtype=torch.float64), inv.T.unsqueeze(1).repeat(1, 3, 1).contiguous()
        if part == "chroma":
            cb = chroma_basis(self.radius)
            return torch.eye(cb.shape[1], dtype=torch.float64), cb.T.reshape(-1, 3, f).contiguous()
        eye = torch.eye(3 * f, dtype=torch.float64)
        proj = torch.stack([grey_free(e.reshape(3, f)).flatten() for e in eye], 1)  # the grey-free projection
        ev, vec = torch.linalg.eigh(proj)
        b = vec[:, ev > 0.5].contiguous()
        return b, b.T.reshape(-1, 3, f).contiguous()

    def coords(self, u: torch.Tensor, part: str | None = None) -> torch.Tensor:
        """Test coordinates of a filter ``u (3, F)`` in one part (default: the first): ``(3 F,)`` for ``rgb``
        (the grey-free projection, which spans ``dim`` dimensions), ``(F,)`` for ``luma``, ``(25,)`` for
        ``chroma``."""
        part = part or self.parts[0]
        u = u.double()
        if part == "luma":
            return self._metric[0] @ grey_reading(u)
        if part == "chroma":  # orthogonal to every grey filter: the luma mark reads 0
            return chroma_basis(self.radius).T @ u.flatten()
        return grey_free(u).flatten()


def split_key(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``key (3, F)`` -> ``(chroma part, luma part)``: the luma part is the key's grey component
    (:func:`grey_reading` on every channel), the chroma part the rest (rows summing to zero). The two marks
    are orthogonal at every pixel."""
    luma = grey_reading(key).expand_as(key).clone()
    return key - luma, luma
