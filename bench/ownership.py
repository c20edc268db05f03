"""Benchmark + measurement: the ownership watermark's cost and its theft-detection power.

Part ``cost`` (``--part cost``): per image of ``--side`` px, the clean victim's forward (the baseline) and
the ``ownership_watermark`` embed, in ms (median over repeats; CUDA synchronised with ``--device cuda``),
their ratio, and the wall time of one verification (``--queries`` probes; suspect = the clean victim run
locally, so the time is the verifier's own: two forwards + the regression per probe).

Part ``theft`` (``--part theft``): one zoo victim (tiny), 64 harvested pairs (``--crop`` px crops of the
attacker split; outputs = victim + watermark, 8-bit PNG round trip, exactly what the API serves), and:

- thieves: ``heist attack train`` kinds (``unet-l2``, ``pix2pix``; ``srresnet`` for SR victims), trained by
  ``attacker.train.train_surrogate`` (dihedral augmentation on, its default), and a plain L2 loop written
  here (flips only);
- counter-measures: ``none``; ``jpeg75`` (harvested outputs re-encoded as JPEG 75 before training);
  ``rescale`` (each pair also added at 0.5x and 0.75x, random crops of them, i.e. scale + crop augmentation
  on top of flips/rotations); ``finetune`` (plain loop only: the last 10% of the steps on clean outputs);
- innocent models: surrogates of the undefended victim (each kind), plain loops on ground truth, the clean
  victim itself, other zoo models, untrained tiny networks: p-values and false claims (p < 0.01);
- honest-user cost: PSNR/SSIM of marked vs clean outputs on the benchmark split (8-bit).

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

from attacker.pairstore import PairStore
from attacker.train import train_surrogate
from defenses import DefenseContext, build_defense, request_rng
from defenses.watermark.ownership import OwnershipParams, embed, ownership_key
from evaluation.metrics import psnr, ssim
from evaluation.watermark import Probe, load_probes, module_translator, verify_ownership
from translators.checkpoint import load_model
from translators.codecs import decode_image, encode_image
from translators.corpus import load_images
from translators.zoo import build, get_recipe

log = logging.getLogger("bench.ownership")
SECRET = 20261130


def _q(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255).round().div(255)


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


def part_cost(victim: nn.Module, dev: torch.device, side: int, repeats: int, queries: int) -> dict[str, Any]:
    victim = victim.to(dev)
    x = load_probes("corpus:benchmark", 1, side, 16)[0].image.to(dev)
    with torch.no_grad():
        y = victim(x)
    d = build_defense({"name": "ownership_watermark"})
    d.setup(dev)
    ctx = DefenseContext("bench", "r", "m", "t", request_rng(0), secret=SECRET)
    with torch.no_grad():
        d.apply(y, x, ctx)  # warm-up (key, kernels)
        fwd = _timed(lambda: victim(x), dev, repeats)
        emb = _timed(lambda: d.apply(y, x, ctx), dev, repeats)
    probes = load_probes("corpus:benchmark", queries, side, 16)
    cpu_victim = module_translator(victim.cpu())
    t0 = time.perf_counter()
    res = verify_ownership(cpu_victim, cpu_victim, probes, SECRET)
    wall = time.perf_counter() - t0
    key = ownership_key(SECRET, OwnershipParams().key_id, OwnershipParams().radius)
    ps, ss = [], []
    with torch.no_grad():
        for p in probes:
            yc = cpu_victim(p.image)
            m = _q(embed(yc, key, OwnershipParams(), p.image))
            ps.append(float(psnr(m, yc)))
            ss.append(float(ssim(m, yc)))
    return {"side": side, "device": str(dev), "victim_forward_ms": fwd, "embed_ms": emb,
            "honest_user": {"images": len(ps), "psnr_min": min(ps), "psnr_mean": statistics.mean(ps),
                            "ssim_min": min(ss), "ssim_mean": statistics.mean(ss)},
            "embed_over_forward": emb / fwd, "verify_wall_s": wall, "verify_queries": len(probes),
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


def _write_pairs(root: Path, xs: list[torch.Tensor], ys: list[torch.Tensor], jpeg: int | None) -> Path:
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
               patch: int = 48, clean_tail: list[torch.Tensor] | None = None, model: PlainNet | None = None
               ) -> PlainNet:
    """L2 on random aligned crops with flips; ``clean_tail``: the last 10% of steps on these outputs."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    net = model or PlainNet(scale)
    opt = torch.optim.Adam(net.parameters(), 2e-3)
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
        loss = F.mse_loss(net(torch.cat(xb)), torch.cat(yb))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def part_theft(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    recipe = get_recipe(name)
    victim = load_model(build(name, "tiny")).module.eval()
    scale = recipe.scale
    params = OwnershipParams()
    key = ownership_key(SECRET, params.key_id, params.radius)
    # in-domain inputs, as the victim's users send them (noisy photos for a denoiser, small ones for SR)
    xs = [_q(recipe.make_pair(c, seed=i)[0]) for i, c in enumerate(_crops(args.pairs, args.crop))]
    with torch.no_grad():
        clean = [_q(victim(x)) for x in xs]
        marked = [_q(embed(victim(x), key, params, x)) for x in xs]
    probes = [Probe(p.name, _q(recipe.make_pair(p.image, seed=100 + i, multiple=16)[0]))
              for i, p in enumerate(load_probes("corpus:benchmark", args.queries, args.side, 16 * scale))]
    vic = module_translator(victim)

    def score(model: nn.Module) -> dict[str, Any]:
        r = verify_ownership(module_translator(model), vic, probes, SECRET, params)
        return {"p_value": r["p_value"], "z": r["z"], "max_z": r["max_z"]}

    kinds = ["unet-l2", "pix2pix"] + (["srresnet"] if scale > 1 else [])
    table: list[dict[str, Any]] = []

    def run_kind(kind: str, cm: str, xs_: list[torch.Tensor], ys_: list[torch.Tensor], jpeg: int | None) -> None:
        folder = _write_pairs(work / f"{kind}-{cm}", xs_, ys_, jpeg)
        t0 = time.perf_counter()
        tr = train_surrogate(folder, folder / "surrogate", arch=kind, profile="tiny", steps=args.steps,
                             device=args.train_device)
        row = {"kind": kind, "counter_measure": cm, "train_s": time.perf_counter() - t0,
               "fidelity_psnr": tr.fidelity.get("psnr") if isinstance(tr.fidelity, dict) else None,
               **score(load_model(tr.checkpoint).module.eval())}
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
        ys_plain = ys_
        if jpeg is not None:
            ys_plain = [decode_image(_jpeg_bytes(y, jpeg)) for y in ys_]
        t0 = time.perf_counter()
        net = plain_loop(xs_, ys_plain, args.steps, scale)
        table.append({"kind": "plain-loop", "counter_measure": cm, "train_s": time.perf_counter() - t0,
                      **score(net)})
        log.info("%s", table[-1])
    if "finetune" in args.counter_measures:
        net = plain_loop(xs, marked, args.steps, scale, clean_tail=clean)
        table.append({"kind": "plain-loop", "counter_measure": "finetune 10% clean", **score(net)})
        log.info("%s", table[-1])

    innocent: dict[str, float] = {"clean victim": score(victim)["p_value"]}
    for kind in kinds:
        folder = _write_pairs(work / f"clean-{kind}", xs, clean, None)
        tr = train_surrogate(folder, folder / "surrogate", arch=kind, profile="tiny", steps=args.steps // 2,
                             device=args.train_device)
        innocent[f"{kind} on the clean victim"] = score(load_model(tr.checkpoint).module.eval())["p_value"]
    for seed in range(3):
        innocent[f"plain loop on the clean victim, seed {seed}"] = score(
            plain_loop(xs, clean, args.steps // 2, scale, seed=seed))["p_value"]
    if recipe.task != "style":
        gt_in, gt_out = zip(*(recipe.make_pair(x, seed=i) for i, x in enumerate(_crops(args.pairs, args.crop, 7))),
                            strict=True)
        for seed in range(3):
            innocent[f"plain loop on ground truth, seed {seed}"] = score(
                plain_loop([_q(a) for a in gt_in], list(gt_out), args.steps // 2, scale, seed=seed))["p_value"]
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
            ps.append(float(psnr(m, _q(y))))
            ss.append(float(ssim(m, _q(y))))
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


def _jpeg_bytes(y: torch.Tensor, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(y[0].permute(1, 2, 0).mul(255).round().clamp(0, 255).byte().numpy()).save(
        buf, "JPEG", quality=quality)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["cost", "theft", "all"], default="all")
    ap.add_argument("--victim", default="denoise25")
    ap.add_argument("--device", default="cpu", help="device for the cost part (cpu or cuda)")
    ap.add_argument("--train-device", default="cpu")
    ap.add_argument("--side", type=int, default=256, help="probe/output side in pixels")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--counter-measures", nargs="*", default=["none", "jpeg75", "rescale", "finetune"])
    ap.add_argument("--others", nargs="*", default=["style-teal", "style-ink", "denoise25", "sr4x"])
    ap.add_argument("--untrained", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
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
        result["cost"] = [part_cost(victim, dev, s, args.repeats, args.queries) for s in (args.side, 2 * args.side)]
    if args.part in ("theft", "all"):
        with tempfile.TemporaryDirectory(prefix="heist-ownership-") as tmp:
            result["theft"] = part_theft(args.victim, args, Path(tmp))
    text = json.dumps(result, indent=1)
    sys.stdout.write(text + "\n")
    out = args.out or Path(__file__).parent / "results" / f"ownership-{args.victim}-{args.part}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
