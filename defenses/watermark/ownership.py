"""Ownership watermark: a keyed, content-dependent mark that a surrogate trained on our outputs learns.

The mark (Heist's own design; docs/defenses.md, "Ownership watermark") adds to the clean output ``y``
``(N, 3, sH, sW)`` a keyed linear filter of the request's input ``x`` (bicubic-resized to the output's
size; ``source = "output"`` filters ``y`` instead):

    w_k(x)[c] = sum_{c', o} k[c, c', o] * R_o(x[c'])          mark = clamp(y + g * w_k(x))

``R_o`` are ring differences: ``R_o(x)(p) = mean_{t in orbit o} x(p + t) - x(p)`` over the orbits ``o`` of
the 8 dihedral symmetries acting on the offsets ``t`` of a ``(2r+1)^2`` window (radius ``r``). Each ``R_o``
is zero-mean (no colour shift) and commutes with flips and 90-degree rotations, so a thief's dihedral
augmentation maps the mark onto itself instead of averaging it away (the known break of fixed-pattern
and oriented marks). Because the mark is a function of content, a convolutional surrogate trained on
random crops learns it as part of the translation (a linear filter of its own input is the easiest
thing a CNN learns). The key ``k (3, 3 * n_orbits)`` is a standard Gaussian on the *grey-free* subspace
(:func:`grey_free`: no "same filter on every channel" component, where innocent surrogates' own blur
and sharpening errors live), drawn from the server secret and ``key_id``. The gain
``g = min(gain, amplitude / rms(w_k))`` keeps every output's mark at RMS ``amplitude = 10^(-psnr/20)``
or less (honest-user PSNR >= ``psnr`` before 8-bit rounding).

The test (:class:`OwnershipTest`) regresses the suspect's residual ``r = suspect(x) - clean_victim(x)`` on
the feature responses ``Phi`` of the probes: ``u = grey_free((Phi^T Phi)^{-1} Phi^T r)`` estimates the
filter the suspect adds to our clean outputs, and the statistic is the cosine

    t = <k, u> / (|k| |u|)        p = P(T >= t),  T^2 ~ Beta(1/2, (d - 1)/2)  (sign of T symmetric)

with ``d`` the dimension of the key's (grey-free) subspace (:func:`cosine_sf`).

Exactness: if the key ``k`` is independent of ``(r, Phi)`` -- the suspect, the probes and the clean
victim were never influenced by outputs marked with ``k`` -- then ``u`` is a fixed vector of the key's
subspace and ``k``, a standard Gaussian on that subspace, has a direction uniform on its unit sphere,
independent of ``|k|``. The cosine between a fixed vector and a uniform direction in ``d`` dimensions has
exactly the law above, whatever the suspect does (however its residual correlates with high-pass
filters), with one probe or many. Under H1 the surrogate reproduces ``w_k``, ``u`` points along ``k`` and
``t`` approaches 1, where ``p`` vanishes for every key.

The first version of the test used ``z = <k, u> / |u|`` (exactly N(0, 1) under H0, and still reported):
its largest value is ``|k|``, a chi variable with ``d`` degrees of freedom, so the strongest evidence
against a perfect copy depended on the luck of the key draw (``|k|`` = 4.98 for one service's key, 7.25
for another's: best p 3e-7 against 2e-13). The cosine removes ``|k|`` from the test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from defenses.base import DefenseContext, DefenseParams, OutputDefense, request_rng, request_seed
from defenses.registry import DEFENSE_REGISTRY

#: Offsets smaller than this many pixels from the image border use reflected content.
_PAD_MODE = "reflect"


@lru_cache(maxsize=8)
def ring_kernels(radius: int) -> torch.Tensor:
    """The ``n_orbits`` ring-difference kernels ``(n_orbits, 1, 2r+1, 2r+1)`` (float64, each sums to 0).

    Orbits of the dihedral group D4 on the offsets ``(i, j)``, ``0 < max(|i|, |j|) <= r``: an orbit is the
    set of offsets with the same ``(max(|i|,|j|), min(|i|,|j|))``. Kernel ``o`` = (indicator of the orbit) /
    (orbit size) minus a unit impulse at the centre.
    """
    if radius < 1:
        raise ValueError("radius must be >= 1")
    side = 2 * radius + 1
    orbits: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i in range(-radius, radius + 1):
        for j in range(-radius, radius + 1):
            if i == 0 and j == 0:
                continue
            a, b = abs(i), abs(j)
            orbits.setdefault((max(a, b), min(a, b)), []).append((i, j))
    kernels = []
    for key in sorted(orbits):
        k = torch.zeros(side, side, dtype=torch.float64)
        for i, j in orbits[key]:
            k[i + radius, j + radius] = 1.0 / len(orbits[key])
        k[radius, radius] -= 1.0
        kernels.append(k)
    return torch.stack(kernels).unsqueeze(1)


TONE_FREQS = 4

#: Carriers: ``ring`` (ring differences of radius ``r``) or ``band`` (difference-of-Gaussian octaves
#: modulated by tone functions of the local luminance; see :func:`band_features`).
Carrier = Literal["ring", "band"]

#: ``band`` carrier: the finest octave's Gaussian sigma (pixels) and the luminance tone frequencies.
BAND_SIGMA0 = 1.0
BAND_TONES = 2


def n_features(radius: int, carrier: str = "ring", scales: tuple[int, ...] = (1,)) -> int:
    """Feature maps per image: 3 input channels x (ring orbits x ``len(scales)``, or 2 * TONE_FREQS at
    ``radius = 0``; for the ``band`` carrier: ``radius`` octaves x (1 + 2 * BAND_TONES) tone functions)."""
    if carrier == "band":
        return 3 * radius * (1 + 2 * BAND_TONES)
    return 3 * (ring_kernels(radius).shape[0] * len(scales) if radius > 0 else 2 * TONE_FREQS)


def key_dim(radius: int, carrier: str = "ring", scales: tuple[int, ...] = (1,)) -> int:
    """Entries of the key: 3 output channels x :func:`n_features`."""
    return 3 * n_features(radius, carrier, scales)


@lru_cache(maxsize=16)
def _gauss1d(sigma: float) -> torch.Tensor:
    half = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(y: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``y (N, C, H, W)``, reflect-padded (replicate where the image is smaller
    than the kernel). Commutes with flips and 90-degree rotations."""
    k = _gauss1d(sigma).to(device=y.device, dtype=y.dtype)
    half = (k.numel() - 1) // 2
    n, c, h, w = y.shape
    mode = _PAD_MODE if min(h, w) > half else "replicate"
    z = F.pad(y.reshape(n * c, 1, h, w), (half, half, half, half), mode=mode)
    z = F.conv2d(z, k.view(1, 1, 1, -1))
    z = F.conv2d(z, k.view(1, 1, -1, 1))
    return z.reshape(n, c, h, w)


