"""Checkpoints: safetensors + card, TorchScript and torch.export round trips; pickles refused; clear errors."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from translators.archs import DnCNN, SRResNet, UNetGenerator, build_arch
from translators.checkpoint import ModelCard, card_dict, find_models, load_model, read_card, save_checkpoint
from translators.errors import CheckpointError

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
]


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _trained_like(model: nn.Module) -> nn.Module:
    """Give every parameter and BatchNorm buffer non-default values, as after training."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    return model.eval()


def _card(name: str, arch: str, kwargs: dict[str, object], **extra: object) -> ModelCard:
    return ModelCard(name=name, arch=arch, kwargs=kwargs, **extra)


# --- round trips -------------------------------------------------------------------------------------


def test_safetensors_round_trip_is_exact(tmp_path: Path) -> None:
    kwargs = {"base": 8, "depth": 3, "max_channels": 16}
    model = _trained_like(UNetGenerator(**kwargs))
    card = _card("u", "unet", kwargs, task="style", size_multiple=8, min_side=8,
                 training={"steps": 3, "seed": 0}, metrics={"psnr": 30.5}, dataset="corpus:victim")
    path = save_checkpoint(model, tmp_path / "u", card)
    assert path == tmp_path / "u.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.json", "u.safetensors"], "no temp files left"
    loaded = load_model(path)
    assert loaded.kind == "safetensors"
    assert loaded.name == "u"
    assert not loaded.module.training
    assert card_dict(loaded.card) == card_dict(card)
    assert loaded.card.model_extra == {"dataset": "corpus:victim"}
    x = _rand(2, 3, 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model(x), rtol=0, atol=0)


def test_torchscript_round_trip_and_probed_card(tmp_path: Path) -> None:
    model = _trained_like(SRResNet(channels=8, n_blocks=1))
    torch.jit.script(model).save(str(tmp_path / "sr.pt"))
    loaded = load_model(tmp_path / "sr.pt")
    assert loaded.kind == "torchscript"
    assert (loaded.card.scale, loaded.card.task, loaded.card.arch) == (4, "sr", "torchscript")
    x = _rand(1, 3, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model(x), rtol=0, atol=0)
    # A sidecar card wins over the probe.
    (tmp_path / "sr.json").write_text(_card("sr", "srresnet", {}, scale=4, task="sr", description="mine")
                                      .model_dump_json())
    assert load_model(tmp_path / "sr.pt").card.description == "mine"


def test_torchscript_in_train_mode_is_loaded_in_eval_mode_without_touching_batchnorm(tmp_path: Path) -> None:
    model = _trained_like(DnCNN(channels=8, depth=4, batch_norm=True))
    scripted = torch.jit.script(model.train())
    scripted.save(str(tmp_path / "d.pt"))
    loaded = load_model(tmp_path / "d.pt")
    assert not loaded.module.training
    x = _rand(1, 3, 16, 16)
    with torch.no_grad():
        # Had the probe forward run in train mode, it would have updated the running statistics.
        torch.testing.assert_close(loaded.module(x), model.eval()(x), rtol=0, atol=0)


def test_torch_export_round_trip_with_static_shape(tmp_path: Path) -> None:
    model = _trained_like(SRResNet(scale=2, channels=8, n_blocks=1))
    x = _rand(1, 3, 12, 10)
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "sr2.pt2"))
    loaded = load_model(tmp_path / "sr2.pt2")
    assert loaded.kind == "export"
    assert loaded.card.scale == 2
    assert loaded.card.model_extra == {"fixed_size": [12, 10], "fixed_batch": 1}, "the program's only input shape"
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model(x), rtol=0, atol=0)
    # a sidecar card gets the static shape too (the server must neither resize nor batch)
    (tmp_path / "sr2.json").write_text(_card("sr2", "export", {}, scale=2).model_dump_json())
    assert load_model(tmp_path / "sr2.pt2").card.model_extra == {"fixed_size": [12, 10], "fixed_batch": 1}
    torch.export.save(torch.export.export(model, (_rand(2, 3, 12, 10),)), str(tmp_path / "b2.pt2"))
    with pytest.raises(CheckpointError, match="exported for batches of exactly 2"):
        load_model(tmp_path / "b2.pt2")


def test_a_sidecar_card_is_checked_by_a_probe_forward(tmp_path: Path) -> None:
    """A TorchScript x4 model with a card saying scale 1 loaded, and a server then answered every request
    with a 500 (its output did not match the card)."""
    torch.jit.script(_trained_like(SRResNet(channels=4, n_blocks=1))).save(str(tmp_path / "m.pt"))
    (tmp_path / "m.json").write_text(_card("m", "torchscript", {}, scale=1).model_dump_json())
    with pytest.raises(CheckpointError, match=r"card says scale=1 but the model maps a 32x32 probe to 128x128"):
        load_model(tmp_path / "m.pt")
    (tmp_path / "m.json").write_text(_card("m", "torchscript", {}, scale=4, task="sr").model_dump_json())
    assert load_model(tmp_path / "m.pt").card.scale == 4


