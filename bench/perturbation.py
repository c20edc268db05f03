"""Perturbation defenses: cost per image, honest-user PSNR, and how much they slow a thief (plain and adaptive).

    .venv/bin/python bench/perturbation.py                                  # CPU-sized default
    .venv/bin/python bench/perturbation.py --device cuda --steps 600 --budgets 16,64,256 \\
        --victims sr4x,denoise25,style-teal --zoo-profile default          # GPU

Victims: zoo models (``translators.zoo.build(name, --zoo-profile)``), run in this process. Defenses: the
registered output defenses at the settings in :data:`DEFENSES` (two strengths for fmd, three for poison), applied to
each victim's outputs exactly as the service does (``DefensePipeline``; contexts keyed by request and input
hash), then rounded to 8 bits as a PNG response would be.

Measured, per victim:

- ``cost``: ms per image for each defense at output sides 64/128/256 px (batch ``--cost-batch``, median of
  ``--repeats``), next to the victim's own forward at that size; ``serve_ratio`` = (forward + defense) /
  forward, the throughput of a model worker relative to undefended (same run).
- ``honest_psnr_db``: PSNR(defended, clean output) on ``corpus:benchmark`` centre crops (what an honest user
  loses).
- ``attack``: for each budget (queries: crops of ``corpus:attacker``; denoise queries carry sigma-25 noise,
  the victim's own domain) and each attacker (``plain`` or a counter-measure of
  :mod:`attacker.countermeasures`), the tiny ``auto`` surrogate (``resunet``) is trained
  for ``--steps`` steps (same seed, same batches) on the defended pairs; ``fidelity_db`` is PSNR(surrogate,
  clean victim) on the benchmark crops. ``loss_db`` = fidelity with no defense and the plain attacker minus
  fidelity here. ``best_adaptive`` picks, per defense and budget, the attacker with the highest fidelity
  (an oracle choice: the attacker could only approximate it on its own held-out pairs).

Prints JSON and writes ``bench/results/perturbation.json`` (``--out``). ``--render FILE...`` prints the
Markdown table of each results file (docs/defenses.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import device as device_arg  # noqa: E402
from _common import exit_on_sigterm  # noqa: E402

from attacker.countermeasures import build_counter  # noqa: E402
from attacker.fidelity import translate  # noqa: E402
from attacker.surrogates import auto_kind, get_surrogate  # noqa: E402
from defenses import DefenseContext, DefensePipeline, ModelHandle, build_defense, request_rng  # noqa: E402
from evaluation.metrics import psnr  # noqa: E402
from translators.checkpoint import card_dict, load_model  # noqa: E402
from translators.corpus import load_images  # noqa: E402
from translators.images import center_crop, quantize_8bit  # noqa: E402
from translators.zoo import build as build_zoo  # noqa: E402

log = logging.getLogger("bench.perturbation")

#: label -> defense spec (``proxy_*`` of poison: CPU-sized proxy, trained once per victim and cached).
DEFENSES: dict[str, dict[str, Any] | None] = {
    "none": None,
    "noise": {"name": "noise", "sigma": 0.01, "per_input": True},
    "jpeg75": {"name": "jpeg", "quality": 75},
    "fmd2": {"name": "fmd", "eps": 2 / 255, "steps": 8},
    "fmd4": {"name": "fmd", "eps": 4 / 255, "steps": 8},
    "feature_amplify": {"name": "feature_amplify", "k": 2, "h": 1.5},
    "poison40": {"name": "poison", "psnr": 40.0, "proxy_steps": 150, "proxy_channels": 8, "proxy_side": 16},
    "poison35": {"name": "poison", "psnr": 35.0, "proxy_steps": 150, "proxy_channels": 8, "proxy_side": 16},
    # the 40 dB floor measured after the 8-bit PNG response: rounding costs about 0.1 dB
    "poison40.5": {"name": "poison", "psnr": 40.5, "proxy_steps": 150, "proxy_channels": 8, "proxy_side": 16},
    "poison40.5-resunet": {"name": "poison", "psnr": 40.5, "proxy_steps": 150, "proxy_channels": 8,
                           "proxy_side": 16, "proxy": "resunet"},
}
COUNTERS = ("lowpass:sigma=1.0", "median", "jpeg:quality=75", "aware")


def r4(x: float) -> float:
    return round(float(x), 4)


def ctxs_for(x: torch.Tensor, tag: str) -> list[DefenseContext]:
    """One context per row, keyed by the row's bytes (as the service keys by the request's image hash)."""
    out = []
    for i in range(x.shape[0]):
        digest = hashlib.sha256(x[i].mul(255).round().to(torch.uint8).numpy().tobytes()).hexdigest()
        out.append(DefenseContext(client_id="thief", request_id=f"{tag}-{i}", model="victim", tier="bench",
                                  rng=request_rng(i), input_sha256=digest, secret=20261130))
    return out


def respond(module: torch.nn.Module, pipe: DefensePipeline, x: torch.Tensor, device: torch.device, tag: str,
            chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, defended) outputs for inputs ``x`` on the CPU, both rounded to 8 bits."""
    cleans, defended = [], []
    for s in range(0, x.shape[0], chunk):
        xb = x[s : s + chunk].to(device)
        with torch.no_grad():
            y = module(xb).float().clamp(0, 1)
        d, _ = pipe.apply(y, xb, ctxs_for(x[s : s + chunk], f"{tag}{s}")) if pipe else (y, [])
        cleans.append(y.cpu())
        defended.append(d.cpu())
    q = [quantize_8bit(torch.cat(t)) for t in (cleans, defended)]  # both already in [0, 1]
    return q[0], q[1]


