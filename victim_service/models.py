"""Served models: where they come from, what inputs they take, and how large a batch pays off.

Sources (``ModelSpec.source``): a checkpoint path (``.safetensors`` + card, TorchScript ``.pt``,
``torch.export`` ``.pt2``; loaded by :func:`translators.checkpoint.load_model`, never unpickled), or
``zoo:NAME[@PROFILE]`` built (or read from cache) by ``translators.zoo.build``. ``models_dir`` adds every
model file of a folder, named after the file.

Batch size: batching is not always a win (on a 2-core CPU an SRResNet at 64x64 runs 8.2 img/s at batch 1
and 6.3 img/s at batch 8), so ``max_batch = "auto"`` measures throughput at batch 1, 2, 4, ... up to
``max_batch_limit`` (default 8 on CPU and 128 on CUDA, where an SRResNet gains up to batch 64 and more)
on a ``probe_size`` input at warm-up and keeps the smallest batch within 5% of the
best images-per-second. The choice and the measurements are logged and shown in ``GET /v1/models``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from defenses.base import ModelHandle
from translators.checkpoint import LoadedModel, find_models, load_model
from translators.codecs import ImageLimits
from translators.device import pick_device
from translators.errors import CheckpointError, HeistError, ImageError
from victim_service.settings import ImageSettings, ModelSpec, Settings, SettingsError

log = logging.getLogger("heist.victim.models")


def parse_zoo_source(source: str) -> tuple[str, str]:
    """``zoo:NAME`` or ``zoo:NAME@PROFILE`` -> ``(NAME, PROFILE)`` (profile ``tiny`` by default)."""
    body = source.removeprefix("zoo:")
    name, _, profile = body.partition("@")
    if not name:
        raise SettingsError(f"model source {source!r}: write zoo:NAME or zoo:NAME@PROFILE")
    return name, profile or "tiny"


def resolve_source(source: str) -> Path:
    """The checkpoint file of a model source, building a zoo model when it is not cached yet."""
    if source.startswith("zoo:"):
        name, profile = parse_zoo_source(source)
        try:
            from translators import zoo
        except ImportError as exc:
            msg = f"model source {source!r} needs translators.zoo, which failed to import ({exc})"
            raise SettingsError(msg) from None
        try:
            return Path(zoo.build(name, profile))
        except HeistError:
            raise
        except (KeyError, ValueError) as exc:
            raise SettingsError(f"model source {source!r}: {exc}") from None
    p = Path(source).expanduser()
    if not p.exists():
        raise CheckpointError(f"model source {source!r}: no such file")
    return p


def check_sources(specs: list[ModelSpec]) -> None:
    """Every non-zoo model file exists and loads (on the CPU: card, weights, and the probe forward that
    checks a TorchScript or export card), so that ``heist serve`` refuses a bad file with one line naming
    the model entry before any worker starts; a worker failing at start-up can only print a traceback."""
    for spec in specs:
        if spec.source.startswith("zoo:"):
            continue
        try:
            load_model(resolve_source(spec.source), "cpu")
        except (CheckpointError, SettingsError) as exc:
            raise type(exc)(f"model {spec.name!r}: {exc}") from None


def prebuild_zoo(settings: Settings) -> None:
    """Build every ``zoo:`` model the settings name, once, before workers start (they then hit the cache)."""
    for m in settings.models:
        if m.source.startswith("zoo:"):
            resolve_source(m.source)


def _safe_name(stem: str) -> str:
    """The served name of a ``models_dir`` file: its stem with every character other than ASCII letters,
    digits, ``.``, ``_`` and ``-`` turned into ``-`` (at most 64 characters; ``model`` when nothing is left)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", stem).lstrip("._-")[:64]
    return name or "model"