def test_weights_that_would_serve_garbage_are_refused(dncnn_ckpt: Path) -> None:
    """NaN weights served black images and int32 weights were cast to (mostly) zeros, both with 200."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(dncnn_ckpt))
    key = next(k for k, v in state.items() if v.is_floating_point())
    save_file({**state, key: torch.full_like(state[key], float("nan"))}, str(dncnn_ckpt))
    with pytest.raises(CheckpointError, match=f"tensor '{key}' holds NaN or infinity"):
        load_model(dncnn_ckpt)
    save_file({**state, key: state[key].to(torch.int32)}, str(dncnn_ckpt))
    with pytest.raises(CheckpointError, match=f"tensor '{key}' is stored as int32"):
        load_model(dncnn_ckpt)
    save_file({**state, key: state[key].half()}, str(dncnn_ckpt))  # a lossless-enough float cast is fine
    load_model(dncnn_ckpt)
    nan_ts = DnCNN(channels=4, depth=2)
    with torch.no_grad():
        next(nan_ts.parameters()).fill_(float("nan"))
    torch.jit.script(nan_ts).save(str(dncnn_ckpt.with_name("n.pt")))
    with pytest.raises(CheckpointError, match="output on a probe holds NaN"):
        load_model(dncnn_ckpt.with_name("n.pt"))


def test_find_models(tmp_path: Path) -> None:
    save_checkpoint(DnCNN(channels=4, depth=2), tmp_path / "b.safetensors", _card("b", "dncnn", {"channels": 4,
                                                                                                  "depth": 2}))
    torch.jit.script(DnCNN(channels=4, depth=2)).save(str(tmp_path / "a.pt"))
    (tmp_path / ".c.safetensors.tmp").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "old.pth").write_bytes(b"")  # listed, so that loading it says pickles are refused
    assert [p.name for p in find_models(tmp_path)] == ["a.pt", "b.safetensors", "old.pth"]
    with pytest.raises(CheckpointError, match="no such directory"):
        find_models(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a directory"):
        find_models(tmp_path / "notes.txt")


# --- pickles are never unpickled --------------------------------------------------------------------------


class _Trap:
    """Unpickling this touches a file: proof that the loader ran pickle code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("how", ["torch.save-module", "torch.save-state", "pickle-protocol-4", "pickle-protocol-0"])
def test_pickles_are_refused_and_never_executed(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / ("m.pth" if how == "torch.save-state" else "m.pt")
    if how == "torch.save-module":
        torch.save({"model": DnCNN(channels=4, depth=2), "trap": _Trap(marker)}, path)
    elif how == "torch.save-state":
        torch.save({**DnCNN(channels=4, depth=2).state_dict(), "trap": _Trap(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Trap(marker), protocol=int(how[-1])))
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    if how != "pickle-protocol-0":  # protocol 0 has no magic byte; it is simply not a TorchScript archive
        assert "Heist never unpickles untrusted files" in str(info.value)
    assert not marker.exists(), "the pickle payload must not run"
    # The safe path: the same file was never needed; loading via safetensors would be the alternative.


# --- corrupt files and mismatched cards -----------------------------------------------------------------------


@pytest.fixture
def dncnn_ckpt(tmp_path: Path) -> Path:
    return save_checkpoint(DnCNN(channels=8, depth=3), tmp_path / "d.safetensors",
                           _card("d", "dncnn", {"channels": 8, "depth": 3}))


def _edit_card(path: Path, **changes: object) -> None:
    card_path = path.with_suffix(".json")
    data = json.loads(card_path.read_text())
    data.update(changes)
    card_path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"arch": "unet", "kwargs": {"base": 8, "depth": 2}},
         r"weights do not match the card's architecture \(Missing key\(s\)"),
        ({"kwargs": {"channels": 16, "depth": 3}}, r"weights do not match .*size mismatch for body\.0\.weight"),
        ({"kwargs": {"channels": 8, "depth": 4}}, r"Missing key\(s\) in state_dict: \"body\.6\.weight"),
        ({"arch": "vgg"}, r"card describes an unbuildable model: unknown architecture 'vgg'"),
        ({"kwargs": {"chanels": 8}}, r"card describes an unbuildable model: bad arguments for architecture 'dncnn'"),
        ({"kwargs": {"depth": 1}}, r"card describes an unbuildable model: depth must be >= 2"),
        ({"scale": 4}, r"card says scale=4 but the dncnn architecture has scale=1"),
        ({"scale": "four"}, r"invalid model card \(scale: Input should be a valid integer"),
        ({"arch": None}, r"invalid model card \(arch: Input should be a valid string"),
        ({"min_side": 0}, r"invalid model card \(min_side: Input should be greater than or equal to 1"),
        ({"size_multiple": -4}, r"invalid model card \(size_multiple: Input should be greater than or equal to 1"),
        ({"kwargs": {"channels": -3, "depth": 3}}, r"card describes an unbuildable model: .*negative dimension"),
    ],
)
def test_mismatched_cards_are_clear_errors(dncnn_ckpt: Path, change: dict[str, object], message: str) -> None:
    _edit_card(dncnn_ckpt, **change)
    with pytest.raises(CheckpointError, match=message):
        load_model(dncnn_ckpt)


