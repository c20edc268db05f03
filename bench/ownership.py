"""Benchmark + measurement: the ownership watermark's cost and its theft-detection power.

Part ``cost`` (``--part cost``): per image of ``--side`` px, the clean victim's forward (the baseline) and
the ``ownership_watermark`` embed, in ms (median over repeats; CUDA synchronised with ``--device cuda``),
their ratio, and the wall time of one verification (``--queries`` probes; suspect = the clean victim run
locally, so the time is the verifier's own: two forwards + the regression per probe), with and without the
JPEG nuisances (three JPEG round trips and regressions more per probe; their ratio in the same run).

Part ``theft`` (``--part theft``): one zoo victim (tiny), 64 harvested pairs (``--crop`` px crops of the
attacker split; outputs = victim + watermark, 8-bit PNG round trip, exactly what the API serves), and:

- thieves: ``heist attack train`` kinds (``unet-l2``, ``pix2pix``; ``srresnet`` for SR victims), trained by
  ``attacker.train.train_surrogate`` (dihedral augmentation on, crops at any offset), and a plain L2 loop written
  here (flips only);
- counter-measures: ``none``; ``jpeg75`` (harvested outputs re-encoded as JPEG 75 before training);
  ``rescale`` (each pair also added at 0.5x and 0.75x, random crops of them, i.e. scale + crop augmentation
  on top of flips/rotations); ``finetune`` (plain loop only: the last 10% of the steps on clean outputs);
- innocent models: surrogates of the undefended victim (each kind), plain loops on ground truth, the clean
  victim itself, other zoo models, untrained tiny networks: p-values and false claims (p < 0.01);
- honest-user cost: PSNR/SSIM of marked vs clean outputs on the benchmark split (8-bit).

Part ``survival`` (``--part survival``): how much of the mark a JPEG re-encode (``--survival-quality``)
keeps, per YCbCr component, over the keys of ``--survival-keys`` secrets (seconds).

Key options (all parts): ``--colour rgb|luma|split``, ``--whiten``, ``--luma-share``, ``--radius``,
``--scales``, ``--carrier``; ``--secret`` draws another key (the spread over keys is large).

Run (CPU, ~10-20 min on a quiet 2-core box):
``.venv/bin/python bench/ownership.py --part all [--victim denoise25] [--device cuda]``;
prints JSON and writes ``bench/results/ownership[-VICTIM].json``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import device as device_arg
from _common import exit_on_sigterm

from attacker.pairstore import PairStore
from attacker.runinfo import update_run
from attacker.train import train_surrogate
from defenses import DefenseContext, build_defense, request_rng
from defenses.watermark.ownership import OwnershipParams, embed, ownership_key
from evaluation.metrics import psnr, ssim
from evaluation.watermark import KEPT_JPEG, Probe, load_probes, module_translator, verify_ownership
from translators.checkpoint import load_model
from translators.codecs import decode_image, encode_image
from translators.corpus import load_images
from translators.images import quantize_8bit
from translators.zoo import build, get_recipe

log = logging.getLogger("bench.ownership")
SECRET = 20261130


def _q(x: torch.Tensor) -> torch.Tensor:
    return quantize_8bit(x)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn: Any, dev: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def part_cost(victim: nn.Module, dev: torch.device, side: int, repeats: int, queries: int,
              params: OwnershipParams) -> dict[str, Any]:
    victim = victim.to(dev)
    x = load_probes("corpus:benchmark", 1, side, 16)[0].image.to(dev)
    with torch.no_grad():
        y = victim(x)
    d = build_defense({"name": "ownership_watermark", **params.model_dump()})
    d.setup(dev)
    ctx = DefenseContext("bench", "r", "m", "t", request_rng(0), secret=SECRET)
    with torch.no_grad():
        d.apply(y, x, ctx)  # warm-up (key, kernels)
        fwd = _timed(lambda: victim(x), dev, repeats)
        emb = _timed(lambda: d.apply(y, x, ctx), dev, repeats)
    probes = load_probes("corpus:benchmark", queries, side, 16)
    cpu_victim = module_translator(victim.cpu())
    t0 = time.perf_counter()
    verify_ownership(cpu_victim, cpu_victim, probes, SECRET, params, nuisance_jpeg=())
    wall_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = verify_ownership(cpu_victim, cpu_victim, probes, SECRET, params)
    wall = time.perf_counter() - t0
    key = ownership_key(SECRET, params)
    ps, ss = [], []
    with torch.no_grad():
        for p in probes:
            yc = cpu_victim(p.image)
            m = _q(embed(yc, key, params, p.image))
            ps.append(float(psnr(m, yc, data_range=1.0)))
            ss.append(float(ssim(m, yc, data_range=1.0)))
    return {"side": side, "device": str(dev), "victim_forward_ms": fwd, "embed_ms": emb,
            "honest_user": {"images": len(ps), "psnr_min": min(ps), "psnr_mean": statistics.mean(ps),
                            "ssim_min": min(ss), "ssim_mean": statistics.mean(ss)},
            "embed_over_forward": emb / fwd, "verify_wall_s": wall, "verify_queries": len(probes),
            "verify_wall_s_without_jpeg_nuisances": wall_plain, "jpeg_nuisances_cost_ratio": wall / wall_plain,
            "verify_p_clean_victim": res["p_value"]}


# ---- theft ------------------------------------------------------------------------------------------

def _crops(n: int, side: int, seed: int = 0) -> list[torch.Tensor]:
    ims = [im.image for im in load_images("corpus:attacker")]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        im = ims[rng.randrange(len(ims))]
        h, w = im.shape[-2:]
        t, left = rng.randint(0, h - side), rng.randint(0, w - side)
        out.append(im[..., t : t + side, left : left + side].contiguous())
    return out


def _write_pairs(root: Path, xs: list[torch.Tensor], ys: list[torch.Tensor], jpeg: int | None,
                 info: dict[str, Any] | None = None) -> Path:
    """A run folder as ``heist attack harvest`` leaves it: ``pairs/`` and, with ``info``, ``run.json``'s
    ``target.info`` (the victim's public task/scale from ``/v1/models``, which picks e.g. the residual U-Net
    for restoration tasks)."""
    if info is not None:
        update_run(root, target={"info": info})
    store = PairStore(root / "pairs", durable=False).open()
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if jpeg is None:
            out, media = encode_image(y, "png"), "image/png"
        else:
            buf = io.BytesIO()
            arr = y[0].permute(1, 2, 0).mul(255).round().clamp(0, 255).byte().numpy()
            Image.fromarray(arr).save(buf, "JPEG", quality=jpeg)
            out, media = buf.getvalue(), "image/jpeg"
        store.add_pair(i, encode_image(x, "png"), out, source="bench", crop=None, output_media_type=media,
                       in_hw=list(x.shape[-2:]), out_hw=list(y.shape[-2:]))
    store.close()
    return root


def _rescaled(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Scale augmentation: every pair at 1x, 0.75x and 0.5x (bicubic, both sides), 8-bit."""
    ox, oy = list(xs), list(ys)
    for f in (0.75, 0.5):
        for x, y in zip(xs, ys, strict=True):
            hx, wx = (round(s * f) for s in x.shape[-2:])
            s = y.shape[-1] // x.shape[-1]
            ox.append(_q(F.interpolate(x, size=(hx, wx), mode="bicubic", align_corners=False)))
            oy.append(_q(F.interpolate(y, size=(hx * s, wx * s), mode="bicubic", align_corners=False)))
    return ox, oy