def band_features(y: torch.Tensor, octaves: int) -> torch.Tensor:
    """``y (N, 3, H, W)`` -> ``(N, 3 * octaves * (1 + 2 * BAND_TONES), H, W)``: band-pass octaves modulated by
    tone functions of the local luminance.

    Octave ``j``: ``D_j = G_{s_j}(y) - G_{2 s_j}(y)`` with ``s_j = BAND_SIGMA0 * 2^j`` pixels (difference of
    Gaussians, Lowe 2004), a band from ~6 to ~25 px periods at ``j = 0`` -- below JPEG's and an innocent
    surrogate's high-frequency errors. Tones: ``1, cos(2 pi m L), sin(2 pi m L)`` for ``m = 1..BAND_TONES``
    with ``L = G_2(mean over channels of y)`` (content-adaptive sign; multiplies the key's dimension).
    Everything is isotropic, so the features commute with flips and 90-degree rotations. Feature index
    ``c' * n + j * T + t`` (``n`` per channel, ``T`` tones).
    """
    lum = gaussian_blur(y.mean(1, keepdim=True), 2.0)
    tones = [torch.ones_like(lum)]
    for m in range(1, BAND_TONES + 1):
        a = 2 * math.pi * m * lum
        tones += [a.cos(), a.sin()]
    tone = torch.cat(tones, 1)  # (N, T, H, W)
    blurs = [gaussian_blur(y, BAND_SIGMA0 * 2.0**j) for j in range(octaves + 1)]
    feats = []
    for c in range(y.shape[1]):
        for j in range(octaves):
            feats.append((blurs[j][:, c : c + 1] - blurs[j + 1][:, c : c + 1]) * tone)
    return torch.cat(feats, 1)


def features(y: torch.Tensor, radius: int, carrier: str = "ring", scales: tuple[int, ...] = (1,)) -> torch.Tensor:
    """The carrier's feature maps of ``y (N, 3, H, W)`` (``ring``: :func:`ring_features` at every scale of
    ``scales``, index ``(c' * len(scales) + j) * n_orbits + o``; ``band``: :func:`band_features` with ``radius``
    octaves)."""
    if carrier == "band":
        return band_features(y, radius)
    if radius <= 0 or tuple(scales) == (1,):
        return ring_features(y, radius)
    n, c, h, w = y.shape
    per = [ring_features(y, radius, s).reshape(n, c, -1, h, w) for s in scales]
    return torch.stack(per, 2).flatten(1, 3)


