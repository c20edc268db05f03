"""Why do some surrogates not carry the ownership mark? Two ablations on the tiny ``denoise25`` victim.

Same harvest as ``bench/ownership.py --part theft`` (64 noisy 96 px crops of the attacker split, marked
outputs 8-bit; 32 requested noisy 256 px probes of the benchmark split, 21 exist).

- ``--mode loop``: the attacker's generator architectures (``plain`` = the bench's 3-layer CNN,
  ``resunet`` and ``unet`` with the tiny-profile sizes) trained by the bench's plain loop (constant lr,
  ``--patch`` px crops, flips): isolates the architecture from ``heist attack train``'s procedure.
- ``--mode attacker``: ``attacker.train.train_surrogate`` (``heist attack train``) with one option
  changed per variant (``default``, ``noaug``, ``patch48``, ``steps900``, ``noplateau``). Its pairs folder
  has no ``run.json`` (the victim's task unknown), so ``unet-l2`` builds the *non-residual* sigmoid U-Net.

Rows: ``z``, ``p_value``, ``alpha`` (``<k, u>/|k|^2``: the filter the suspect adds, along the key; the
harvested outputs carry ``alpha ~ g``, the embed gain, about 0.025 for ``ring`` r=2 on these inputs),
``off_key`` (``|u - alpha k| / |k|``: the suspect's own filter error in the key's subspace) and the
suspect's PSNR to the clean victim on the probes. Run:
``.venv/bin/python bench/ownership_ablation.py --mode attacker --kind unet-l2 --out FILE``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import exit_on_sigterm

from attacker.train import train_surrogate
from bench.ownership import SECRET, THIEF, PlainNet, _crops, _fidelity, _params, _q, _write_pairs, plain_loop
from defenses.watermark.ownership import embed, ownership_key
from evaluation.watermark import Probe, load_probes, module_translator, verify_ownership
from translators.archs import build_arch
from translators.checkpoint import load_model
from translators.zoo import build, get_recipe

log = logging.getLogger("bench.ownership_ablation")
VARIANTS: dict[str, dict[str, Any]] = {"default": THIEF, "noaug": THIEF | {"augment": False},
                                       "patch48": THIEF | {"patch": 48}, "steps900": THIEF | {"steps": 900},
                                       "noplateau": THIEF | {"patience": 100}}
KEYS = ("p_value", "z", "max_z", "alpha", "off_key")


def _arch(name: str) -> torch.nn.Module:
    if name == "plain":
        return PlainNet(1)
    if name == "resunet":
        return build_arch("resunet", {"in_ch": 3, "out_ch": 3, "scale": 1, "base": 16, "levels": 2, "convs": 1,
                                      "max_channels": 32})
    return build_arch("unet", {"in_ch": 3, "out_ch": 3, "base": 16, "depth": 4, "norm": "none", "residual": True})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["loop", "attacker"], default="attacker")
    ap.add_argument("--carrier", choices=["ring", "band"], default="ring")
    ap.add_argument("--radius", type=int, default=None)
    ap.add_argument("--source", choices=["input", "output"], default="input")
    ap.add_argument("--psnr", type=float, default=40.5)
    ap.add_argument("--kind", default="unet-l2", help="attacker mode: the surrogate kind")
    ap.add_argument("--variants", nargs="*", default=["default", "noaug", "patch48", "steps900"])
    ap.add_argument("--archs", nargs="*", default=["plain", "resunet", "unet"], help="loop mode")
    ap.add_argument("--steps", type=int, default=300, help="loop mode")
    ap.add_argument("--patch", type=int, default=48, help="loop mode")
    ap.add_argument("--lr", type=float, default=2e-3, help="loop mode")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    exit_on_sigterm()  # servers stopped, temporary folders removed on SIGTERM too
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    recipe = get_recipe("denoise25")
    victim = load_model(build("denoise25", "tiny")).module.eval()
    params = _params(args)
    key = ownership_key(SECRET, params)
    xs = [_q(recipe.make_pair(c, seed=i)[0]) for i, c in enumerate(_crops(64, 96))]
    with torch.no_grad():
        marked = [_q(embed(victim(x), key, params, x)) for x in xs]
    probes = [Probe(p.name, _q(recipe.make_pair(p.image, seed=100 + i, multiple=16)[0]))
              for i, p in enumerate(load_probes("corpus:benchmark", 32, 256, 16))]
    vic = module_translator(victim)
    rows: list[dict[str, Any]] = []
    for name in args.archs if args.mode == "loop" else args.variants:
        t0 = time.perf_counter()
        if args.mode == "loop":
            torch.manual_seed(0)
            net = plain_loop(xs, marked, args.steps, 1, patch=args.patch, model=_arch(name), lr=args.lr).eval()
            row: dict[str, Any] = {"arch": name, "steps": args.steps, "patch": args.patch, "lr": args.lr}
        else:
            with tempfile.TemporaryDirectory(prefix="heist-ablation-") as tmp:
                folder = _write_pairs(Path(tmp), xs, marked, None)
                tr = train_surrogate(folder, folder / "surrogate", arch=args.kind, profile="tiny", device="cpu",
                                     **VARIANTS[name])
                net = load_model(tr.checkpoint).module.eval()
            row = {"kind": args.kind, "variant": name, "steps": tr.steps, "best_step": tr.summary.get("best_step"),
                   "heldout_psnr": tr.fidelity.get("psnr")}
        r = verify_ownership(module_translator(net), vic, probes, SECRET, params)
        row.update({"train_s": time.perf_counter() - t0, **{k: r[k] for k in KEYS},
                    "fidelity_probes_psnr": _fidelity(net, victim, probes)})
        log.info("%s", row)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in vars(args).items()}
    result = {"bench": "ownership_ablation", "settings": settings, "params": params.model_dump(), "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
