"""Feature networks for FID and KID, pluggable through :data:`FEATURE_NETWORKS`.

The standard one is InceptionV3's 2048-d pool3 (global average pool) output, the layer FID and KID
were defined on (Heusel et al. 2017; Binkowski et al. 2018). Heist never downloads weights at run
time; users provide a file (or put it in a cache folder) and Heist loads it as a *state dict* with
``torch.load(weights_only=True)`` (no unpickling of code) or ``safetensors``. Two files work:

- ``pt_inception-2015-12-05-6726825d.pth``: pytorch-fid's port of the TensorFlow FID Inception
  (1008 classes, TF-style pooling). Numbers are comparable with pytorch-fid and most papers.
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
- ``inception_v3_google-0cc3c7bd.pth``: torchvision's ImageNet InceptionV3 (1000 classes).
  https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth

Lookup order: an explicit path, ``$HEIST_INCEPTION_WEIGHTS``, then the files above in
``HEIST_DATA_DIR/weights/`` and in torch's hub cache (``~/.cache/torch/hub/checkpoints/``, where
pytorch-fid and torchvision keep downloads). The variant is detected from the state dict itself
(``fc.weight`` with 1008 rows: FID Inception; 1000: torchvision).

Preprocessing (both variants, as pytorch-fid): bilinear resize to 299x299 (``align_corners=False``)
and scaling from [0, 1] to [-1, 1]. For torchvision weights this equals their ``transform_input``
path applied to ImageNet-normalised inputs.

Offline network ``vgg16-random`` (:class:`RandomVGG16Features`): torchvision's VGG16 with its own
random initialisation under a fixed seed, no weights file at all. Naeem et al. 2020 ("Reliable Fidelity
and Diversity Metrics for Generative Models", ICML 2020, section 5) show that embeddings of a randomly
initialised VGG16 work for comparing image distributions. Its numbers are *not* comparable in absolute
value with Inception FID/KID/NKID; they rank models measured with the same network.
:func:`resolve_feature_network` picks a network: an explicit name or weights file, else InceptionV3
when a weights file is found, else ``vgg16-random``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torchvision.models import inception as tv_inception
from torchvision.models import vgg as tv_vgg

from evaluation.errors import FeatureNetworkError
from translators.files import file_digest
from translators.paths import data_dir
from translators.registry import Registry, UnknownNameError
from translators.seeding import seeded

log = logging.getLogger(__name__)

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
TORCHVISION_WEIGHTS_FILE = "inception_v3_google-0cc3c7bd.pth"
TORCHVISION_WEIGHTS_URL = f"https://download.pytorch.org/models/{TORCHVISION_WEIGHTS_FILE}"
KNOWN_WEIGHT_FILES = (FID_WEIGHTS_FILE, TORCHVISION_WEIGHTS_FILE)
WEIGHTS_ENV = "HEIST_INCEPTION_WEIGHTS"
OFFLINE_NETWORK = "vgg16-random"
NO_NETWORK = "none"


class FeatureNetworkInfo(BaseModel):
    """What produced a set of features; every FID/KID result carries one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # registry name, e.g. "inception-v3-fid"
    layer: str  # e.g. "pool3 (2048-d)"
    dim: int
    input_size: int
    weights_file: str | None = None
    weights_sha256: str | None = None
    init_seed: int | None = None  # random-init networks (no weights file): the seed of their weights

    @property
    def label(self) -> str:
        """``inception-v3-fid pool3 (2048-d), weights pt_inception-...pth (sha256 6726825d...)``, or for a
        random-init network ``vgg16-random fc2 (4096-d), random init seed 0 (params sha256 ...)``."""
        if self.weights_file and self.weights_sha256:
            w = f", weights {self.weights_file} (sha256 {self.weights_sha256[:12]})"
        elif self.init_seed is not None:
            digest = f" (params sha256 {self.weights_sha256[:12]})" if self.weights_sha256 else ""
            w = f", random init seed {self.init_seed}{digest}"
        else:
            w = ""
        return f"{self.name} {self.layer}{w}"

    @property
    def comparable_with_papers(self) -> bool:
        """Whether FID/KID/NKID on these features are on the scale papers report (InceptionV3 only)."""
        return self.name.startswith("inception-v3")


class FeatureNetwork(ABC):
    """Maps images ``(N, 3, H, W)`` in [0, 1] to features ``(N, D)`` float64 on the CPU."""

    info: FeatureNetworkInfo

    @abstractmethod
    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...

    @property
    def name(self) -> str:
        return self.info.name