def crops(spec: str, side: int, n: int, seed: int) -> torch.Tensor:
    """``n`` random ``side`` px crops (``(n, 3, side, side)``) from the photos of ``spec``, deterministic."""
    g = torch.Generator().manual_seed(seed)
    photos = [im.image for im in load_images(spec)]
    out = []
    for k in range(n):
        img = photos[k % len(photos)]
        h, w = img.shape[-2:]
        t = int(torch.randint(0, h - side + 1, (1,), generator=g))
        le = int(torch.randint(0, w - side + 1, (1,), generator=g))
        out.append(img[..., t : t + side, le : le + side].reshape(3, side, side))
    return torch.stack(out)


def train_surrogate(x: torch.Tensor, y: torch.Tensor, scale: int, task: str, steps: int, device: torch.device,
                    seed: int) -> torch.nn.Module:
    """The auto tiny surrogate trained ``steps`` steps on all of ``(x, y)`` (random crops, batch 8)."""
    kind = get_surrogate(auto_kind(task, scale))
    profile = kind.profiles["tiny"].model_copy(update={"steps": steps})
    torch.manual_seed(seed)
    sur = kind(scale, task, profile, device, amp=False)
    mult = sur.patch_multiple()
    p = min(profile.patch, x.shape[-1])
    p -= p % mult
    g = torch.Generator().manual_seed(seed)
    sur.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (profile.batch,), generator=g)
        t = int(torch.randint(0, x.shape[-2] - p + 1, (1,), generator=g))
        le = int(torch.randint(0, x.shape[-1] - p + 1, (1,), generator=g))
        xb = x[idx, :, t : t + p, le : le + p]
        yb = y[idx, :, t * scale : (t + p) * scale, le * scale : (le + p) * scale]
        sur.train_step(xb.to(device), yb.to(device))
    return sur.G.eval()