class PlainNet(nn.Module):
    """The bench's own thief: ``x' + conv(x')`` with ``x'`` the bicubic upsampling for SR."""

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(32, 3, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale > 1:
            x = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return (x + self.body(x)).clamp(0, 1)


def plain_loop(xs: list[torch.Tensor], ys: list[torch.Tensor], steps: int, scale: int, seed: int = 0,
               patch: int = 48, clean_tail: list[torch.Tensor] | None = None, model: nn.Module | None = None,
               lr: float = 2e-3, device: str = "cpu") -> nn.Module:
    """L2 on random aligned crops with flips; ``clean_tail``: the last 10% of steps on these outputs;
    ``model``: train this one (e.g. fine-tune a surrogate) instead of a fresh :class:`PlainNet`; ``device``: where
    the steps run (the crops are drawn the same way on every device; the net comes back on the CPU)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    net = (model or PlainNet(scale)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr)
    switch = int(steps * 0.9) if clean_tail is not None else steps
    for step in range(steps):
        targets = clean_tail if (clean_tail is not None and step >= switch) else ys
        xb, yb = [], []
        for _ in range(8):
            i = rng.randrange(len(xs))
            x, y = xs[i], targets[i]
            p = min(patch, x.shape[-1], x.shape[-2])
            t, left = rng.randint(0, x.shape[-2] - p), rng.randint(0, x.shape[-1] - p)
            a = x[..., t : t + p, left : left + p]
            b = y[..., t * scale : (t + p) * scale, left * scale : (left + p) * scale]
            if rng.random() < 0.5:
                a, b = a.flip(-1), b.flip(-1)
            xb.append(a)
            yb.append(b)
        loss = F.mse_loss(net(torch.cat(xb).to(device)), torch.cat(yb).to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.cpu().eval()


def part_theft(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    recipe = get_recipe(name)
    victim = load_model(build(name, "tiny")).module.eval()
    scale = recipe.scale
    params = _params(args)
    key = ownership_key(args.secret, params)
    # in-domain inputs, as the victim's users send them (noisy photos for a denoiser, small ones for SR)
    xs = [_q(recipe.make_pair(c, seed=i)[0]) for i, c in enumerate(_crops(args.pairs, args.crop))]
    with torch.no_grad():
        clean = [_q(victim(x)) for x in xs]
        marked = [_q(embed(victim(x), key, params, x)) for x in xs]
    probes = [Probe(p.name, _q(recipe.make_pair(p.image, seed=100 + i, multiple=16)[0]))
              for i, p in enumerate(load_probes("corpus:benchmark", args.queries, args.side, 16 * scale))]
    vic = module_translator(victim)

    def score(model: nn.Module) -> dict[str, Any]:
        r = verify_ownership(module_translator(model), vic, probes, args.secret, params, **_nuisance(args))
        return {"p_value": r["p_value"], "cosine": r["cosine"], "key_dim": r["key_dim"],
                "nuisance_dims": r["nuisance_dims"], "z": r["z"], "max_z": r["max_z"], "alpha": r["alpha"],
                "off_key": r["off_key"], "fidelity_probes_psnr": _fidelity(model, victim, probes),
                **({"p_whole": r["whole"]["p_value"], "p_kept": r["kept"]["p_value"],
                    "kept_dim": r["kept"]["key_dim"], "cosine_kept": r["kept"]["cosine"]} if "kept" in r else {}),
                **({"part": r["part"], "parts_p": {k: v["p_value"] for k, v in r["parts"].items()}}
                   if "parts" in r else {})}

    kinds = [k for k in args.kinds if k != "srresnet" or scale > 1]
    info = {"task": recipe.task, "scale": scale}
    table: list[dict[str, Any]] = []

    def finetuned(model: nn.Module, steps: int) -> nn.Module:
        """The thief's last counter-measure: ``steps`` more L2 steps on the clean victim's outputs."""
        for q in model.parameters():
            q.requires_grad_(True)
        return plain_loop(xs, clean, steps, scale, seed=11, model=model.train(), lr=args.finetune_lr,
                          device=args.train_device)

    def run_kind(kind: str, cm: str, xs_: list[torch.Tensor], ys_: list[torch.Tensor], jpeg: int | None) -> None:
        t0 = time.perf_counter()
        fid = None
        if kind == "plain-loop":
            ys_plain = ys_ if jpeg is None else [decode_image(_jpeg_bytes(y, jpeg)) for y in ys_]
            model: nn.Module = plain_loop(xs_, ys_plain, args.steps, scale, device=args.train_device)
        else:
            # JPEG 75 is the attacker's own counter-measure (attacker/countermeasures.py), applied at training
            folder = _write_pairs(work / f"{kind}-{cm}", xs_, ys_, None, info)
            arch, _, variant = kind.partition("/")
            tr = train_surrogate(folder, folder / "surrogate", arch=arch, profile="tiny", steps=args.kind_steps,
                                 device=args.train_device, counter=f"jpeg:quality={jpeg}" if jpeg else "none",
                                 **_variant(variant))
            fid = tr.fidelity.get("psnr") if isinstance(tr.fidelity, dict) else None
            model = load_model(tr.checkpoint).module.eval()
        row = {"kind": kind, "counter_measure": cm, "train_s": time.perf_counter() - t0,
               "fidelity_heldout_psnr": fid, **score(model)}
        log.info("%s", row)
        table.append(row)
        if cm == "none" and "finetune" in args.counter_measures:
            steps = max(1, (args.steps if kind == "plain-loop" else args.kind_steps) // 10)
            row = {"kind": kind, "counter_measure": f"finetune {steps} steps on clean outputs",
                   **score(finetuned(model, steps).eval())}
            log.info("%s", row)
            table.append(row)

    for cm in args.counter_measures:
        if cm == "finetune":
            continue
        xs_, ys_, jpeg = xs, marked, None
        if cm == "jpeg75":
            jpeg = 75
        if cm == "rescale":
            xs_, ys_ = _rescaled(xs, marked)
        for kind in kinds:
            run_kind(kind, cm, xs_, ys_, jpeg)

    innocent: dict[str, float] = {"clean victim": score(victim)["p_value"]}
    for kind in kinds if args.innocent_kinds else []:
        if kind == "plain-loop":
            continue
        folder = _write_pairs(work / f"clean-{kind}", xs, clean, None, info)
        arch, _, variant = kind.partition("/")
        tr = train_surrogate(folder, folder / "surrogate", arch=arch, profile="tiny", steps=args.kind_steps // 2,
                             device=args.train_device, **_variant(variant))
        innocent[f"{kind} on the clean victim"] = score(load_model(tr.checkpoint).module.eval())["p_value"]
    for seed in range(args.innocent_loops):
        innocent[f"plain loop on the clean victim, seed {seed}"] = score(
            plain_loop(xs, clean, args.steps // 2, scale, seed=seed, device=args.train_device))["p_value"]
    if recipe.task != "style":
        gt_in, gt_out = zip(*(recipe.make_pair(x, seed=i) for i, x in enumerate(_crops(args.pairs, args.crop, 7))),
                            strict=True)
        for seed in range(args.innocent_loops):
            innocent[f"plain loop on ground truth, seed {seed}"] = score(
                plain_loop([_q(a) for a in gt_in], list(gt_out), args.steps // 2, scale, seed=seed,
                           device=args.train_device))["p_value"]
    for other in args.others:
        if get_recipe(other).scale == scale:
            innocent[f"zoo {other}"] = score(load_model(build(other, "tiny")).module.eval())["p_value"]
    for seed in range(args.untrained):
        torch.manual_seed(seed)
        innocent[f"untrained plain net seed {seed}"] = score(PlainNet(scale).eval())["p_value"]
    # honest-user cost on the benchmark probes
    with torch.no_grad():
        ps, ss = [], []
        for p in probes:
            y = victim(p.image)
            m = _q(embed(y, key, params, p.image))
            ps.append(float(psnr(m, _q(y), data_range=1.0)))
            ss.append(float(ssim(m, _q(y), data_range=1.0)))
    pv = list(innocent.values())
    return {
        "victim": name, "pairs": args.pairs, "crop": args.crop, "steps": args.steps, "queries": args.queries,
        "probe_side_output": probes[0].image.shape[-1] * scale, "params": params.model_dump(),
        "stolen": table,
        "innocent": innocent,
        "innocent_summary": {"n": len(pv), "min_p": min(pv), "max_p": max(pv),
                             "false_claims_p_below_0.01": sum(p < 0.01 for p in pv)},
        "honest_user": {"psnr_min": min(ps), "psnr_mean": statistics.mean(ps), "ssim_min": min(ss),
                        "ssim_mean": statistics.mean(ss), "images": len(ps)},
    }


# The thief of the committed results: dihedral augmentation (the break a careful thief tries against a
# watermark) and crops at every offset, the attacker's defaults before round 2 aligned its crops.
THIEF: dict[str, Any] = {"augment": True, "align": 1}


def _variant(variant: str) -> dict[str, Any]:
    """Training options of a :data:`THIEF`; ``KIND/sigmoid``: the non-residual generator (what ``unet-l2``
    uses for style tasks)."""
    return THIEF | {"arch_kwargs": {"residual": False}} if variant == "sigmoid" else THIEF


def _nuisance(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"kept_jpeg": args.kept_jpeg or None}
    return out if args.nuisance_jpeg is None else {**out, "nuisance_jpeg": args.nuisance_jpeg}


def _params(args: argparse.Namespace) -> OwnershipParams:
    return OwnershipParams(carrier=args.carrier, radius=args.radius if args.radius is not None else
                           OwnershipParams().radius if args.carrier == "ring" else 3, source=args.source,
                           psnr=args.psnr, scales=args.scales, colour=args.colour,
                           whiten=args.whiten, luma_share=args.luma_share)


def _fidelity(model: nn.Module, victim: nn.Module, probes: list[Probe]) -> float:
    """Mean PSNR (dB) of the model's 8-bit outputs to the clean victim's on the probes."""
    with torch.no_grad():
        return statistics.mean(float(psnr(_q(model(p.image)), _q(victim(p.image)), data_range=1.0)) for p in probes)


#: JPEG's colour axes (ITU-R BT.601 YCbCr, as libjpeg uses them): rows Y, Cb, Cr of linear RGB in [0, 1].
_YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def part_survival(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """How much of the mark a thief's JPEG re-encode keeps, per YCbCr component.

    For ``--pairs`` harvested-size outputs (``--crop`` px) and the keys of secrets ``0..--survival-keys-1``:
    the share of the mark's energy in Y, Cb and Cr, and ``<J(y + m) - J(y), m> / |m|^2`` per component
    (``J`` = JPEG at ``--survival-quality``, 4:2:0 as Pillow writes it; 1 = the mark passes untouched).
    """
    recipe = get_recipe(name)
    victim = load_model(build(name, "tiny")).module.eval()
    params = _params(args)
    xs = [_q(recipe.make_pair(c, seed=i)[0]) for i, c in enumerate(_crops(args.pairs, args.crop))]
    with torch.no_grad():
        ys = [_q(victim(x)) for x in xs]
    rows = []
    for secret in range(args.survival_keys):
        key = ownership_key(secret, params)
        num, den = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        for x, y in zip(xs, ys, strict=True):
            with torch.no_grad():
                m = embed(y, key, params, x) - y
                kept = decode_image(_jpeg_bytes(y + m, args.survival_quality)) - decode_image(
                    _jpeg_bytes(y, args.survival_quality))
            my = torch.einsum("dc,nchw->ndhw", _YCBCR, m).double()
            ky = torch.einsum("dc,nchw->ndhw", _YCBCR, kept).double()
            num += (my * ky).sum((0, 2, 3))
            den += my.pow(2).sum((0, 2, 3))
        rows.append({"secret": secret, "energy_share_ycbcr": (den / den.sum()).tolist(),
                     "kept_ycbcr": (num / den).tolist(), "kept_total": float(num.sum() / den.sum())})
        log.info("%s", rows[-1])
    return {"victim": name, "pairs": args.pairs, "crop": args.crop, "quality": args.survival_quality,
            "params": params.model_dump(), "keys": rows}


def _jpeg_bytes(y: torch.Tensor, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(y[0].permute(1, 2, 0).mul(255).round().clamp(0, 255).byte().numpy()).save(
        buf, "JPEG", quality=quality)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["cost", "theft", "survival", "all"], default="all")
    ap.add_argument("--victim", default="denoise25")
    ap.add_argument("--device", type=device_arg, default="cpu", help="device for the cost part (cpu or cuda)")
    ap.add_argument("--train-device", type=device_arg, default="cpu")
    ap.add_argument("--side", type=int, default=256, help="probe/output side in pixels")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--kind-steps", type=int, default=300, help="steps cap of the attacker kinds (tiny default)")
    ap.add_argument("--kinds", nargs="*", default=["resunet", "unet-l2", "pix2pix", "plain-loop"],
                    help="attacker kinds (defaults, the victim's public task known as after a harvest); "
                         "KIND/sigmoid forces the non-residual U-Net (what style tasks get); plain-loop")
    ap.add_argument("--counter-measures", nargs="*", default=["none", "jpeg75", "rescale", "finetune"])
    ap.add_argument("--carrier", choices=["ring", "band"], default=OwnershipParams().carrier)
    ap.add_argument("--radius", type=int, default=None, help="ring radius / band octaves (default: the params')")
    ap.add_argument("--secret", type=int, default=SECRET,
                    help="the server secret the key is drawn from (theft part; vary it to see the spread over keys)")
    ap.add_argument("--colour", choices=["rgb", "luma", "split"], default=OwnershipParams().colour,
                    help="the key's colour subspace (luma: a luminance-only mark; split: chroma + luma parts)")
    ap.add_argument("--luma-share", type=float, default=OwnershipParams().luma_share,
                    help="split: the luma part's share of the mark's energy")
    ap.add_argument("--whiten", type=float, default=OwnershipParams().whiten,
                    help="luma key: weigh directions by picture energy (0..1)")
    ap.add_argument("--scales", type=lambda v: tuple(int(a) for a in v.split(",")), default=OwnershipParams().scales,
                    help="ring scales, comma-separated (default: the params')")
    ap.add_argument("--nuisance-jpeg", type=lambda v: tuple(int(a) for a in v.split(",") if a), default=None,
                    help="JPEG qualities projected off the test, comma-separated ('' = none; default: verify's)")
    ap.add_argument("--kept-jpeg", type=int, default=KEPT_JPEG or 0,
                    help="JPEG quality of the test's kept-directions view, e.g. 75 (0: the whole-key test only)")
    ap.add_argument("--source", choices=["input", "output"], default=OwnershipParams().source)
    ap.add_argument("--psnr", type=float, default=OwnershipParams().psnr)
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--innocent-loops", type=int, default=3)
    ap.add_argument("--innocent-kinds", type=int, default=1, help="0: no attacker-kind surrogates of the clean victim")
    ap.add_argument("--others", nargs="*", default=["style-teal", "style-ink", "denoise25", "sr4x"])
    ap.add_argument("--untrained", type=int, default=8)
    ap.add_argument("--survival-keys", type=int, default=3, help="survival part: keys (secrets 0..N-1)")
    ap.add_argument("--survival-quality", type=int, default=75, help="survival part: the thief's JPEG quality")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    exit_on_sigterm()  # temporary folders are removed on SIGTERM too
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    args.others = [o for o in args.others if o != args.victim]
    result: dict[str, Any] = {
        "bench": "ownership", "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "threads": args.threads},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    victim = load_model(build(args.victim, "tiny")).module.eval()
    if args.part in ("cost", "all"):
        dev = torch.device(args.device)
        result["cost"] = [part_cost(victim, dev, s, args.repeats, args.queries, _params(args))
                          for s in (args.side, 2 * args.side)]
    if args.part in ("survival", "all"):
        result["survival"] = part_survival(args.victim, args)
    if args.part in ("theft", "all"):
        with tempfile.TemporaryDirectory(prefix="heist-ownership-") as tmp:
            result["theft"] = part_theft(args.victim, args, Path(tmp))
    text = json.dumps(result, indent=1)
    sys.stdout.write(text + "\n")
    out = args.out or Path(__file__).parent / "results" / f"ownership-{args.victim}-{args.part}-{args.carrier}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