FEATURE_NETWORKS: Registry[FeatureNetwork] = Registry("feature network")


# --- the FID Inception blocks (TensorFlow pooling), as in pytorch-fid's inception.py -------------------


class _FIDInceptionA(tv_inception.InceptionA):
    """InceptionA whose average pool ignores padded zeros (TensorFlow's behaviour)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b5, b3, bp], 1)


class _FIDInceptionC(tv_inception.InceptionC):
    """InceptionC whose average pool ignores padded zeros."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b7, bd, bp], 1)


class _FIDInceptionE(tv_inception.InceptionE):
    """InceptionE with TF pooling: average without padded zeros (Mixed_7b) or max pooling (Mixed_7c)."""

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__(in_channels)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


def build_inception(variant: str, aux_logits: bool = False) -> tv_inception.Inception3:
    """An untrained InceptionV3: ``"fid"`` (pytorch-fid's TF port, 1008 classes) or ``"torchvision"``."""
    if variant == "torchvision":
        return tv_inception.Inception3(num_classes=1000, aux_logits=aux_logits, transform_input=False,
                                       init_weights=False)
    if variant != "fid":
        raise FeatureNetworkError(f"unknown InceptionV3 variant {variant!r}; use fid or torchvision")
    net = tv_inception.Inception3(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False)
    net.Mixed_5b = _FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = _FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = _FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = _FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = _FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = _FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = _FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = _FIDInceptionE(1280, pool="avg")
    net.Mixed_7c = _FIDInceptionE(2048, pool="max")
    return net


def _pool3(net: tv_inception.Inception3, x: torch.Tensor) -> torch.Tensor:
    """InceptionV3 trunk up to the global average pool: ``(N, 3, 299, 299)`` in [-1, 1] -> ``(N, 2048)``."""
    x = net.Conv2d_1a_3x3(x)
    x = net.Conv2d_2a_3x3(x)
    x = net.Conv2d_2b_3x3(x)
    x = net.maxpool1(x)
    x = net.Conv2d_3b_1x1(x)
    x = net.Conv2d_4a_3x3(x)
    x = net.maxpool2(x)
    for block in (net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c,
                  net.Mixed_6d, net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c):
        x = block(x)
    return torch.flatten(net.avgpool(x), 1)


# --- weights files ------------------------------------------------------------------------------------


def weight_search_paths() -> list[Path]:
    """Where :func:`find_inception_weights` looks when no path is given (in order)."""
    dirs = [data_dir() / "weights", Path(torch.hub.get_dir()) / "checkpoints"]
    return [d / f for d in dirs for f in KNOWN_WEIGHT_FILES]


def missing_weights_message(searched: Iterable[Path] = ()) -> str:
    """How to get InceptionV3 weights (the one-line error the CLI prints)."""
    where = ", ".join(dict.fromkeys(str(Path(s).parent) for s in searched)) or "(none)"
    return (
        "FID/KID need InceptionV3 weights and Heist never downloads them at run time. Download "
        f"{FID_WEIGHTS_URL} (FID standard, as pytorch-fid) or {TORCHVISION_WEIGHTS_URL} (torchvision) and "
        f"pass --feature-weights PATH, set ${WEIGHTS_ENV}, or copy it into {data_dir() / 'weights'} "
        f"(searched: {where})"
    )


