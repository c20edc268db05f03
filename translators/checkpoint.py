"""Checkpoints: ``NAME.safetensors`` + ``NAME.json`` model card; TorchScript ``.pt`` and ``.pt2`` load too.

The card records what a server and an evaluator need to know: architecture and kwargs (to rebuild the
module), task, scale, input constraints and training provenance. Pickled files are never unpickled:
``.pt`` files must be TorchScript archives, and ``.pt2`` files ``torch.export`` programs; a plain
``torch.save`` pickle is refused with a clear error.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

from translators.archs.registry import build_arch
from translators.errors import CheckpointError, first_problem
from translators.files import atomic_write_bytes
from translators.registry import UnknownNameError


class ModelCard(BaseModel):
    """The JSON card beside a safetensors checkpoint.

    ``scale`` is the output/input size ratio (4 for x4 SR, 1 otherwise). ``size_multiple`` is what
    input sides must be a multiple of; ``min_side`` the smallest input side the model accepts.
    """

    model_config = ConfigDict(extra="allow")

    name: str
    arch: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    task: str = "translation"
    scale: int = Field(1, ge=1)
    in_channels: int = Field(3, ge=1)
    out_channels: int = Field(3, ge=1)
    size_multiple: int = Field(1, ge=1)
    min_side: int = Field(8, ge=1)
    description: str = ""
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    format_version: int = 1


class LoadedModel:
    """A module ready for inference plus what is known about it."""

    def __init__(self, module: nn.Module, card: ModelCard, source: Path, kind: str) -> None:
        self.module = module
        self.card = card
        self.source = source
        self.kind = kind  # "safetensors" | "torchscript" | "export"

    @property
    def name(self) -> str:
        return self.card.name


def save_checkpoint(module: nn.Module, path: str | os.PathLike[str], card: ModelCard) -> Path:
    """Write ``path`` (``.safetensors``) and its ``.json`` card atomically. Returns the weights path.

    Raises :class:`CheckpointError` if the card's ``scale``/``size_multiple`` contradict ``module``.
    """
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p.with_suffix(".safetensors")
    _check_card_matches(p, card, module)  # never write a card that load_model would refuse
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write_bytes(p, save_safetensors(state, metadata={"arch": card.arch, "name": card.name}))
    atomic_write_bytes(p.with_suffix(".json"), card.model_dump_json(indent=2).encode())
    return p


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    p = Path(path).with_suffix(".json")
    try:
        return ModelCard.model_validate_json(p.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{p}: model card missing (every .safetensors needs a .json card beside it)") from None
    except (ValidationError, ValueError) as exc:
        raise CheckpointError(f"{p}: invalid model card ({first_problem(exc)})") from None


def _is_pickle(p: Path) -> bool:
    """True for files ``torch.save`` wrote (a zip with ``data.pkl`` and no TorchScript code, or raw pickle)."""
    with open(p, "rb") as fh:
        head = fh.read(4)
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode
        return True
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return False
        has_code = any("/code/" in n or n.endswith(".py") for n in names)
        has_export = any("serialized_exported_program" in n or "/models/" in n for n in names)
        return any(n.endswith("data.pkl") for n in names) and not has_code and not has_export
    return False


def _probe_forward(module: nn.Module, name: str, h: int, w: int) -> torch.Tensor:
    """``module`` on one ``(1, 3, h, w)`` random probe; refuses a failing forward, an output that is not
    ``(1, 3, H', W')`` and non-finite outputs (NaN weights answer black images otherwise)."""
    with torch.inference_mode():
        try:
            y = module(torch.rand(1, 3, h, w))
        except Exception as exc:  # noqa: BLE001 - any failure means the probe failed
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{name}: probe forward on a (1, 3, {h}, {w}) input failed: {msg}") from None
    if not isinstance(y, torch.Tensor) or y.ndim != 4 or y.shape[:2] != (1, 3):
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise CheckpointError(f"{name}: the model must map (N, 3, H, W) to (N, 3, sH, sW); a (1, 3, {h}, {w}) "
                              f"probe gave {got}")
    if not bool(torch.isfinite(y).all()):
        raise CheckpointError(f"{name}: the model's output on a probe holds NaN or infinity (corrupt weights?)")
    return y


def _probe_card(module: nn.Module, name: str, kind: str, fixed: tuple[int, int] | None = None) -> ModelCard:
    """Infer scale from a forward pass on a probe (models with no card).

    ``fixed`` is the only input size a static ``torch.export`` program accepts; else a 32x32 probe.
    """
    h, w = fixed or (32, 32)
    y = _probe_forward(module, name, h, w)
    scale = y.shape[-1] // w
    if scale < 1 or y.shape[-1] != w * scale or y.shape[-2] != h * scale:
        raise CheckpointError(f"{name}: output {tuple(y.shape)} is not an integer upscaling of the input")
    extra: dict[str, Any] = {"fixed_size": [h, w]} if fixed else {}
    return ModelCard(name=name, arch=kind, scale=scale, task="sr" if scale > 1 else "translation",
                     description=f"{kind} model; scale inferred by probe", **extra)


def _check_card_by_probe(p: Path, card: ModelCard, module: nn.Module, fixed: tuple[int, int] | None) -> None:
    """A TorchScript or export model's sidecar card against one forward pass: the output must be the card's
    ``scale`` times the input and finite. (Safetensors cards are checked against the architecture instead.)"""
    if fixed is not None:
        h, w = fixed
    else:
        m = card.size_multiple
        h = w = -(-max(32, card.min_side) // m) * m
    y = _probe_forward(module, str(p), h, w)
    if tuple(y.shape[-2:]) != (h * card.scale, w * card.scale):
        raise CheckpointError(f"{p}: card says scale={card.scale} but the model maps a {h}x{w} probe to "
                              f"{y.shape[-2]}x{y.shape[-1]}")


def _check_weights(p: Path, state: dict[str, torch.Tensor], module: nn.Module) -> None:
    """Refuse stored tensors that ``load_state_dict`` would silently cast into garbage (integers into
    float parameters) and non-finite floating-point weights."""
    targets = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    for key, t in state.items():
        target = targets.get(key)
        if target is None or not target.is_floating_point():
            continue
        if not t.is_floating_point():
            raise CheckpointError(f"{p}: tensor {key!r} is stored as {str(t.dtype).removeprefix('torch.')}; "
                                  "the model needs floating-point weights")
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{p}: tensor {key!r} holds NaN or infinity (corrupt weights)")


def _check_card_matches(p: Path, card: ModelCard, module: nn.Module) -> None:
    """Refuse a card whose ``scale``/``size_multiple`` contradict the architecture it describes.

    A server trusts the card to validate inputs, so a card claiming ``scale=1`` for an x4 SRResNet (or
    ``size_multiple=1`` for a depth-4 U-Net) would produce wrong-sized outputs or crash on valid-looking
    inputs. Architectures expose ``scale`` and ``size_multiple`` attributes (see :mod:`translators.archs`).
    """
    scale = getattr(module, "scale", None)
    if isinstance(scale, int) and scale != card.scale:
        raise CheckpointError(f"{p}: card says scale={card.scale} but the {card.arch} architecture has scale={scale}")
    multiple = getattr(module, "size_multiple", None)
    if isinstance(multiple, int) and multiple > 1 and card.size_multiple % multiple:
        raise CheckpointError(
            f"{p}: card says size_multiple={card.size_multiple} but the {card.arch} architecture needs input "
            f"sides that are multiples of {multiple}"
        )


def _export_static_shape(program: Any) -> tuple[int | None, tuple[int, int] | None]:
    """(batch, (H, W)) of the first user input of a ``torch.export`` program, each None where the export
    left that dimension dynamic (``torch.export.export`` makes every dimension static unless told)."""
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            shape = getattr(node.meta.get("val"), "shape", None)
            if shape is None or len(shape) != 4:
                return None, None
            batch = int(shape[0]) if isinstance(shape[0], int) else None
            size = (int(shape[-2]), int(shape[-1])) if all(isinstance(d, int) for d in shape[-2:]) else None
            return batch, size
    return None, None


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint for inference (``eval()`` mode) on ``device``.

    Accepts ``NAME.safetensors`` (+ ``NAME.json``), TorchScript ``.pt``/``.ts``, and ``torch.export``
    ``.pt2``. For TorchScript and export files a sidecar ``NAME.json`` card is used when present,
    else the scale is inferred from a probe forward. Raises :class:`CheckpointError` on any problem.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file")
    name = p.stem
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        card = read_card(p)
        try:
            module = build_arch(card.arch, card.kwargs)
        except (UnknownNameError, TypeError, ValueError, RuntimeError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{p}: card describes an unbuildable model: {msg}") from None
        try:
            state = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{p}: corrupt safetensors file ({exc})") from None
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            # The first line only names the class; the details (missing/unexpected keys, size mismatches) follow.
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            msg = " ".join(lines[1:] or lines)
            msg = msg if len(msg) <= 300 else msg[:297] + "..."
            raise CheckpointError(f"{p}: weights do not match the card's architecture ({msg})") from None
        _check_weights(p, state, module)
        _check_card_matches(p, card, module)
        module.eval().to(device)
        return LoadedModel(module, card, p, "safetensors")
    if suffix in (".pt", ".ts", ".pth", ".pt2"):
        if _is_pickle(p):
            raise CheckpointError(
                f"{p}: this is a pickled torch.save file; Heist never unpickles untrusted files. "
                "Export it with torch.jit.script/trace (.pt), torch.export (.pt2) or save weights as safetensors."
            )
        module: nn.Module
        fixed: tuple[int, int] | None = None
        batch: int | None = None
        if suffix == ".pt2":
            try:
                program = torch.export.load(str(p))
                module = program.module()
                batch, fixed = _export_static_shape(program)
            except Exception as exc:  # noqa: BLE001 - torch raises many types for bad archives
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise CheckpointError(f"{p}: not a loadable torch.export program ({msg})") from None
            if batch not in (None, 1):
                raise CheckpointError(f"{p}: exported for batches of exactly {batch}; export with a (1, 3, H, W) "
                                      "example input, or a dynamic batch dimension")
            kind = "export"
        else:
            try:
                module = torch.jit.load(str(p), map_location="cpu")
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(f"{p}: not a loadable TorchScript archive ({str(exc).splitlines()[0]})") from None
            kind = "torchscript"
            module.eval()  # before the probe, so BatchNorm statistics are not updated by it
        card_path = p.with_suffix(".json")
        if card_path.exists():
            card = read_card(card_path)
            _check_card_by_probe(p, card, module, fixed)
            if fixed is not None:
                card = ModelCard(**{**card.model_dump(), "fixed_size": list(fixed)})
        else:
            card = _probe_card(module, name, kind, fixed)
        if batch == 1:  # one image per forward: the server must not batch requests
            card = ModelCard(**{**card.model_dump(), "fixed_batch": 1})
        module.to(device)
        return LoadedModel(module, card, p, kind)
    raise CheckpointError(f"{p}: unknown model file type {suffix!r}; use .safetensors (+ .json), .pt or .pt2")


def find_models(folder: str | os.PathLike[str]) -> list[Path]:
    """Model files in ``folder`` that :func:`load_model` would try (sorted, cards excluded)."""
    d = Path(folder)
    if not d.is_dir():
        raise CheckpointError(f"{d}: {'not a directory' if d.exists() else 'no such directory'}")
    exts = {".safetensors", ".pt", ".ts", ".pth", ".pt2"}
    return sorted(f for f in d.iterdir() if f.suffix.lower() in exts and not f.name.startswith(".") and f.is_file())


def card_dict(card: ModelCard) -> dict[str, Any]:
    return json.loads(card.model_dump_json())