def ring_features(y: torch.Tensor, radius: int, scale: int = 1) -> torch.Tensor:
    """``y (N, 3, H, W)`` -> ``(N, 3 * n_orbits, H, W)``: every ring difference of every colour channel.

    ``scale > 1``: the ring at ``scale`` times its size -- offsets dilated by ``scale``, of ``y`` blurred by a
    Gaussian of sigma ``scale / 2`` px first (no aliasing), a band around periods of ``4 * scale`` px that
    JPEG's quantiser and chroma subsampling keep (docs/defenses.md, "Surviving JPEG"). Still commutes with
    flips and 90-degree rotations. Feature index ``c' * n_orbits + o``. Borders are reflect-padded
    (H, W > radius * scale required; replicate otherwise).
    """
    if radius <= 0:
        m = torch.arange(1, TONE_FREQS + 1, device=y.device, dtype=y.dtype).view(1, 1, -1, 1, 1)
        a = 2 * math.pi * m * y.unsqueeze(2)
        return torch.cat([a.sin(), a.cos()], 2).flatten(1, 2)
    ker = ring_kernels(radius).to(device=y.device, dtype=y.dtype)
    if scale > 1:
        y = gaussian_blur(y, 0.5 * scale)
    n, c, h, w = y.shape
    reach = radius * scale
    mode = _PAD_MODE if min(h, w) > reach else "replicate"
    pad = F.pad(y.reshape(n * c, 1, h, w), (reach,) * 4, mode=mode)
    return F.conv2d(pad, ker, dilation=scale).reshape(n, c * ker.shape[0], h, w)


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


def ownership_key(secret: int, key_id: str, radius: int, carrier: str = "ring",
                  scales: tuple[int, ...] = (1,)) -> torch.Tensor:
    """The secret key ``k (3, n_features)`` float64: ``grey_free(g)`` with ``g`` i.i.d. N(0, 1) drawn from
    (server secret, key_id, radius, carrier, scales); ``k`` is then a standard Gaussian on the grey-free
    subspace."""
    parts = (key_id, str(radius)) if carrier == "ring" else (key_id, str(radius), carrier)
    if carrier == "ring" and tuple(scales) != (1,):
        parts += ("scales=" + ",".join(map(str, scales)),)
    g = request_rng(request_seed(secret, "ownership_watermark", *parts))
    return grey_free(torch.randn(3, n_features(radius, carrier, scales), generator=g, dtype=torch.float64))


def mark_signal(y: torch.Tensor, key: torch.Tensor, radius: int, carrier: str = "ring",
                scales: tuple[int, ...] = (1,)) -> torch.Tensor:
    """``w_k(y)``: ``y (N, 3, H, W)`` -> ``(N, 3, H, W)``, the keyed filter response (unscaled)."""
    feats = features(y, radius, carrier, scales)
    return torch.einsum("cf,nfhw->nchw", key.to(device=y.device, dtype=y.dtype), feats)


class OwnershipParams(DefenseParams):
    """``psnr``: bound (dB) on each output's PSNR to the clean one before 8-bit rounding (mark RMS =
    10^(-psnr/20)). ``gain``: the filter's gain on typical photos before the per-image cap (the mark is
    the pure linear filter ``gain * w_k`` where that stays under the bound). ``radius``: ring radius in
    output pixels. ``scales``: the ring's sizes (1 = the ``(2r+1)^2`` window; ``s > 1``: dilated ``s`` times
    on the image blurred by sigma ``s/2``, lower frequencies, which survive JPEG); the key spans all of
    them. ``key_id``: names the key (rotate it to start a new key; verification must use the same id)."""

    psnr: float = Field(40.5, ge=20.0, le=80.0)
    gain: float = Field(0.5, gt=0.0, le=100.0)
    radius: int = Field(2, ge=0, le=8)
    scales: tuple[int, ...] = Field((1,), min_length=1, max_length=4)
    key_id: str = Field("k1", min_length=1, max_length=64)
    source: Literal["output", "input"] = "input"
    carrier: Carrier = "ring"

    @field_validator("scales", mode="before")
    @classmethod
    def _scales_text(cls, v: Any) -> Any:
        """One int (``--defense ownership_watermark:scales=4``) or ``"1+4"`` (several, in a ``--defense`` spec)."""
        if isinstance(v, int):
            return (v,)
        if isinstance(v, str):
            try:
                return tuple(int(a) for a in v.split("+"))
            except ValueError:
                raise ValueError(f"scales {v!r}: write integers joined by '+', e.g. 1+4") from None
        return v

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 1 <= s <= 16 for s in v) or len(set(v)) != len(v):
            raise ValueError("scales must be distinct integers in 1..16")
        return tuple(sorted(v))