def model_specs(settings: Settings) -> list[ModelSpec]:
    """Every model to serve: ``models`` plus one spec per file of ``models_dir`` (explicit names win)."""
    specs = list(settings.models)
    if settings.models_dir is not None:
        taken = {m.name for m in specs}
        base = settings.models_dir_defaults
        files: dict[str, Path] = {}
        for f in find_models(settings.models_dir):
            name = _safe_name(f.stem)
            if name in files:  # m.pt beside m.safetensors, or "a b" beside "a-b": which one would be a guess
                raise SettingsError(f"{settings.models_dir}: {files[name].name} and {f.name} would both be served "
                                    f"as {name!r}; rename or move one of them")
            files[name] = f
            if name in taken:  # an explicit [[models]] entry of that name wins
                continue
            if base is not None:
                specs.append(base.model_copy(update={"name": name, "source": str(f)}))
            else:
                specs.append(ModelSpec(name=name, source=str(f)))
    if not specs:
        where = f" ({settings.models_dir} holds no .safetensors/.pt/.pt2 file)" if settings.models_dir else ""
        raise SettingsError(f"no model to serve{where}: add [[models]] to the settings or pass --models-dir")
    return specs


@dataclass
class ServedModel:
    """A loaded model plus its input rules and batching choice. Inputs ``(N, 3, H, W)`` -> ``(N, 3, sH, sW)``."""

    name: str
    spec: ModelSpec
    loaded: LoadedModel
    device: torch.device
    task: str
    scale: int
    min_side: int
    size_multiple: int
    fixed_size: tuple[int, int] | None
    max_pixels: int
    max_bytes: int
    max_batch: int = 1
    fixed_batch: int | None = None  # 1: a torch.export program traced with one image, never batched
    max_batch_source: str = "config"
    batch_probe: dict[int, float] = field(default_factory=dict)
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    inflight: int = 0
    img_per_s: float = 0.0  # device throughput estimate (warm-up probe, then a moving average of batches)

    def observe_batch(self, n: int, seconds: float) -> None:
        """Fold one batch (``n`` images in ``seconds`` on the device thread) into :attr:`img_per_s`."""
        if seconds <= 0:
            return
        rate = n / seconds
        self.img_per_s = rate if self.img_per_s <= 0 else 0.8 * self.img_per_s + 0.2 * rate

    def expected_wait_s(self) -> float | None:
        """Seconds the next request would wait behind the ``inflight`` ones; None before any measurement."""
        if self.img_per_s <= 0:
            return None
        return self.inflight / self.img_per_s

    @property
    def max_delay_s(self) -> float:
        return self.spec.max_delay_ms / 1000.0

    def image_limits(self, images: ImageSettings) -> ImageLimits:
        """Limits checked on the header, before any pixel is decoded."""
        return ImageLimits(
            max_bytes=self.max_bytes, max_pixels=self.max_pixels, min_side=self.min_side,
            alpha=images.alpha, bit16=images.bit16, animated=images.animated,
        )

    def check_size(self, h: int, w: int) -> None:
        """Raise :class:`ImageError` ``bad_size`` when the model cannot take an ``h x w`` input."""
        if self.fixed_size is not None and (h, w) != self.fixed_size:
            fh, fw = self.fixed_size
            raise ImageError("bad_size", f"this model takes only {fw}x{fh} inputs (width x height); got {w}x{h}")
        m = self.size_multiple
        if m > 1 and (h % m or w % m):
            raise ImageError("bad_size", f"width and height must be multiples of {m}; got {w}x{h}")

    def probe_side(self) -> tuple[int, int]:
        if self.fixed_size is not None:
            return self.fixed_size
        s = max(self.spec.probe_size, self.min_side)
        m = max(self.size_multiple, 1)
        s = -(-s // m) * m
        return s, s

    def handle(self) -> ModelHandle:
        """What a model-aware defense receives at set-up (see :class:`defenses.ModelHandle`)."""
        card = self.loaded.card
        return ModelHandle(
            name=self.name, module=self.loaded.module, device=self.device, card=card.model_dump(mode="json"),
            kind=self.loaded.kind, task=self.task, scale=self.scale,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` on the model's device -> float32 ``(N, 3, sH, sW)``. Caller picks the grad mode."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = (
            torch.autocast(self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None else contextlib.nullcontext()
        )
        with amp:
            y = self.loaded.module(x)
        if not isinstance(y, torch.Tensor):
            raise RuntimeError(f"model {self.name} returned {type(y).__name__}, not a tensor")
        return y.float().contiguous()


def load_served_model(spec: ModelSpec, settings: Settings) -> ServedModel:
    """Load one model on its device (call from the device's worker thread)."""
    device = pick_device(spec.device)
    path = resolve_source(spec.source)
    loaded = load_model(path, device)
    card = loaded.card
    scale = int(card.scale)
    fixed = getattr(card, "fixed_size", None)
    fixed_size = (int(fixed[0]), int(fixed[1])) if isinstance(fixed, list | tuple) and len(fixed) == 2 else None
    default_pixels = max(settings.images.max_pixels // max(scale, 1) ** 2, 1)
    model = ServedModel(
        name=spec.name,
        spec=spec,
        loaded=loaded,
        device=device,
        task=str(card.task),
        scale=scale,
        min_side=spec.min_side or max(int(card.min_side), 1),
        size_multiple=max(int(card.size_multiple), 1),
        fixed_size=fixed_size,
        fixed_batch=1 if getattr(card, "fixed_batch", None) == 1 else None,
        max_pixels=spec.max_pixels or default_pixels,
        max_bytes=spec.max_bytes or settings.images.max_bytes,
    )
    if device.type == "cuda" and settings.amp:
        model.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        try:
            loaded.module.to(memory_format=torch.channels_last)
            model.channels_last = True
        except (RuntimeError, TypeError):
            model.channels_last = False
    return model


def _timed_throughput(model: ServedModel, batch: int, budget_s: float) -> float:
    """Images per second of ``model.forward`` at ``batch`` on a random probe input (one warm run first)."""
    h, w = model.probe_side()
    x = torch.rand(batch, 3, h, w, device=model.device)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda *a: None)
    with torch.inference_mode():
        model.forward(x)
        sync()
        runs, t0 = 0, time.perf_counter()
        while True:
            model.forward(x)
            sync()
            runs += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= budget_s or (runs >= 2 and elapsed >= budget_s / 2):
                break
    return batch * runs / elapsed


def max_batch_limit(spec: ModelSpec, device: torch.device) -> int:
    """The largest batch the auto probe tries: the spec's, else 8 on CPU and 128 on CUDA."""
    if spec.max_batch_limit is not None:
        return spec.max_batch_limit
    return 128 if device.type == "cuda" else 8


def set_configured_batch(model: ServedModel) -> None:
    """``max_batch`` from the settings, or 1 for an export traced with one image (``fixed_batch``)."""
    spec = model.spec
    if model.fixed_batch == 1:
        if spec.max_batch not in ("auto", 1):
            log.warning("model %s: max_batch = %s ignored: its export takes one image per forward", model.name,
                        spec.max_batch)
        model.max_batch, model.max_batch_source = 1, "fixed (export)"
    else:
        model.max_batch, model.max_batch_source = int(spec.max_batch), "config"


def warm_up(model: ServedModel, probe_s: float, warm: bool = True) -> None:
    """Run a warm-up forward and, for ``max_batch = "auto"``, pick the batch limit by measuring.

    Candidates are 1, 2, 4, ... and ``max_batch_limit``; probing stops early once a batch runs below 80%
    of the best throughput so far. The smallest batch within 5% of the best is kept (less latency for
    the same throughput).
    """
    spec = model.spec
    if model.fixed_batch == 1 or spec.max_batch != "auto":
        set_configured_batch(model)
        if warm:
            h, w = model.probe_side()
            with torch.inference_mode():
                model.forward(torch.rand(1, 3, h, w, device=model.device))
        return
    h, w = model.probe_side()
    with torch.inference_mode():  # TorchScript's profiling executor optimises over the first few calls
        for _ in range(3):
            model.forward(torch.rand(1, 3, h, w, device=model.device))
    limit = max_batch_limit(spec, model.device)
    cands = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= limit} | {limit})
    probe: dict[int, float] = {}
    for b in cands:
        try:
            probe[b] = _timed_throughput(model, b, probe_s)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        if probe[b] < 0.8 * max(probe.values()):
            break
    for b in list(probe):  # a second, interleaved round; the best of two resists a noisy (shared) machine
        probe[b] = max(probe[b], _timed_throughput(model, b, probe_s))
    best = max(probe.values())
    model.max_batch = min(b for b, v in probe.items() if v >= 0.95 * best)
    model.img_per_s = probe[model.max_batch]
    model.max_batch_source = "auto"
    model.batch_probe = {b: round(v, 2) for b, v in probe.items()}
    log.info("model %s on %s: max_batch=%d chosen by measurement at %dx%d (img/s by batch: %s)",
             model.name, model.device, model.max_batch, w, h,
             ", ".join(f"{b}: {v:.1f}" for b, v in model.batch_probe.items()))
