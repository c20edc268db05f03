"""Ownership watermark: a keyed, content-dependent mark that a surrogate trained on our outputs learns.

The mark (Heist's own design; docs/defenses.md, "Ownership watermark") adds to the clean output ``y``
``(N, 3, sH, sW)`` a keyed linear filter of the request's input ``x`` (bicubic-resized to the output's
size; ``source = "output"`` filters ``y`` instead):

    w_k(x)[c] = sum_{c', o} k[c, c', o] * R_o(x[c'])          mark = clamp(y + g * w_k(x))

``R_o`` are ring differences: ``R_o(x)(p) = mean_{t in orbit o} x(p + t) - x(p)`` over the orbits ``o`` of the
8 dihedral symmetries acting on the offsets ``t`` of a ``(2r+1)^2`` window (radius ``r``). Each ``R_o`` is
zero-mean (no colour shift) and commutes with flips and 90-degree rotations, so a thief's dihedral
augmentation maps the mark onto itself instead of averaging it away (the known break of fixed-pattern and
oriented marks). Because the mark is a function of content, a convolutional surrogate trained on random crops
learns it as part of the translation (a linear filter of its own input is the easiest thing a CNN learns). The
key ``k (3, 3 * n_orbits)`` is a standard Gaussian on the *grey-free* subspace
(:func:`~defenses.watermark.keyspace.grey_free`: no "same filter on every channel" component, where innocent
surrogates' own blur and sharpening errors live), drawn from the server secret and ``key_id`` (``colour =
"rgb"``, the default; ``luma`` and ``split`` keys and their test coordinates:
:mod:`defenses.watermark.keyspace`). The gain ``g = min(gain, amplitude / rms(w_k))`` keeps every output's
mark at RMS ``amplitude = 10^(-psnr/20)`` or less (honest-user PSNR >= ``psnr`` before 8-bit rounding).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from defenses.base import DefenseContext, DefenseParams, OutputDefense, request_rng, request_seed
from defenses.registry import DEFENSE_REGISTRY
from defenses.watermark.carriers import Carrier, features
from defenses.watermark.keyspace import Colour, KeySpace, split_key


def ownership_key(secret: int, params: OwnershipParams) -> torch.Tensor:
    """The secret key ``k (3, n_features)`` float64 for ``params``: :meth:`KeySpace.draw` seeded by (server
    secret, key_id, radius, carrier, scales, colour, whiten); its test coordinates are a standard Gaussian on
    the key's subspace. The ``rgb`` key of the default carrier is the one round 1 drew (same seed parts)."""
    p = params
    parts: tuple[str, ...] = (p.key_id, str(p.radius)) if p.carrier == "ring" else (p.key_id, str(p.radius), p.carrier)
    if p.carrier == "ring" and tuple(p.scales) != (1,):
        parts += ("scales=" + ",".join(map(str, p.scales)),)
    if p.colour != "rgb":
        parts += (f"colour={p.colour}", f"whiten={p.whiten:g}")
    return p.key_space().draw(request_rng(request_seed(secret, "ownership_watermark", *parts)))


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
    them. ``colour``: the key's colour subspace (``rgb``, ``luma`` or ``split``,
    :mod:`defenses.watermark.keyspace`). ``whiten``: for ``luma`` and ``split``, how the key and the test
    weigh the luma part's feature directions (0 = equally; 1 = by their picture energy on a fixed 1/f
    reference). ``luma_share``: for ``split``, the luma part's share of the mark's energy (the chroma part
    gets the rest). ``key_id``: names the key (rotate it to start a new key; verification must use the
    same id)."""

    psnr: float = Field(40.5, ge=20.0, le=80.0)
    gain: float = Field(0.5, gt=0.0, le=100.0)
    radius: int = Field(2, ge=0, le=8)
    scales: tuple[int, ...] = Field((1,), min_length=1, max_length=4)
    key_id: str = Field("k1", min_length=1, max_length=64)
    source: Literal["output", "input"] = "input"
    carrier: Carrier = "ring"
    colour: Colour = "rgb"
    whiten: float = Field(0.0, ge=0.0, le=1.0)
    luma_share: float = Field(0.8, gt=0.0, lt=1.0)

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

    @model_validator(mode="after")
    def _key_space_valid(self) -> OwnershipParams:
        self.key_space()  # KeySpace checks colour/whiten/carrier/scales/radius (ValueError with the reason)
        return self

    def key_space(self) -> KeySpace:
        """The key's subspace and the test's coordinates for these parameters."""
        return KeySpace(self.radius, self.carrier, self.scales, self.colour, self.whiten)


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
            self._keys[secret] = ownership_key(secret, self.params)
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
    src = feature_source(y, x, p.source).float()
    amp = 10.0 ** (-p.psnr / 20.0)
    if p.colour == "split":  # two orthogonal marks (chroma, grey), each held to its share of the budget
        parts = zip(split_key(key), (1.0 - p.luma_share, p.luma_share), strict=True)
        mark = sum(_capped(mark_signal(src, k, r, p.carrier, p.scales), amp * math.sqrt(s), p.gain)
                   for k, s in parts)
    else:
        mark = _capped(mark_signal(src, key, r, p.carrier, p.scales), amp, p.gain)
    return (y.float() + mark).clamp_(0.0, 1.0).to(y.dtype)


def _capped(w: torch.Tensor, amp: float, gain: float) -> torch.Tensor:
    """``g * w`` with ``g = min(gain, amp / rms(w))`` per image: RMS at most ``amp``."""
    rms = w.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    return torch.minimum(torch.full_like(rms, gain), amp / rms.clamp_min(1e-12)) * w


@dataclass
class OwnershipTest:
    """Running sums of the regression of residuals on the carrier's features; :meth:`result` gives the test.

    ``space`` (:class:`KeySpace`) names the carrier and the key's subspace; ``key`` is the filter
    ``(3, F)`` (:func:`ownership_key`). ``add(clean, suspect)`` takes one probe's clean victim output and the
    suspect's output, both ``(1, 3, H, W)`` in [0, 1] (resized beforehand if the suspect's size differs),
    and optionally ``nuisances``: the clean output after key-independent distortions a thief might apply
    (e.g. JPEG at a few qualities, :data:`evaluation.watermark.NUISANCE_JPEG`). Each nuisance's own filter
    estimate ``n_i`` (regressed like the suspect's residual) is projected off the key and off ``u`` in test
    coordinates before the cosine: a thief who re-encoded the harvest learns the codec's systematic error
    (``n_i``) on top of the mark (docs/defenses.md, "Surviving JPEG"). The ``n_i`` depend on the probes and
    the clean victim only, never on the key, so the projected key is still a standard Gaussian on a
    ``d - rank(n)`` dimensional subspace and the null stays exact.
    """

    key: torch.Tensor
    space: KeySpace
    kept: Distortion | None = None
    """A key-independent distortion of served outputs (e.g. JPEG 75 averaged over grid phases,
    :func:`defenses.jpeg.jpeg_phase_average`). With it, each part is tested twice: on the whole key, and on
    the key directions the distortion keeps (:meth:`_kept_result`); the part's p is the smaller one,
    doubled (Bonferroni)."""
    kept_rms: float = 10.0 ** (-OwnershipParams().psnr / 20.0)
    """RMS of the basis marks pushed through ``kept`` (the served mark's, ``10^(-psnr/20)``): JPEG's quantiser is
    not linear, so its effect is measured at the size the mark is served at."""
    gram: torch.Tensor = field(init=False)
    cross: torch.Tensor = field(init=False)
    nuisance_cross: list[torch.Tensor] = field(default_factory=list)
    kept_cross: dict[str, torch.Tensor] = field(default_factory=dict)
    per_probe: list[dict[str, float]] = field(default_factory=list)
    _bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _kept_frames: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        d = self.space.n_feat
        self.gram = torch.zeros(d, d, dtype=torch.float64)
        self.cross = torch.zeros(d, 3, dtype=torch.float64)

    def add(
        self, clean: torch.Tensor, suspect: torch.Tensor, name: str = "", basis: torch.Tensor | None = None,
        nuisances: Sequence[torch.Tensor] = (),
    ) -> None:
        sp = self.space
        phi = features((clean if basis is None else basis).double(), sp.radius, sp.carrier, sp.scales)
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
        if self.kept is not None:
            self._kept_frames.clear()  # the frames depend on every probe added so far
            for part in sp.parts:
                acc = self.kept_cross.setdefault(part, torch.zeros(sp.dim(part), *c.shape, dtype=torch.float64))
                acc += torch.einsum("fp,ncp->nfc", phi_m, self._kept_response(clean, phi, part))
        z = _z(sp.coords(self.key), sp.coords(_estimate(g, c)))  # first part
        self.per_probe.append({"probe": name, "z": z, "residual_rms": float(res.pow(2).mean().sqrt()),
                               "pixels": int(phi_m.shape[1])})

    def _kept_response(self, clean: torch.Tensor, phi: torch.Tensor, part: str) -> torch.Tensor:
        """``(d, 3, P)``: for each basis filter of ``part`` (:meth:`KeySpace.basis`), what ``kept`` leaves of
        its mark on this probe, ``(kept(clean + g w_i) - kept(clean)) / g`` with ``g`` giving the mark RMS
        :attr:`kept_rms`."""
        assert self.kept is not None
        _, filters = self._basis(part)
        w = torch.einsum("ncf,fhw->nchw", filters, phi[0])  # (d, 3, H, W): each basis filter's mark
        g = self.kept_rms / w.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
        base = clean.double()
        out = (self.kept(base + g * w) - self.kept(base).expand_as(w)) / g
        return out.flatten(2)

    def z_for(self, key: torch.Tensor) -> float:
        """``<k, u> / |u|`` (test coordinates) for another key on the same probes (calibration checks; no
        nuisances)."""
        return _z(self.space.coords(key), self.space.coords(_estimate(self.gram, self.cross)))

    @property
    def key_dim(self) -> int:
        """Dimension ``d`` of the key's subspace (the first part's, :meth:`KeySpace.dim`)."""
        return self.space.dim()

    def nuisance_basis(self, part: str | None = None) -> torch.Tensor:
        """Orthonormal columns ``(D, m)`` spanning the nuisances' filter estimates in a part's test
        coordinates (``m`` = their numerical rank; ``(D, 0)`` without nuisances)."""
        cols = [self.space.coords(_estimate(self.gram, c), part) for c in self.nuisance_cross]
        if not cols:
            return torch.zeros(self.space.coords(self.key, part).numel(), 0, dtype=torch.float64)
        q, r = torch.linalg.qr(torch.stack(cols, 1))
        keep = r.diagonal().abs() > 1e-9 * float(r.diagonal().abs().max().clamp_min(1e-300))
        return q[:, keep]

    def result(self, key: torch.Tensor | None = None) -> dict[str, Any]:
        """The test's statistics for ``self.key`` (or another ``key`` of the same shape, for calibration
        checks over many keys on the same probes). With several parts (``split``): each part's result under
        ``parts``, and at the top level the part with the smallest p, its p doubled (Bonferroni)."""
        key = self.key if key is None else key
        parts = {part: self._part_result(key, part) for part in self.space.parts}
        if len(parts) == 1:
            return next(iter(parts.values()))
        best = min(parts, key=lambda k: parts[k]["p_value"])
        return {**parts[best], "statistic": "min over parts of the cosine p-value, Bonferroni",
                "p_value": min(1.0, len(parts) * parts[best]["p_value"]), "part": best,
                "parts": {k: {a: b for a, b in v.items() if a != "statistic"} for k, v in parts.items()}}

    def _part_result(self, key: torch.Tensor, part: str) -> dict[str, Any]:
        whole = self._whole_result(key, part)
        if self.kept is None or part not in self.kept_cross:
            return whole
        kept = self._kept_result(key, part)
        p = min(1.0, 2.0 * min(whole["p_value"], kept["p_value"]))
        return {**whole, "statistic": "min of the whole-key and kept-directions cosine p-values, Bonferroni",
                "p_value": max(p, P_FLOOR), "whole": {a: b for a, b in whole.items() if a != "statistic"},
                "kept": kept}

    def _kept_result(self, key: torch.Tensor, part: str) -> dict[str, Any]:
        """The cosine test on the key directions :attr:`kept` keeps at least half of.

        ``A (d x d)``: column ``i`` is the filter estimate (test coordinates, in the part's basis ``B``) of
        what ``kept`` leaves of basis mark ``i`` on the probes (identity without a distortion). After the
        nuisances are projected off (``Q``, orthonormal, ``d - m`` columns), ``Q^T A Q = U S V^T``; the
        directions with singular value ``>= 0.5`` are kept (``r`` of them). The key's coordinates there,
        ``V_r^T Q^T B^T k``, are a standard Gaussian on ``R^r`` for any key-independent ``A`` and ``Q``, and
        the suspect's, ``U_r^T Q^T B^T u``, are fixed under H0: the cosine has the same exact law as the
        whole-key test, in ``r`` dimensions. A thief that learned ``kept(marked outputs)`` adds ``u ~ alpha A k``,
        whose coordinates are ``alpha S_r V_r^T Q^T B^T k``: the directions the distortion removed, where the
        thief adds only its own error, no longer dilute the cosine."""
        sp = self.space
        key_map, u, s_v, keep = self._kept_frame(part)
        r = int(keep.sum())
        kappa = key_map @ sp.coords(key, part)
        out: dict[str, Any] = {"key_dim": r, "kept_share_min": KEPT_SHARE,
                               "kept_singular_values": [round(float(v), 4) for v in s_v]}
        if r < 2:
            return {**out, "cosine": 0.0, "p_value": 1.0}
        k2 = float(kappa.pow(2).sum())
        cosine = _z(kappa, u) / math.sqrt(k2)
        return {**out, "cosine": cosine, "p_value": cosine_sf(cosine, r)}

    def _basis(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`KeySpace.basis`, computed once per part."""
        if part not in self._bases:
            self._bases[part] = self.space.basis(part)
        return self._bases[part]

    def _kept_frame(self, part: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The key-independent part of :meth:`_kept_result`, computed once per part after the last probe:
        ``(V_r^T Q^T B^T (r, D), the suspect's coordinates U_r^T Q^T B^T u (r,), S (d - m,), keep mask)``."""
        if part not in self._kept_frames:
            sp = self.space
            b, _ = self._basis(part)
            cols = torch.stack([b.T @ sp.coords(_estimate(self.gram, c), part)
                                for c in self.kept_cross[part]], 1)  # (d, d)
            q = _complement(b.T @ self.nuisance_basis(part), cols.shape[0])
            u_s, s_v, vh = torch.linalg.svd(q.T @ cols @ q)
            keep = s_v >= KEPT_SHARE
            u = u_s[:, keep].T @ (q.T @ (b.T @ sp.coords(_estimate(self.gram, self.cross), part)))
            self._kept_frames[part] = (vh[keep] @ q.T @ b.T, u, s_v, keep)
        return self._kept_frames[part]

    def _whole_result(self, key: torch.Tensor, part: str) -> dict[str, Any]:
        basis = self.nuisance_basis(part)

        def off(v: torch.Tensor) -> torch.Tensor:
            return v - basis @ (basis.T @ v)

        sp = self.space
        key = off(sp.coords(key, part))
        u = off(sp.coords(_estimate(self.gram, self.cross), part))
        dim = sp.dim(part) - basis.shape[1]
        k2 = float(key.pow(2).sum())
        z = _z(key, u)
        cosine = z / math.sqrt(k2)
        alpha = float((key * u).sum()) / k2
        return {"statistic": "cosine", "cosine": cosine, "p_value": cosine_sf(cosine, dim),
                "z": z, "probes": len(self.per_probe), "key_dim": dim, "max_z": math.sqrt(k2),
                "nuisance_dims": int(basis.shape[1]),
                # diagnostics (not part of the test): u = alpha * k + e in test coordinates; alpha = share of
                # the mark the suspect reproduces, off_key = |e| / |k| (the suspect's own error there)
                "alpha": alpha, "off_key": float((u - alpha * key).norm()) / math.sqrt(k2)}


#: :meth:`OwnershipTest._kept_result` keeps the key directions a distortion keeps at least this share of.
KEPT_SHARE = 0.5

#: A key-independent image distortion ``(N, 3, H, W) -> (N, 3, H, W)`` in [0, 1].
Distortion = Callable[[torch.Tensor], torch.Tensor]


def _complement(cols: torch.Tensor, d: int) -> torch.Tensor:
    """Orthonormal columns ``(d, d - m)`` spanning the orthogonal complement of ``cols (d, m)``."""
    if cols.shape[1] == 0:
        return torch.eye(d, dtype=torch.float64)
    q, _ = torch.linalg.qr(cols, mode="complete")
    return q[:, cols.shape[1]:]


def _z(key: torch.Tensor, u: torch.Tensor) -> float:
    """``<k, u> / |u|`` in test coordinates (0 when the residual is 0)."""
    norm = float(u.norm())
    if norm == 0.0 or not math.isfinite(norm):
        return 0.0
    return float((key * u).sum()) / norm


def _estimate(gram: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """The least-squares filter ``u (3, F)`` from the running sums (ridge 1e-9 of the mean eigenvalue)."""
    d = gram.shape[0]
    ridge = 1e-9 * float(torch.trace(gram)) / d + 1e-30
    return torch.linalg.solve(gram + ridge * torch.eye(d, dtype=gram.dtype), cross).T


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
