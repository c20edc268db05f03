"""Resumable training state without pickle: tensors in safetensors, everything else in JSON.

``train_state/state.json`` is the commit marker. A save writes ``state-STEP.safetensors`` (networks,
optimiser moments, torch RNG states) atomically, then ``state.json`` (step, optimiser hyper-parameters,
GradScaler state, curves, settings fingerprint) atomically, and only then deletes older tensor files.
A kill at any point leaves either the old or the new state complete.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

from attacker.errors import TrainingError
from attacker.files import read_json
from translators.files import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


def _optimizer_flat(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state dict into tensors (safetensors) and JSON (param groups, scalars)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_load(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor],
                    meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if not key.startswith(prefix + "."):
            continue
        pid, name = key[len(prefix) + 1 :].split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for pid, sc in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(sc)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_state(
    folder: Path, step: int, networks: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
    scaler: torch.amp.GradScaler, info: dict[str, Any],
) -> None:
    """Write a complete training state for ``step`` (see module docstring for the write order)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, net in networks.items():
        for k, v in net.state_dict().items():
            tensors[f"net.{name}.{k}"] = v.detach().cpu().contiguous()
    opt_meta: dict[str, Any] = {}
    for name, opt in optimizers.items():
        t, m = _optimizer_flat(opt, f"opt.{name}")
        tensors.update(t)
        opt_meta[name] = m
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    fname = f"state-{step:08d}.safetensors"
    atomic_write_bytes(folder / fname, save_safetensors(tensors))
    atomic_write_json(folder / "state.json", {
        "step": step, "tensors": fname, "optimizers": opt_meta, "scaler": scaler.state_dict(), **info,
    })
    for old in folder.glob("state-*.safetensors"):
        if old.name != fname:
            old.unlink(missing_ok=True)


def load_state(
    folder: Path, networks: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
    scaler: torch.amp.GradScaler,
) -> dict[str, Any]:
    """Restore networks, optimisers, scaler and RNG from ``folder``; returns the JSON part (with ``step``)."""
    meta = read_json(folder / "state.json")
    if meta is None:
        raise TrainingError(f"{folder}: no state.json")
    path = folder / str(meta.get("tensors", ""))
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TrainingError(f"{path}: training state unreadable ({exc}); pass --restart to start over") from None
    try:
        for name, net in networks.items():
            pre = f"net.{name}."
            net.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}, strict=True)
        for name, opt in optimizers.items():
            _optimizer_load(opt, f"opt.{name}", tensors, meta["optimizers"][name])
    except (RuntimeError, KeyError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TrainingError(f"{folder}: training state does not match this surrogate ({msg}); "
                            "pass --restart to start over") from None
    scaler.load_state_dict(meta.get("scaler") or {})
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return meta


def fingerprint(obj: Any) -> str:
    """Stable JSON text of the settings that must match for a resume."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