def time_defense(module: torch.nn.Module, pipe: DefensePipeline, x: torch.Tensor, repeats: int,
                 device: torch.device) -> tuple[float, float]:
    """(forward ms per image, defense ms per image) for a batch ``x``; median of ``repeats`` after a warm-up."""
    xb = x.to(device)
    ctxs = ctxs_for(x, "cost")
    fwd, dfn = [], []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            y = module(xb).float().clamp(0, 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        if pipe:
            pipe.apply(y, xb, ctxs)
        t2 = time.perf_counter()
        if r:
            fwd.append(t1 - t0)
            dfn.append(t2 - t1)
    n = x.shape[0]
    return statistics.median(fwd) * 1000 / n, statistics.median(dfn) * 1000 / n


def bench_victim(name: str, args: argparse.Namespace, device: torch.device, proxy_dir: Path) -> dict[str, Any]:
    path = build_zoo(name, args.zoo_profile, device=device)
    loaded = load_model(path, device)
    module = loaded.module.eval()
    card = loaded.card
    scale, task = card.scale, card.task
    handle = ModelHandle(name=card.name, module=module, device=device, card=card_dict(card), kind=loaded.kind,
                         task=task, scale=scale)
    mult = max(card.size_multiple, 1)
    q_side = 16 if scale > 1 else 32
    e_side = 32 if scale > 1 else 48
    q_side, e_side = max(mult, q_side // mult * mult), max(mult, e_side // mult * mult)
    budgets = sorted(args.budgets)
    qx = crops("corpus:attacker", q_side, budgets[-1], seed=1)
    ex = torch.stack([center_crop(im.image, e_side)[0] for im in load_images("corpus:benchmark")])
    if task == "denoise":
        sigma = 25 / 255
        qx = (qx + sigma * torch.randn(qx.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
        ex = (ex + sigma * torch.randn(ex.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    with torch.no_grad():
        truth = torch.cat([translate(module, ex[i : i + 8], device) for i in range(0, ex.shape[0], 8)]).clamp(0, 1)
    result: dict[str, Any] = {"task": task, "scale": scale, "query_side": q_side, "eval_side": e_side,
                              "eval_images": ex.shape[0], "defenses": {}}
    base_fid: dict[int, float] = {}
    for label, spec in DEFENSES.items():
        if label not in args.defenses:
            continue
        if spec and spec["name"] == "poison":
            spec = {**spec, "proxy_dir": str(proxy_dir)}
        pipe = DefensePipeline([build_defense(spec)] if spec else [])
        t0 = time.perf_counter()
        pipe.setup(device, handle)
        setup_s = time.perf_counter() - t0
        _, ey = respond(module, pipe, ex, device, "eval")
        honest = psnr(ey, truth, data_range=1.0).mean().item() if spec else float("inf")
        cost = {}
        for side in args.sides:
            side_in = max(mult, side // scale // mult * mult)
            cx = crops("corpus:benchmark", side_in, args.cost_batch, seed=side)
            fwd_ms, def_ms = time_defense(module, pipe, cx, args.repeats, device)
            cost[str(side)] = {"forward_ms": r4(fwd_ms), "defense_ms": r4(def_ms),
                               "serve_ratio": r4((fwd_ms + def_ms) / fwd_ms) if fwd_ms > 0 else None}
        _, qy = respond(module, pipe, qx, device, "query")
        attack: dict[str, Any] = {}
        for b in budgets:
            xb, yb = qx[:b], qy[:b]
            per: dict[str, float] = {}
            attackers = ("plain", *args.counters) if (spec or args.counters_on_none) else ("plain",)
            for who in attackers:
                target = yb if who == "plain" else build_counter(who).fit([yb])(yb)
                sur = train_surrogate(xb, target, scale, task, args.steps, device, args.seed)
                with torch.no_grad():
                    pred = torch.cat([translate(sur, ex[i : i + 8], device) for i in range(0, ex.shape[0], 8)])
                per[who] = r4(psnr(pred.clamp(0, 1), truth, data_range=1.0).mean().item())
                log.info("%s %s budget %d %s: %.2f dB", name, label, b, who, per[who])
            if label == "none":
                base_fid[b] = per["plain"]
            best = max(per, key=lambda k: per[k])
            attack[str(b)] = {
                "fidelity_db": per, "best_adaptive": best,
                "loss_db_plain": r4(base_fid[b] - per["plain"]) if b in base_fid else None,
                "loss_db_adaptive": r4(base_fid[b] - per[best]) if b in base_fid else None,
            }
        result["defenses"][label] = {"spec": spec, "setup_s": r4(setup_s),
                                     "honest_psnr_db": r4(honest) if spec else None, "cost": cost,
                                     "attack": attack}
    return result


def markdown_table(results: dict[str, Any]) -> str:
    """Victim x defense -> honest PSNR, fidelity loss (dB) per budget for plain and best adaptive attacker,
    defense cost (ms/image at the largest side), from a results JSON written by this script."""
    budgets = results["settings"]["budgets"]
    side = str(max(results["settings"]["sides"]))
    head = ["victim", "defense", "honest PSNR dB"]
    for b in budgets:
        head += [f"loss@{b} plain", f"loss@{b} adaptive (best)"]
    head.append(f"ms/img @{side}px")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for victim, v in results["victims"].items():
        for label, d in v["defenses"].items():
            row = [victim, label, "-" if d["honest_psnr_db"] is None else f"{d['honest_psnr_db']:.2f}"]
            for b in budgets:
                a = d["attack"].get(str(b), {})
                if label == "none":
                    row += [f"fid {a['fidelity_db']['plain']:.2f}", "-"]
                    continue
                row += [f"{a['loss_db_plain']:+.2f}", f"{a['loss_db_adaptive']:+.2f} ({a['best_adaptive']})"]
            row.append(f"{d['cost'][side]['defense_ms']:.1f}")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "--render":
        for path in sys.argv[2:]:
            print(markdown_table(json.loads(Path(path).read_text())))  # noqa: T201
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--victims", default="sr4x,denoise25")
    ap.add_argument("--zoo-profile", default="tiny")
    ap.add_argument("--defenses", default=",".join(DEFENSES))
    ap.add_argument("--budgets", default="16,64")
    ap.add_argument("--steps", type=int, default=150, help="surrogate training steps")
    ap.add_argument("--sides", default="64,128,256", help="output sides (px) of the cost measurement")
    ap.add_argument("--cost-batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--counters", default=";".join(COUNTERS), help="adaptive attackers, ';'-separated specs")
    ap.add_argument("--counters-on-none", action="store_true", help="also train adaptive attackers undefended")
    ap.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (checked at once)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "perturbation.json"))
    args = ap.parse_args()
    exit_on_sigterm()  # temporary folders are removed on SIGTERM too
    args.budgets = [int(b) for b in args.budgets.split(",")]
    args.sides = [int(s) for s in args.sides.split(",")]
    args.defenses = args.defenses.split(",")
    args.counters = [c for c in args.counters.split(";") if c]
    if "none" not in args.defenses:
        args.defenses.insert(0, "none")
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"), format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="heist-perturbation-") as tmp:
        victims = {v: bench_victim(v, args, device, Path(tmp)) for v in args.victims.split(",")}
    out = {
        "bench": "perturbation",
        "settings": {"device": str(device), "zoo_profile": args.zoo_profile, "budgets": args.budgets,
                     "steps": args.steps, "sides": args.sides, "cost_batch": args.cost_batch,
                     "repeats": args.repeats, "seed": args.seed, "threads": args.threads,
                     "counters": args.counters, "defenses": {k: DEFENSES[k] for k in args.defenses},
                     "surrogate_profile": "tiny", "data_range": 1.0},
        "victims": victims,
        "wall_s": r4(time.perf_counter() - t0),
    }
    text = json.dumps(out, indent=2)
    print(text)  # noqa: T201
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
