"""Surrogate training on pairs from a known local function (no server here; see test_attack_e2e).

Each surrogate kind must lower held-out L2 and beat the trivial baseline; an interrupted run resumes
to bit-identical weights; checkpoints load with the Foundation loader; state is safetensors + JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from attacker.errors import ConfigError, RunFolderError, TrainingError
from attacker.fidelity import psnr_ssim_l2
from attacker.files import folder_lock
from attacker.pairstore import PairStore
from attacker.runinfo import read_run, update_run
from attacker.train import STRIPE_CONTEXT, BatchSource, PairSet, TrainConfig, split_pairs, train_surrogate
from translators.checkpoint import load_model
from translators.codecs import encode_image
from translators.corpus import PatchSampler, load_images
from translators.images import upscale


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def colour_blur(x: torch.Tensor) -> torch.Tensor:
    """A same-size 'victim': 3x3 blur, then a colour grade (channel mix + gamma)."""
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    y = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3).contiguous(), groups=3)
    mix = torch.tensor([[0.8, 0.2, 0.0], [0.1, 0.7, 0.2], [0.0, 0.3, 0.7]])
    return torch.einsum("ij,njhw->nihw", mix, y).clamp(0, 1) ** 0.8


def sharp_sr(x: torch.Tensor) -> torch.Tensor:
    """An x4 'victim': bicubic upscaling plus unsharp masking (differs from the bicubic baseline)."""
    up = upscale(x, 4)
    blur = F.avg_pool2d(F.pad(up, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    return (up + 2.0 * (up - blur)).clamp(0, 1)


def make_run(root: Path, fn, scale: int, n: int, side: int, task: str, seed: int = 0) -> Path:
    photos = [im.image for im in load_images("corpus:attacker", max_side=192)]
    sampler = PatchSampler(photos, side * scale, seed=seed)
    with PairStore(root / "pairs", durable=False).open() as st:
        for i in range(n):
            hr = sampler.crop()
            x = F.interpolate(hr, scale_factor=1 / scale, mode="bicubic", antialias=True).clamp(0, 1) \
                if scale > 1 else hr
            x = torch.round(x * 255) / 255
            y = fn(x)
            st.add_pair(i, encode_image(x), encode_image(y), source="synthetic", crop=None,
                        in_hw=list(x.shape[-2:]), out_hw=list(y.shape[-2:]))
    update_run(root, target={"url": "local", "model": task, "info": {"name": task, "task": task, "scale": scale}})
    return root


@pytest.mark.parametrize(("kind", "scale", "steps"), [("unet-l2", 1, 150), ("pix2pix", 1, 150), ("srresnet", 4, 200)])
def test_surrogate_lowers_held_out_l2_and_beats_the_baseline(tmp_path: Path, kind: str, scale: int, steps: int) -> None:
    fn = sharp_sr if scale > 1 else colour_blur
    task = "sr" if scale > 1 else "style"
    run = make_run(tmp_path / "run", fn, scale, n=24, side=32 if scale == 1 else 16, task=task)
    r = train_surrogate(run, arch=kind, profile="tiny", steps=steps, val_every=steps // 3)
    first, last = r.val_curve[0], r.val_curve[-1]
    assert last["l2"] < first["l2"]
    assert r.fidelity["l2"] < r.baseline["l2"]
    assert r.fidelity["psnr"] > r.baseline["psnr"] + 1.0
    assert r.held_out == "pairs"
    run_json = read_run(run)
    assert run_json["train"]["fidelity"]["psnr"] == pytest.approx(r.fidelity["psnr"])
    assert run_json["train"]["checkpoint"] == "surrogate/model.safetensors"
    loaded = load_model(r.checkpoint)
    assert loaded.card.scale == scale
    assert loaded.card.training["kind"] == kind
    x = torch.rand(1, 3, 16, 16)
    assert loaded.module(x).shape == (1, 3, 16 * scale, 16 * scale)


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_interrupted_training_resumes_to_identical_weights(tmp_path: Path, ema: float) -> None:
    """With and without the weight average (which is then checkpointed with the networks)."""
    run = make_run(tmp_path / "run", colour_blur, 1, n=6, side=32, task="style")
    common = {"arch": "pix2pix", "profile": "tiny", "steps": 12, "checkpoint_every": 4, "val_every": 6,
              "arch_kwargs": {"base": 8, "depth": 3}, "ema": ema}
    full = train_surrogate(run, tmp_path / "full", **common)

    class StopTrainingError(Exception):
        pass

    class StopAt:
        def __init__(self) -> None:
            self.n = 0

        def start(self, task: str, total: int | None, done: int = 0) -> None:
            self.n = done

        def advance(self, task: str, n: int = 1, info: str = "") -> None:
            self.n += n
            if self.n == 6:
                raise StopTrainingError

        def finish(self, task: str) -> None:
            pass

    with pytest.raises(StopTrainingError):
        train_surrogate(run, tmp_path / "split", progress=StopAt(), **common)
    state = tmp_path / "split" / "train_state"
    assert sorted(p.name for p in state.iterdir()) == ["state-00000004.safetensors", "state.json"]
    resumed = train_surrogate(run, tmp_path / "split", **common)
    a, b = load_file(str(full.checkpoint)), load_file(str(resumed.checkpoint))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.loss_curve == full.loss_curve


def test_weight_average_is_what_is_validated_and_kept(tmp_path: Path) -> None:
    """``ema > 0``: the checkpoint is the best *average* (it differs from the raw run's best weights), the
    validations score the average, and a decay of 0 behaves exactly as no average."""
    run = make_run(tmp_path / "run", colour_blur, 1, n=6, side=32, task="style")
    common = {"arch": "resunet", "profile": "tiny", "steps": 40, "val_every": 10, "seed": 3}
    plain = train_surrogate(run, tmp_path / "plain", **common)
    avg = train_surrogate(run, tmp_path / "avg", ema=0.9, **common)
    a, b = load_file(str(plain.checkpoint)), load_file(str(avg.checkpoint))
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert avg.loss_curve == plain.loss_curve  # the same training steps; only what is judged differs
    assert read_run(run)["train"]["ema"] == 0.9  # run.json records which weights were kept


def test_dataloader_workers_see_the_same_batches(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", colour_blur, 1, n=4, side=32, task="style")
    common = {"arch": "unet-l2", "profile": "tiny", "steps": 6, "arch_kwargs": {"base": 8, "depth": 3}}
    r0 = train_surrogate(run, tmp_path / "w0", workers=0, **common)
    r1 = train_surrogate(run, tmp_path / "w1", workers=1, **common)
    a, b = load_file(str(r0.checkpoint)), load_file(str(r1.checkpoint))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_pair_holds_out_a_region(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", colour_blur, 1, n=1, side=96, task="style")
    r = train_surrogate(run, arch="unet-l2", profile="tiny", steps=150)
    assert r.held_out == "region"
    assert r.summary["pairs_val"] == 1
    assert r.fidelity["l2"] < r.baseline["l2"]


def _pairset(n: int, h: int, w: int, scale: int = 1) -> PairSet:
    g = torch.Generator().manual_seed(n * 1000 + h + w)
    xs = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for _ in range(n)]
    ys = [torch.randint(0, 256, (3, scale * h, scale * w), generator=g, dtype=torch.uint8) for _ in range(n)]
    return PairSet([f"{i:06d}" for i in range(n)], xs, ys, scale)


def _coordinate_pairs(n: int, side: int, scale: int) -> PairSet:
    """Pairs whose channels 0 and 1 hold each pixel's row and column in input pixels (uint8)."""
    def grid(s: int) -> torch.Tensor:
        r = (torch.arange(side * s) // s).to(torch.uint8)
        return torch.stack([r.view(-1, 1).expand(-1, side * s), r.view(1, -1).expand(side * s, -1),
                            torch.zeros(side * s, side * s, dtype=torch.uint8)])
    return PairSet([f"{i:06d}" for i in range(n)], [grid(1)] * n, [grid(scale)] * n, scale)


@pytest.mark.parametrize("scale", [1, 2])
def test_training_crops_keep_the_victims_grid_and_orientation(scale: int) -> None:
    """Default batches: every crop starts at a multiple of ``align`` input pixels from the query's corner, its
    output crop is the same place, nothing is flipped or rotated; held-out centre crops are aligned too.
    ``align = 1`` with ``augment`` reaches other offsets and orientations (the old behaviour)."""
    cfg = TrainConfig()
    ps = _coordinate_pairs(4, 100, scale)
    src = BatchSource(ps, 24, 8, 0, 0, 40, cfg.augment, cfg.align)
    offsets = set()
    for k in range(len(src)):
        xs, ys = src[k]
        for x, y in zip(xs, ys, strict=True):
            t, le = int(x[0, 0, 0]), int(x[1, 0, 0])
            offsets.add((t % cfg.align, le % cfg.align))
            assert torch.equal(x[0, :, 0], torch.arange(t, t + 24, dtype=torch.uint8))  # rows in order
            assert torch.equal(x[1, 0, :], torch.arange(le, le + 24, dtype=torch.uint8))  # columns in order
            assert torch.equal(y[:2, ::scale, ::scale], x[:2])  # the output crop is the same place
    assert offsets == {(0, 0)}
    split = split_pairs(ps, TrainConfig(val_max_side=40), min_train_side=24)
    corner = split.val_inputs[0][0, :2, 0, 0].mul(255).round().long().tolist()
    assert corner == [24, 24]  # the centre crop would start at 30; aligned down to a multiple of 8
    old = BatchSource(ps, 24, 8, 0, 0, 40, True, 1)
    corners = [(int(x[0, 0, 0]) % 8, int(x[0, 1, 0]) - int(x[0, 0, 0])) for k in range(len(old)) for x in old[k][0]]
    assert len({c[0] for c in corners}) > 1  # offsets off the grid
    assert {c[1] for c in corners} != {1}  # and crops not in their original orientation


def test_stripes_hold_out_the_end_of_every_pair_scored_without_its_context() -> None:
    ps = _pairset(16, 64, 100, scale=2)
    assert split_pairs(ps, TrainConfig(), min_train_side=4).held_out == "pairs"  # the default
    stripes = TrainConfig(val_split="stripes")
    split = split_pairs(ps, stripes, min_train_side=4)
    assert split.held_out == "stripes"
    assert split.val_ids == ps.ids  # every photo is in the held-out score and in training
    assert len(split.train) == 16
    v = 16  # max(16, ceil(0.1 * 100)) input pixels of the longer side
    assert all(tuple(x.shape) == (3, 64, 100 - v) for x in split.train.inputs)
    assert all(tuple(y.shape) == (3, 128, 2 * (100 - v)) for y in split.train.outputs)
    for i, (x, y) in enumerate(zip(split.val_inputs, split.val_targets)):
        assert tuple(x.shape) == (1, 3, 64, v + STRIPE_CONTEXT)
        assert split.val_boxes[i] == (0, 2 * STRIPE_CONTEXT, 128, 2 * v)
        # the held-out target is the end of the photo's output, never in training
        assert torch.equal((y[0] * 255).round().to(torch.uint8), ps.outputs[i][..., -2 * (v + STRIPE_CONTEXT):])
        # a prediction wrong only on the context scores as perfect
        pred = y.clone()
        pred[..., : 2 * STRIPE_CONTEXT] = 1 - pred[..., : 2 * STRIPE_CONTEXT]
        assert psnr_ssim_l2(*split.scored(i, pred))["psnr"] == 80.0  # piq's (and evaluation's) identical-image PSNR
        assert psnr_ssim_l2(pred, y)["psnr"] < 40
    # tall pairs cut along their height
    tall = split_pairs(_pairset(8, 120, 40), stripes, min_train_side=4)
    assert tall.held_out == "stripes"
    assert tuple(tall.train.inputs[0].shape) == (3, 104, 40)
    # pairs too small for a stripe (32 px < 4 x 16): whole pairs
    assert split_pairs(_pairset(16, 32, 32), stripes, min_train_side=4).held_out == "pairs"


def test_sources_split_holds_out_whole_photos() -> None:
    """``val_split = "sources"``: every pair of the held-out photos leaves training (so held-out PSNR is
    on photos the surrogate never saw), scored pairs capped at ``max_val_pairs``; without sources, or with
    one photo only, whole pairs as before."""
    ps = _pairset(20, 32, 32)
    ps.sources = [f"photo{i % 4}" for i in range(20)]  # 5 pairs a photo
    cfg = TrainConfig(val_split="sources")
    split = split_pairs(ps, cfg, min_train_side=4)
    assert split.held_out == "sources"
    held = {ps.sources[ps.ids.index(i)] for i in split.val_ids}
    assert len(held) == 1  # 2 pairs wanted (10 % of 20): one photo gives 5
    assert len(split.val_ids) == 5
    assert not held & set(split.train.sources)
    assert len(split.train) == 15
    capped = split_pairs(ps, TrainConfig(val_split="sources", max_val_pairs=3), min_train_side=4)
    assert len(capped.val_ids) == 3
    assert len(capped.train) == 15  # the photo's other two pairs are neither scored nor trained on
    wide = split_pairs(ps, TrainConfig(val_split="sources", val_fraction=0.4), min_train_side=4)
    assert len(wide.val_ids) == 10  # 8 pairs wanted: two photos
    assert len(wide.train) == 10
    assert split_pairs(_pairset(20, 32, 32), cfg, min_train_side=4).held_out == "pairs"  # sources unknown
    one = _pairset(20, 32, 32)
    one.sources = ["photo"] * 20
    assert split_pairs(one, cfg, min_train_side=4).held_out == "pairs"


def test_a_harvest_records_the_source_photo_of_every_pair(tmp_path: Path) -> None:
    from attacker.train import load_pairs

    run = make_run(tmp_path / "run", colour_blur, 1, n=3, side=32, task="style")
    ps = load_pairs(run / "pairs")
    assert len(ps.sources) == len(ps) == 3
    assert all(isinstance(src, str) and src for src in ps.sources)


def test_changed_settings_refuse_to_resume(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", colour_blur, 1, n=3, side=32, task="style")
    kw = {"arch": "unet-l2", "profile": "tiny", "steps": 4, "arch_kwargs": {"base": 8, "depth": 3}}
    train_surrogate(run, **kw)
    with pytest.raises(TrainingError, match="--restart"):
        train_surrogate(run, seed=1, **kw)
    r = train_surrogate(run, seed=1, restart=True, **kw)
    assert r.steps == 4


def test_training_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", colour_blur, 1, n=2, side=16, task="style")
    with pytest.raises(ConfigError, match="srresnet is a super-resolution surrogate"):
        train_surrogate(run, arch="srresnet", profile="tiny", steps=2)
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        train_surrogate(run, arch="unet-l2", profile="huge")
    with pytest.raises(ConfigError, match="unknown surrogate 'gan'"):
        train_surrogate(run, arch="gan")
    with pytest.raises(TrainingError, match="needs crops of at least 32px"):
        train_surrogate(run, arch="unet-l2", profile="tiny", arch_kwargs={"depth": 5})
    with pytest.raises(TrainingError, match="no pairs here"):
        train_surrogate(tmp_path / "empty")
    with pytest.raises(ConfigError, match="bad training option steps"):
        train_surrogate(run, steps=0)
    with pytest.raises(ConfigError, match=r"names a folder \(the checkpoint is written as"):
        train_surrogate(run, tmp_path / "out" / "model.pt", arch="unet-l2", profile="tiny", steps=2)
    with pytest.raises(ConfigError, match="inside the pairs folder"):
        train_surrogate(run, run / "pairs", arch="unet-l2", profile="tiny", steps=2)
    assert not (tmp_path / "out").exists()
    assert not (run / "pairs" / "model.safetensors").exists()


def test_training_refuses_pairs_a_harvest_is_still_writing(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", colour_blur, 1, n=2, side=16, task="style")
    with folder_lock(run):  # what a running `heist attack harvest` holds on its run folder
        with pytest.raises(RunFolderError, match="a harvest is still writing to this run folder"):
            train_surrogate(run, arch="unet-l2", profile="tiny", steps=2)
        assert not (run / "surrogate" / "model.safetensors").exists()
    assert train_surrogate(run, arch="unet-l2", profile="tiny", steps=2).checkpoint.exists()  # once it is done


def test_cosine_schedule_decays_the_learning_rate_to_its_floor(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", colour_blur, 1, n=6, side=32, task="style")
    common = {"arch": "resunet", "profile": "tiny", "steps": 40, "val_every": 10, "time_budget": None}
    cos = train_surrogate(run, tmp_path / "cos", lr_floor=0.1, **common)
    lrs = [v["lr"] for v in cos.val_curve]
    lr0 = 2e-3  # the tiny resunet profile's rate
    assert lrs[0] == pytest.approx(lr0)
    assert lrs == sorted(lrs, reverse=True)
    # the rate set for step 20 of 40 (recorded at the step-20 validation) is half-way down the cosine
    mid = next(v["lr"] for v in cos.val_curve if v["step"] == 20)
    assert mid == pytest.approx(lr0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 19 / 40))), rel=1e-6)
    assert lrs[-1] < 0.12 * lr0
    flat = train_surrogate(run, tmp_path / "flat", schedule="plateau", **common)
    assert {v["lr"] for v in flat.val_curve} == {lr0}  # no plateau within 40 steps: constant
    with pytest.raises(ConfigError, match="lr_floor"):
        train_surrogate(run, tmp_path / "bad", lr_floor=0, **common)


def test_training_stops_on_a_plateau_of_held_out_psnr(tmp_path: Path) -> None:
    # targets unrelated to the inputs: after learning their mean, held-out PSNR cannot improve
    gen = torch.Generator().manual_seed(1)
    run = make_run(tmp_path / "run", lambda x: torch.rand(x.shape, generator=gen), 1, n=8, side=32, task="style")
    r = train_surrogate(run, arch="resunet", profile="tiny", steps=3000, val_every=5, patience=2, lr_drops=1,
                        time_budget=None)
    assert r.summary["stop_reason"] == "plateau"
    assert r.steps < 3000
    assert r.steps - r.summary["best_step"] >= 0.25 * r.steps  # the best is old, not just a few checks back
    assert [v["lr"] for v in r.val_curve][-1] < r.val_curve[0]["lr"] / 3  # dropped (and cosine-decayed) once
    again = train_surrogate(run, arch="resunet", profile="tiny", steps=3000, val_every=5, patience=2, lr_drops=1,
                            time_budget=None)  # the same command again: finished, nothing added
    assert again.steps == r.steps
    assert again.summary["stop_reason"] == "plateau"


def test_held_out_pairs_under_the_ssim_window_give_no_nan(tmp_path: Path) -> None:
    """8x8 pairs: SSIM (11 px window) is undefined; the summary says None and run.json holds no NaN."""
    run = make_run(tmp_path / "run", colour_blur, 1, n=10, side=8, task="style")
    r = train_surrogate(run, arch="resunet", profile="tiny", steps=4, val_every=2)
    assert r.fidelity["ssim"] is None
    assert r.baseline["ssim"] is None
    assert r.fidelity["psnr"] is not None
    assert all(v["ssim"] is None for v in r.val_curve)

    def refuse(name: str) -> None:
        raise AssertionError(f"run.json holds {name}")

    json.loads((run / "run.json").read_text(), parse_constant=refuse)
