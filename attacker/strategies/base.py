"""Query strategies: which image the attacker sends as query number ``index``.

A strategy is built from the attacker's own images, the public :class:`ModelInfo` of the target and
validated :class:`StrategyParams`. ``make(index)`` must be deterministic in ``(seed, index)`` for the
non-adaptive strategies, so a resumed harvest regenerates exactly the queries it still owes. Adaptive
strategies (``adaptive = True``) also see every harvested pair through ``observe`` and are
deterministic given the pairs observed so far; ``make`` is always called in increasing index order.

Inputs are ``(1, 3, H, W)`` float tensors in [0, 1], sized to satisfy the model's published limits
(``min_side``, ``size_multiple``, ``max_pixels``).
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from attacker.errors import ConfigError
from attacker.strategies.leaves import dead_leaves
from attacker.victim_info import ModelInfo
from translators.corpus import NamedImage
from translators.errors import first_problem
from translators.images import bicubic_resize, crop_to_multiple
from translators.registry import Registry

STRATEGY_REGISTRY: Registry[type[QueryStrategy]] = Registry("query strategy")
LEAVES = "dead-leaves"  # the source name of synthetic queries (``StrategyParams.leaves``)
AUTO_PIXELS = 64 * 256 * 256  # output pixels an auto-sized harvest aims for (see auto_crop_size)


class StrategyParams(BaseModel):
    """Options shared by every strategy.

    Attributes:
        crop_size: side of crops/tiles in *input* pixels; ``auto`` = from the budget and the model's
            ``max_pixels`` (:meth:`QueryStrategy.auto_crop_size`; without a budget 64 for scale 1,
            ``128 // scale`` for SR). Rounded down to the model's ``size_multiple``.
        downscale: shrink the attacker's photos by this factor (bicubic, antialiased) before anything
            else; ``auto`` = the model's scale, so an x4 SR victim gets low-resolution inputs like the
            ones it serves (the extraction paper queries SR victims with 4x-downscaled photos).
        noise_sigma: add Gaussian noise with sigma (0..255 scale) drawn uniformly from ``[lo, hi]`` per
            query; ``auto`` = ``[0, 50]`` when the task is ``denoise`` (the attacker knows the task, not
            the victim's noise level), else none. ``null``/``None`` disables it.
        max_side: whole-image strategies shrink photos whose longer side exceeds this.
        pool: candidates per query for the adaptive ``diversity`` strategy.
        zoom: crop strategies shrink the chosen photo by a factor drawn log-uniformly from ``[lo, hi]``
            (``0 < lo <= hi <= 1``; bicubic, antialiased) before cutting the crop, never so far that the
            photo no longer holds one. ``None`` = photos at their own scale.
        leaves: share of the ``crops`` and ``tiles`` queries *beyond the photos* (those numbered
            :meth:`QueryStrategy.content_queries` and later, when the photos are used up and a crop can only
            re-cut pixels already sent) that are :func:`attacker.strategies.leaves.dead_leaves` compositions
            of the photos instead: new edges and textures at new places. Spread evenly, the first one
            leaves. ``0`` = round 1's queries (crops only).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Parameters added after harvests were first recorded, with the value that reproduces those harvests'
    # queries: a resume compares a recorded harvest as if it had named them (and says so when they differ).
    RECORDED_BEFORE: ClassVar[dict[str, Any]] = {"zoom": None, "leaves": 0.0}

    crop_size: int | Literal["auto"] = "auto"
    downscale: int | Literal["auto"] = "auto"
    noise_sigma: tuple[float, float] | Literal["auto"] | None = "auto"
    max_side: int = Field(512, ge=8)
    pool: int = Field(16, ge=1, le=1024)
    zoom: tuple[float, float] | None = None
    leaves: float = Field(0.5, ge=0.0, le=1.0)

    @field_validator("crop_size", "downscale")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("zoom")
    @classmethod
    def _zoom_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (0 < v[0] <= v[1] <= 1):
            raise ValueError("zoom must be [lo, hi] with 0 < lo <= hi <= 1")
        return v

    @field_validator("noise_sigma", mode="before")
    @classmethod
    def _sigma(cls, v: object) -> object:
        if isinstance(v, int | float) and not isinstance(v, bool):
            return (float(v), float(v))
        return v

    @field_validator("noise_sigma")
    @classmethod
    def _sigma_range(cls, v: tuple[float, float] | str | None) -> tuple[float, float] | str | None:
        if isinstance(v, tuple) and not (0 <= v[0] <= v[1] <= 255):
            raise ValueError("noise_sigma must be [lo, hi] with 0 <= lo <= hi <= 255")
        return v


@dataclass
class Query:
    """One planned query: ``image`` is ``(1, 3, H, W)`` in [0, 1]; ``crop`` is ``[top, left, h, w]``."""

    index: int
    image: torch.Tensor
    source: str
    crop: list[int] | None
    transform: str | None = None

    @property
    def pixels(self) -> int:
        return int(self.image.shape[-2] * self.image.shape[-1])


def index_rng(seed: int, index: int, salt: str = "") -> random.Random:
    """A ``random.Random`` that depends only on ``(seed, index, salt)`` (string seeds hash with SHA-512)."""
    return random.Random(f"heist:{salt}:{seed}:{index}")


def torch_generator(rng: random.Random) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(rng.getrandbits(63))
    return g


class QueryStrategy(ABC):
    """Base class. Subclasses implement :meth:`make`; ``Params`` is their pydantic parameter model."""

    Params: ClassVar[type[StrategyParams]] = StrategyParams
    adaptive: ClassVar[bool] = False
    uses_crops: ClassVar[bool] = True
    fills_beyond_photos: ClassVar[bool] = False  # True: queries build with crop_query (params.leaves applies)

    def __init__(self, images: Sequence[NamedImage], info: ModelInfo, params: StrategyParams, seed: int = 0,
                 budget: int | None = None) -> None:
        if not images:
            raise ConfigError("the strategy needs at least one image")
        self.info = info
        self.params = params
        self.seed = seed
        self.downscale = info.scale if params.downscale == "auto" else int(params.downscale)
        self.sources = [NamedImage(im.name, self._prepare(im.image)) for im in images]
        self.mult = max(1, info.size_multiple)
        self.budget = budget
        size = self.auto_crop_size() if params.crop_size == "auto" else int(params.crop_size)
        size = max(size - size % self.mult, self.mult)
        if size < info.min_side:
            size = math.ceil(info.min_side / self.mult) * self.mult
        if info.max_pixels is not None and size * size > info.max_pixels:
            raise ConfigError(f"crop_size {size} exceeds the victim's max_pixels {info.max_pixels}")
        self.crop_size = size
        # (height, width) of every crop; a model that takes one size only gets exactly that size
        self._content_queries: int | None = None
        self.crop_hw: tuple[int, int] = (int(info.fixed_size[0]), int(info.fixed_size[1])) if info.fixed_size \
            else (size, size)
        if self.uses_crops:
            self.crop_candidates()  # fail early when no image holds a crop
        if params.noise_sigma == "auto":
            self.noise: tuple[float, float] | None = (0.0, 50.0) if info.task == "denoise" else None
        else:
            self.noise = params.noise_sigma

    def auto_crop_size(self) -> int:
        """Crop side (input pixels) for ``crop_size="auto"``: the largest the budget and limits allow.

        Small budgets get big queries: each pair is worth more pixels, and the victim charges per query.
        The side is ``sqrt(AUTO_PIXELS / budget) / scale`` (``AUTO_PIXELS`` output pixels in all, so
        harvest and training stay CPU-sized: 16 queries -> 512 px, 64 -> 256, 256 -> 128 for scale 1),
        at least the old fixed default (64, or ``128 // scale`` for SR), at most ``sqrt(max_pixels)``
        (``GET /v1/models``) and the median short side of the attacker's photos, so most photos hold a
        crop (a budget of 1 therefore sends an almost whole photo). Without a known budget: the default.
        """
        floor = 64 if self.info.scale <= 1 else max(16, 128 // self.info.scale)
        if self.budget is None:
            return floor
        side = int(math.sqrt(AUTO_PIXELS / self.budget)) // max(1, self.info.scale)
        shorts = sorted(min(im.image.shape[-2:]) for im in self.sources)
        cap = shorts[(len(shorts) - 1) // 2]
        if self.info.max_pixels is not None:
            cap = min(cap, math.isqrt(self.info.max_pixels))
        return max(min(side, cap), min(floor, cap))

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.downscale > 1:
            h, w = x.shape[-2:]
            x = bicubic_resize(x, (max(1, h // self.downscale), max(1, w // self.downscale)))
        return x

    @abstractmethod
    def make(self, index: int) -> Query:
        """The query with number ``index`` (0-based)."""

    def observe(self, index: int, inp: torch.Tensor, out: torch.Tensor | None) -> None:  # noqa: B027
        """Adaptive strategies learn from each harvested pair (inputs/outputs ``(1, 3, H, W)``)."""

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"crop_size": self.crop_size, "crop_hw": list(self.crop_hw),
                                  "downscale": self.downscale, "noise_sigma": list(self.noise) if self.noise else None}
        if self.params.zoom:
            out["zoom"] = list(self.params.zoom)
        if self.fills_beyond_photos and self.params.leaves > 0:
            out["leaves"] = self.params.leaves
            out["content_queries"] = self.content_queries()
        return out

    # --- helpers ---------------------------------------------------------------------------------
    def crop_candidates(self) -> list[tuple[int, NamedImage]]:
        """Sources big enough for one crop, with their number of crop positions (area weight)."""
        ch, cw = self.crop_hw
        out = [((im.image.shape[-2] - ch + 1) * (im.image.shape[-1] - cw + 1), im) for im in self.sources
               if im.image.shape[-2] >= ch and im.image.shape[-1] >= cw]
        if not out:
            biggest = max(min(im.image.shape[-2:]) for im in self.sources)
            raise ConfigError(f"no image is at least {cw}x{ch} after downscaling by {self.downscale} "
                              f"(largest short side: {biggest}); lower crop_size or downscale")
        return out

    def random_crop(self, rng: random.Random, index: int | None = None) -> tuple[NamedImage, list[int], torch.Tensor]:
        """A uniformly placed crop of one source photo.

        With ``index`` (the query number) the photos take turns: queries ``r*n .. r*n+n-1`` visit each of
        the ``n`` photos that hold a crop once, in a seeded order per round ``r``, so every photo gets an
        equal share of the budget. Without it the photo is drawn with probability proportional to its
        number of crop positions. Why turns, not area: when the crop is nearly as big as the photos (small
        budgets, SR victims queried with downscaled photos) the one photo with the most slack otherwise
        takes almost every query (measured: 13 of 16 queries from one grey micrograph), and a surrogate
        learns one photo's content instead of the victim's function.
        """
        cands = self.crop_candidates()
        if index is None:
            im = rng.choices([im for _, im in cands], weights=[c for c, _ in cands], k=1)[0]
        else:
            n = len(cands)
            order = random.Random(f"heist:crop-turns:{self.seed}:{index // n}").sample(range(n), n)
            im = cands[order[index % n]][1]
        ch, cw = self.crop_hw
        image = self.zoomed(im.image, rng)
        h, w = image.shape[-2:]
        top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
        return im, [top, left, ch, cw], image[..., top : top + ch, left : left + cw]

    def content_queries(self) -> int:
        """How many crops the photos hold without overlap: ``sum(max(1, (h // ch) * (w // cw)))`` over the
        photos that hold one. Queries beyond it can only re-cut pixels already sent (``params.leaves``)."""
        if self._content_queries is None:  # asked once per query: photos and crop size are fixed at build time
            ch, cw = self.crop_hw
            self._content_queries = sum(max(1, (im.image.shape[-2] // ch) * (im.image.shape[-1] // cw))
                                        for _, im in self.crop_candidates())
        return self._content_queries

    def is_leaves(self, index: int) -> bool:
        """Whether query ``index`` is a dead-leaves composition: the ``k``-th query beyond the photos is one
        when ``ceil((k + 1) f) > ceil(k f)`` (``f = params.leaves``: an even spread, exactly ``f`` of them)."""
        f = self.params.leaves if self.fills_beyond_photos else 0.0
        if f <= 0:
            return False
        k = index - self.content_queries()
        return k >= 0 and math.ceil((k + 1) * f - 1e-9) > math.ceil(k * f - 1e-9)

    def crop_query(self, index: int, source: str, box: list[int] | None, x: torch.Tensor,
                   rng: random.Random) -> Query:
        """Query ``index`` from the crop ``x`` (``(1, 3, h, w)``) at ``box`` of photo ``source``, or a
        dead-leaves composition of the same size in its place (:meth:`is_leaves`; source ``dead-leaves``,
        no box), then noised (:meth:`add_noise`). Draws from ``rng`` for the leaves only when there are
        some, so crop queries stay what they were."""
        tag: str | None = None
        if self.is_leaves(index):
            x, tag, source, box = dead_leaves(x.shape[-2], x.shape[-1], self.sources, rng), "leaves", LEAVES, None
        x, noise = self.add_noise(x, rng)
        return Query(index, x.contiguous(), source, box, ":".join(t for t in (tag, noise) if t) or None)

    def zoomed(self, image: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """``image`` shrunk by a factor drawn log-uniformly from ``params.zoom``, kept large enough for
        one crop; unchanged without ``zoom``. Draws from ``rng`` only when ``zoom`` is set, so the
        queries of a harvest without it stay what they were."""
        if self.params.zoom is None:
            return image
        lo, hi = self.params.zoom
        ch, cw = self.crop_hw
        h, w = image.shape[-2:]
        f = max(math.exp(rng.uniform(math.log(lo), math.log(hi))), ch / h, cw / w)
        if f >= 1.0:
            return image
        return bicubic_resize(image, (max(ch, round(h * f)), max(cw, round(w * f))))

    def fit_whole(self, x: torch.Tensor) -> torch.Tensor:
        """Shrink to ``max_side`` / ``max_pixels`` and crop to ``size_multiple`` (for whole images).

        A model with a ``fixed_size`` gets the image scaled to cover that size, centre-cropped to it.
        """
        h, w = x.shape[-2:]
        if self.info.fixed_size is not None:
            fh, fw = self.crop_hw
            f = max(fh / h, fw / w)
            x = bicubic_resize(x, (max(fh, round(h * f)), max(fw, round(w * f))))
            t, le = (x.shape[-2] - fh) // 2, (x.shape[-1] - fw) // 2
            return x[..., t : t + fh, le : le + fw]
        f = min(1.0, self.params.max_side / max(h, w))
        if self.info.max_pixels is not None:
            f = min(f, math.sqrt(self.info.max_pixels / (h * w)))
        if f < 1.0:
            x = bicubic_resize(x, (max(1, int(h * f)), max(1, int(w * f))))
        return crop_to_multiple(x, self.mult)

    def add_noise(self, x: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, str | None]:
        if self.noise is None:
            return x, None
        sigma = rng.uniform(*self.noise)
        if sigma <= 0:
            return x, "noise0"
        g = torch_generator(rng)
        noisy = (x + torch.randn(x.shape, generator=g) * (sigma / 255.0)).clamp(0.0, 1.0)
        return noisy, f"noise{sigma:.1f}"


def build_strategy(
    name: str, images: Sequence[NamedImage], info: ModelInfo, params: StrategyParams | dict | None = None,
    seed: int = 0, budget: int | None = None,
) -> QueryStrategy:
    """Build a registered strategy; ``params`` is validated against the strategy's ``Params`` model.

    ``budget`` (queries) sizes ``crop_size="auto"``."""
    from pydantic import ValidationError

    import attacker.strategies  # noqa: F401 - registers the built-in strategies
    from translators.registry import UnknownNameError

    try:
        cls = STRATEGY_REGISTRY.get(name)
    except UnknownNameError as exc:
        raise ConfigError(str(exc)) from None
    try:
        if params is None:
            p = cls.Params()
        elif isinstance(params, BaseModel):
            p = cls.Params.model_validate(params.model_dump())
        else:
            p = cls.Params.model_validate(params)
    except ValidationError as exc:
        raise ConfigError(f"strategy {name!r}: {first_problem(exc)}") from None
    return cls(images, info, p, seed, budget)