def test_card_size_multiple_must_suit_the_architecture(tmp_path: Path) -> None:
    kwargs = {"base": 4, "depth": 3}
    with pytest.raises(CheckpointError, match=r"card says size_multiple=4 but .* multiples of 8"):
        save_checkpoint(UNetGenerator(**kwargs), tmp_path / "u", _card("u", "unet", kwargs, size_multiple=4))
    assert list(tmp_path.iterdir()) == [], "nothing is written for a bad card"
    path = save_checkpoint(UNetGenerator(**kwargs), tmp_path / "u", _card("u", "unet", kwargs, size_multiple=16))
    assert load_model(path).card.size_multiple == 16  # stricter than needed is fine
    _edit_card(path, size_multiple=4)
    with pytest.raises(CheckpointError, match=r"card says size_multiple=4 but .* multiples of 8"):
        load_model(path)
    with pytest.raises(CheckpointError, match="card says scale=1 but the srresnet architecture has scale=4"):
        save_checkpoint(SRResNet(channels=4, n_blocks=1), tmp_path / "sr", _card("sr", "srresnet", {}))


def test_missing_and_broken_cards(dncnn_ckpt: Path) -> None:
    card_path = dncnn_ckpt.with_suffix(".json")
    card_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid model card"):
        load_model(dncnn_ckpt)
    card_path.write_text(json.dumps({"name": "d"}))
    with pytest.raises(CheckpointError, match=r"invalid model card \(arch: Field required\)"):
        read_card(dncnn_ckpt)
    card_path.unlink()
    with pytest.raises(CheckpointError, match="model card missing"):
        load_model(dncnn_ckpt)


def test_corrupt_weight_files(dncnn_ckpt: Path, tmp_path: Path) -> None:
    data = dncnn_ckpt.read_bytes()
    dncnn_ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt safetensors file"):
        load_model(dncnn_ckpt)
    dncnn_ckpt.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt safetensors file"):
        load_model(dncnn_ckpt)

    scripted = tmp_path / "s.pt"
    torch.jit.script(DnCNN(channels=4, depth=2)).save(str(scripted))
    raw = scripted.read_bytes()
    scripted.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="not a loadable TorchScript archive"):
        load_model(scripted)
    (tmp_path / "e.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a loadable TorchScript archive"):
        load_model(tmp_path / "e.pt")
    with zipfile.ZipFile(tmp_path / "z.pt2", "w") as zf:
        zf.writestr("archive/readme.txt", "not a program")
    with pytest.raises(CheckpointError, match=r"not a loadable torch\.export program"):
        load_model(tmp_path / "z.pt2")


def test_other_load_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nothing.safetensors")
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"unknown model file type '\.onnx'"):
        load_model(tmp_path / "m.onnx")

    class OneChannel(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :1]

    torch.jit.script(OneChannel()).save(str(tmp_path / "gray.pt"))
    with pytest.raises(CheckpointError, match=r"must map \(N, 3, H, W\) to \(N, 3, sH, sW\)"):
        load_model(tmp_path / "gray.pt")


def test_built_models_match_saved_kwargs(tmp_path: Path) -> None:
    """Every registered generator survives a save/load through its card's kwargs."""
    for arch, kwargs, hw in [("resnet", {"base": 4, "n_blocks": 1}, (8, 12)),
                             ("srresnet", {"channels": 4, "n_blocks": 1, "batch_norm": True}, (5, 6))]:
        model = _trained_like(build_arch(arch, kwargs))
        card = _card(arch, arch, kwargs, scale=model.scale, size_multiple=model.size_multiple)
        path = save_checkpoint(model, tmp_path / arch, card)
        x = _rand(1, 3, *hw)
        with torch.no_grad():
            torch.testing.assert_close(load_model(path).module(x), model(x), rtol=0, atol=0)