def find_inception_weights(path: str | os.PathLike[str] | None = None) -> Path:
    """The weights file to use: ``path``, ``$HEIST_INCEPTION_WEIGHTS``, or the first known file in the caches.

    Raises :class:`FeatureNetworkError` (with download advice) when none exists.
    """
    explicit = path or os.environ.get(WEIGHTS_ENV)
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise FeatureNetworkError(f"{p}: no such InceptionV3 weights file. " + missing_weights_message())
        return p
    searched = weight_search_paths()
    for p in searched:
        if p.is_file():
            return p
    raise FeatureNetworkError(missing_weights_message(searched))


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A tensor state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``).

    Accepts a plain ``{name: tensor}`` dict or one nested under ``"state_dict"``/``"model"``; a
    ``module.`` prefix (DataParallel) is removed. Anything else raises :class:`FeatureNetworkError`.
    """
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p))
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch/safetensors raise many types for bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FeatureNetworkError(
            f"{p}: not a loadable weights file (Heist loads state dicts only, never pickled code): {first}"
        ) from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FeatureNetworkError(f"{p}: expected a state dict of tensors (InceptionV3 weights)")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def detect_variant(state: Mapping[str, torch.Tensor]) -> str:
    """``"fid"`` (1008-class FID Inception) or ``"torchvision"`` (1000 classes) from ``fc.weight``."""
    fc = state.get("fc.weight")
    if fc is None or fc.ndim != 2 or fc.shape[1] != 2048:
        raise FeatureNetworkError("the weights are not an InceptionV3 state dict (no 2048-input fc.weight)")
    if fc.shape[0] == 1008:
        return "fid"
    if fc.shape[0] == 1000:
        return "torchvision"
    raise FeatureNetworkError(f"unknown InceptionV3 head with {fc.shape[0]} classes (expected 1008 or 1000)")


class InceptionV3Features(FeatureNetwork):
    """InceptionV3 pool3 features (2048-d) from a local weights file.

    ``variant`` ``"auto"`` detects the FID/torchvision variant from the file; naming one checks it.
    ``batch_size`` bounds memory (299x299 inputs). Features are returned as float64 on the CPU.
    """

    input_size = 299

    def __init__(
        self,
        weights: str | os.PathLike[str] | None = None,
        variant: str = "auto",
        device: str | torch.device = "cpu",
        batch_size: int = 16,
    ) -> None:
        path = find_inception_weights(weights)
        state = load_state_dict(path)
        found = detect_variant(state)
        if variant not in ("auto", found):
            raise FeatureNetworkError(f"{path}: holds {found} InceptionV3 weights, but {variant} was asked for")
        net = build_inception(found, aux_logits=any(k.startswith("AuxLogits.") for k in state))
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise FeatureNetworkError(f"{path}: weights do not fit InceptionV3 ({found}): {first}") from None
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)
        self.batch_size = max(1, batch_size)
        self.info = FeatureNetworkInfo(
            name=f"inception-v3-{found}", layer="pool3 (2048-d)", dim=2048, input_size=self.input_size,
            weights_file=path.name, weights_sha256=file_digest(path),
        )
        log.info("feature network: %s", self.info.label)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise FeatureNetworkError(f"InceptionV3 takes (N, 3, H, W) images, got {tuple(images.shape)}")
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start : start + self.batch_size].to(self.device, torch.float32).clamp(0, 1)
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
            out.append(_pool3(self.net, 2.0 * x - 1.0).double().cpu())
        return torch.cat(out, 0)


@FEATURE_NETWORKS.register("inception-v3")
def _inception_auto(weights: str | None = None, device: str = "cpu", batch_size: int = 16) -> FeatureNetwork:
    return InceptionV3Features(weights, "auto", device, batch_size)


@FEATURE_NETWORKS.register("inception-v3-fid")
def _inception_fid(weights: str | None = None, device: str = "cpu", batch_size: int = 16) -> FeatureNetwork:
    return InceptionV3Features(weights, "fid", device, batch_size)


@FEATURE_NETWORKS.register("inception-v3-torchvision")
def _inception_tv(weights: str | None = None, device: str = "cpu", batch_size: int = 16) -> FeatureNetwork:
    return InceptionV3Features(weights, "torchvision", device, batch_size)


# --- offline: a randomly initialised VGG16 (no weights file) ------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _params_sha256(module: torch.nn.Module) -> str:
    """sha256 over the names and float32 bytes of every parameter: identifies a random-init network."""
    h = hashlib.sha256()
    for name, p in module.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class RandomVGG16Features(FeatureNetwork):
    """fc2 features (4096-d, after its ReLU) of torchvision's VGG16 with random weights; nothing to download.

    The weights are torchvision's own initialisation (Kaiming-normal convolutions, N(0, 0.01) linear
    layers, zero biases) drawn under ``torch.manual_seed(seed)`` in a forked RNG (the caller's random
    state is untouched), so two builds with the same seed and torch version are identical; the info
    records the seed and a sha256 of the parameters to tell builds apart. The random-embedding idea
    and the fc2 layer follow Naeem et al. 2020 ("Reliable Fidelity and Diversity Metrics for
    Generative Models", ICML 2020). Preprocessing: bilinear resize (antialiased) to ``input_size``
    square, then ImageNet mean/std normalisation. ``input_size`` 64 keeps the CPU cost to about
    0.04 s per image on one core (224: about 0.6 s); the classifier's adaptive pool fixes the fc input
    at 7x7x512 for any size >= 32.
    """

    def __init__(self, seed: int = 0, input_size: int = 64, device: str | torch.device = "cpu",
                 batch_size: int = 16, name: str = OFFLINE_NETWORK) -> None:
        if input_size < 32:
            raise FeatureNetworkError(f"vgg16-random needs input_size >= 32 (five 2x poolings), got {input_size}")
        with seeded(seed):
            net = tv_vgg.vgg16(weights=None)
        net.classifier = net.classifier[:5]  # fc1, ReLU, Dropout, fc2, ReLU: drop the last dropout and fc3
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)
        self.input_size = input_size
        self.batch_size = max(1, batch_size)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self.info = FeatureNetworkInfo(name=name, layer="fc2 (4096-d)", dim=4096, input_size=input_size,
                                       weights_sha256=_params_sha256(net), init_seed=seed)
        log.info("feature network: %s", self.info.label)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise FeatureNetworkError(f"VGG16 takes (N, 3, H, W) images, got {tuple(images.shape)}")
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start : start + self.batch_size].to(self.device, torch.float32).clamp(0, 1)
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=True)
            x = (x - self._mean) / self._std
            f = self.net.avgpool(self.net.features(x)).flatten(1)
            out.append(self.net.classifier(f).double().cpu())
        return torch.cat(out, 0)


@FEATURE_NETWORKS.register(OFFLINE_NETWORK)
def _vgg16_random(weights: str | None = None, device: str = "cpu", batch_size: int = 16) -> FeatureNetwork:
    if weights:
        raise FeatureNetworkError(f"{OFFLINE_NETWORK} is randomly initialised and takes no weights file ({weights})")
    return RandomVGG16Features(seed=0, input_size=64, device=device, batch_size=batch_size)


@FEATURE_NETWORKS.register(f"{OFFLINE_NETWORK}-224")
def _vgg16_random_224(weights: str | None = None, device: str = "cpu", batch_size: int = 16) -> FeatureNetwork:
    """The same network at VGG's native 224 px (about 15x the CPU cost; for GPUs and large images)."""
    if weights:
        raise FeatureNetworkError(f"{OFFLINE_NETWORK}-224 is randomly initialised and takes no weights file")
    return RandomVGG16Features(seed=0, input_size=224, device=device, batch_size=batch_size,
                               name=f"{OFFLINE_NETWORK}-224")


def load_feature_network(
    name: str = "inception-v3", weights: str | os.PathLike[str] | None = None, device: str = "cpu",
    batch_size: int = 16,
) -> FeatureNetwork:
    """Build the feature network registered as ``name`` (weights from a local file or cache)."""
    try:
        factory = FEATURE_NETWORKS.get(name)
    except UnknownNameError as exc:
        raise FeatureNetworkError(str(exc)) from None
    return factory(weights=str(weights) if weights else None, device=device, batch_size=batch_size)


def extract_features(network: FeatureNetwork, images: Iterable[torch.Tensor]) -> np.ndarray:
    """Features ``(N, D)`` float64 of a stream of ``(n_i, 3, H_i, W_i)`` batches (sizes may vary)."""
    chunks = [network(x).numpy() for x in images]
    if not chunks:
        raise FeatureNetworkError("no images to extract features from")
    return np.concatenate(chunks, axis=0)


def resolve_feature_network(
    name: str | None = None, weights: str | os.PathLike[str] | None = None, device: str = "cpu",
    fallback: str = OFFLINE_NETWORK,
) -> FeatureNetwork | None:
    """The network for FID/KID/NKID, in order of preference.

    1. ``name`` given: that network (``"none"``: no network, returns None), with ``weights`` if given.
    2. ``weights`` given: InceptionV3 from that file (an error if it is unusable).
    3. InceptionV3 weights found by :func:`find_inception_weights` (``$HEIST_INCEPTION_WEIGHTS`` or the
       caches): InceptionV3, the network the papers' numbers use.
    4. Otherwise ``fallback`` (default ``vgg16-random``, no download; ``"none"``: no network).
    """
    if name == NO_NETWORK:
        return None
    if name:
        return load_feature_network(name, weights, device)
    if weights:
        return load_feature_network("inception-v3", weights, device)
    try:
        path = find_inception_weights()
    except FeatureNetworkError:
        if fallback == NO_NETWORK:
            return None
        log.info("no InceptionV3 weights found; using the offline feature network %s", fallback)
        return load_feature_network(fallback, None, device)
    return load_feature_network("inception-v3", path, device)