@DEFENSE_REGISTRY.register("ownership_watermark")
class OwnershipWatermark(OutputDefense):
    """``y -> clamp(y + g(y) * w_k(y))``, ``(N, 3, H, W) -> (N, 3, H, W)``; ``k`` from ``ctx.secret``."""

    name = "ownership_watermark"
    Params = OwnershipParams
    params: OwnershipParams

    def __init__(self, params: DefenseParams | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._keys: dict[int, torch.Tensor] = {}

    def key(self, secret: int) -> torch.Tensor:
        """The key for ``secret`` (cached per secret)."""
        if secret not in self._keys:
            p = self.params
            self._keys[secret] = ownership_key(secret, p.key_id, p.radius, p.carrier, p.scales)
        return self._keys[secret]

    def apply(self, outputs: torch.Tensor, inputs: torch.Tensor, ctx: DefenseContext) -> torch.Tensor:
        return embed(outputs, self.key(ctx.secret), self.params, inputs)


def feature_source(y: torch.Tensor, x: torch.Tensor | None, source: str) -> torch.Tensor:
    """The image the keyed features are computed on: the clean output ``y``, or the input ``x`` resized
    (bicubic) to the output's size."""
    if source == "output" or x is None:
        return y
    if x.shape[-2:] != y.shape[-2:]:
        x = F.interpolate(x.float(), size=y.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    return x.to(y.dtype)


def embed(y: torch.Tensor, key: torch.Tensor, p: OwnershipParams, x: torch.Tensor | None = None) -> torch.Tensor:
    """Marked outputs for clean ``y (N, 3, H, W)`` in [0, 1] (same shape, dtype, device); ``x`` the inputs."""
    r = p.radius
    if min(y.shape[-2:]) <= max(r, 1):
        return y
    w = mark_signal(feature_source(y, x, p.source).float(), key, r, p.carrier, p.scales)
    amp = 10.0 ** (-p.psnr / 20.0)
    rms = w.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    g = torch.minimum(torch.full_like(rms, p.gain), amp / rms.clamp_min(1e-12))
    return (y.float() + g * w).clamp_(0.0, 1.0).to(y.dtype)


@dataclass
class OwnershipTest:
    """Running sums of the regression of residuals on the carrier's features; :meth:`result` gives the test.

    ``add(clean, suspect)`` takes one probe's clean victim output and the suspect's output, both
    ``(1, 3, H, W)`` in [0, 1] (resized beforehand if the suspect's size differs), and optionally
    ``nuisances``: the clean output after key-independent distortions a thief might apply (e.g. JPEG at a
    few qualities, :data:`evaluation.watermark.NUISANCE_JPEG`). Each nuisance's own filter estimate ``n_i``
    (regressed like the suspect's residual) is projected off the key and off ``u`` before the cosine: a
    thief who re-encoded the harvest learns the codec's systematic error (``n_i``) on top of the mark, and
    that error, not the mark, dominated ``u`` (docs/defenses.md, "Surviving JPEG"). The ``n_i`` depend on
    the probes and the clean victim only, never on the key, so the projected key is still a standard
    Gaussian on a ``d - rank(n)`` dimensional subspace and the null stays exact.
    """

    key: torch.Tensor
    radius: int
    carrier: str = "ring"
    scales: tuple[int, ...] = (1,)
    gram: torch.Tensor = field(init=False)
    cross: torch.Tensor = field(init=False)
    nuisance_cross: list[torch.Tensor] = field(default_factory=list)
    per_probe: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        d = n_features(self.radius, self.carrier, self.scales)
        self.gram = torch.zeros(d, d, dtype=torch.float64)
        self.cross = torch.zeros(d, 3, dtype=torch.float64)

    def add(
        self, clean: torch.Tensor, suspect: torch.Tensor, name: str = "", basis: torch.Tensor | None = None,
        nuisances: Sequence[torch.Tensor] = (),
    ) -> None:
        phi = features((clean if basis is None else basis).double(), self.radius, self.carrier, self.scales)
        phi_m = phi.flatten(2)[0]  # (F, P)
        res = (suspect.double() - clean.double())  # (1, 3, H, W)
        g = phi_m @ phi_m.T
        c = phi_m @ res.flatten(2)[0].T  # (F, 3)
        self.gram += g
        self.cross += c
        if not self.nuisance_cross:
            self.nuisance_cross = [torch.zeros_like(self.cross) for _ in nuisances]
        if len(nuisances) != len(self.nuisance_cross):
            raise ValueError("every probe needs the same nuisances")
        for acc, n in zip(self.nuisance_cross, nuisances, strict=True):
            acc += phi_m @ (n.double() - clean.double()).flatten(2)[0].T
        z = _z(self.key, g, c)
        self.per_probe.append({"probe": name, "z": z, "residual_rms": float(res.pow(2).mean().sqrt()),
                               "pixels": int(phi_m.shape[1])})

    def z_for(self, key: torch.Tensor) -> float:
        """``<k, u> / |u|`` for another key on the same probes (for calibration checks; no nuisances)."""
        return _z(key, self.gram, self.cross)

    @property
    def key_dim(self) -> int:
        """Dimension ``d`` of the key's grey-free subspace: ``9 n - n`` for ``n`` features per channel."""
        return int(self.key.numel() - self.key.shape[1] // 3)

    def nuisance_basis(self) -> torch.Tensor:
        """Orthonormal columns ``(3 F, m)`` spanning the nuisances' grey-free filter estimates (``m`` = their
        numerical rank; ``(3 F, 0)`` without nuisances)."""
        cols = [_estimate(self.gram, c).flatten() for c in self.nuisance_cross]
        if not cols:
            return torch.zeros(self.key.numel(), 0, dtype=torch.float64)
        q, r = torch.linalg.qr(torch.stack(cols, 1))
        keep = r.diagonal().abs() > 1e-9 * float(r.diagonal().abs().max().clamp_min(1e-300))
        return q[:, keep]

    def result(self, key: torch.Tensor | None = None) -> dict[str, Any]:
        """The test's statistics for ``self.key`` (or another ``key`` of the same shape, for calibration
        checks over many keys on the same probes)."""
        basis = self.nuisance_basis()

        def off(v: torch.Tensor) -> torch.Tensor:
            f = v.flatten()
            return (f - basis @ (basis.T @ f)).reshape(v.shape)

        key, u = off(self.key if key is None else key), off(_estimate(self.gram, self.cross))
        dim = self.key_dim - basis.shape[1]
        k2 = float(key.pow(2).sum())
        norm = float(u.norm())
        z = float((key * u).sum()) / norm if norm > 0.0 and math.isfinite(norm) else 0.0
        cosine = z / math.sqrt(k2)
        alpha = float((key * u).sum()) / k2
        return {"statistic": "cosine", "cosine": cosine, "p_value": cosine_sf(cosine, dim),
                "z": z, "probes": len(self.per_probe), "key_dim": dim, "max_z": math.sqrt(k2),
                "nuisance_dims": int(basis.shape[1]),
                # diagnostics (not part of the test): u = alpha * k + e; alpha = share of the mark the suspect
                # reproduces, off_key = |e| / |k| (the suspect's own filter error in the key's subspace)
                "alpha": alpha, "off_key": float((u - alpha * key).norm()) / math.sqrt(k2)}


def _z(key: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor) -> float:
    """``<k, u> / |u|`` with ``u`` the grey-free least-squares filter estimate (0 when the residual is 0)."""
    u = _estimate(gram, cross)
    norm = float(u.norm())
    if norm == 0.0 or not math.isfinite(norm):
        return 0.0
    return float((key * u).sum()) / norm


def _estimate(gram: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """The grey-free least-squares filter ``u (3, F)`` from the running sums."""
    d = gram.shape[0]
    ridge = 1e-9 * float(torch.trace(gram)) / d + 1e-30
    return grey_free(torch.linalg.solve(gram + ridge * torch.eye(d, dtype=gram.dtype), cross).T)


#: Smallest p-value reported: float64 cannot tell smaller tails apart (the p-value is then an upper bound).
P_FLOOR = 1e-300


def cosine_sf(t: float, dim: int) -> float:
    """``P(T >= t)`` for ``T`` the cosine between a fixed vector and a uniformly random direction in ``dim``
    dimensions (``dim >= 2``): ``T^2 ~ Beta(1/2, (dim - 1)/2)``, symmetric in sign, so for ``t >= 0``
    ``P(T >= t) = I_{1 - t^2}((dim - 1)/2, 1/2) / 2`` (regularized incomplete beta). ``dim = 3``: ``T`` is
    uniform on [-1, 1] (Archimedes) and the tail is ``(1 - t) / 2``. Floored at :data:`P_FLOOR`.
    """
    from scipy.special import betainc

    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    t = min(1.0, max(-1.0, float(t)))
    half = 0.5 * float(betainc((dim - 1) / 2.0, 0.5, 1.0 - t * t))
    return max(P_FLOOR, half if t >= 0 else 1.0 - half)
