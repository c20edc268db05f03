"""How far each zoo victim is from the symmetries a surrogate's training assumes: shifts and flips.

    .venv/bin/python bench/victim_symmetry.py                        # every zoo victim, zoo profile default
    .venv/bin/python bench/victim_symmetry.py --victims style-ink --zoo-profile tiny

A convolutional surrogate trained on random crops at every offset is (nearly) shift-equivariant, and one
trained on flipped and rotated crops learns the average of the victim's 8 dihedral versions. A victim with
strided layers answers by a pixel's position modulo its stride, and no trained network commutes exactly
with flips, so both assumptions put a floor under the surrogate's error (``attacker.train``'s module
docstring: why its training crops are aligned to 8 px and not flipped by default). For every
``corpus:benchmark`` photo (centre crop of ``--side`` input pixels, or less where the photo is smaller,
plus the largest shift, input built
with the recipe's ``make_pair``, so a denoiser sees noise) this measures, on the local zoo model:

- ``shift``: PSNR between ``victim(x)`` and ``victim(x shifted by s px)`` on the pixels both cover (a
  ``--margin`` border dropped), for ``s`` in ``--shifts``; equal outputs score 80 dB (piq's floor);
- ``dihedral``: PSNR between ``victim(x)`` and ``T^-1(victim(T(x)))`` for ``T`` = horizontal flip,
  vertical flip, rotation by 90 degrees, transpose.

PSNR via :func:`attacker.fidelity.psnr_ssim_l2` (piq, data_range 1, RGB); outputs clamped to [0, 1], not
rounded to 8 bits. Prints JSON and writes ``bench/results/victim_symmetry.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attacker.fidelity import psnr_ssim_l2  # noqa: E402
from translators.checkpoint import load_model  # noqa: E402
from translators.corpus import load_images  # noqa: E402
from translators.files import atomic_write_json  # noqa: E402
from translators.images import center_crop  # noqa: E402
from translators.zoo import ZOO, build, get_recipe  # noqa: E402

Transform = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]
DIHEDRAL: dict[str, Transform] = {
    "hflip": (lambda t: t.flip(-1), lambda t: t.flip(-1)),
    "vflip": (lambda t: t.flip(-2), lambda t: t.flip(-2)),
    "rot90": (lambda t: t.rot90(1, (-2, -1)), lambda t: t.rot90(-1, (-2, -1))),
    "transpose": (lambda t: t.transpose(-2, -1), lambda t: t.transpose(-2, -1)),
}


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(psnr_ssim_l2(a.clamp(0, 1), b.clamp(0, 1))["psnr"], 2)


def _mean(xs: list[float]) -> float:
    return round(statistics.fmean(xs), 2)


def measure(name: str, profile: str, side: int, shifts: list[int], margin: int) -> dict[str, Any]:
    """Shift and dihedral consistency of zoo model ``name`` at ``profile`` (module docstring)."""
    recipe = get_recipe(name)
    loaded = load_model(build(name, profile))
    net, mult = loaded.module.eval(), max(1, loaded.card.size_multiple)
    s = recipe.scale
    shift_rows: dict[int, list[float]] = {k: [] for k in shifts}
    dihedral_rows: dict[str, list[float]] = {k: [] for k in DIHEDRAL}
    sides = []
    with torch.no_grad():
        for i, im in enumerate(load_images("corpus:benchmark")):
            n = min(side, min(im.image.shape[-2:]) // s - max(shifts))  # input px, shifts included
            n -= n % mult
            sides.append(n)
            x, _ = recipe.make_pair(center_crop(im.image, (n + max(shifts)) * s), seed=10_000 + i)
            x = x if x.dim() == 4 else x.unsqueeze(0)
            ref = net(x[..., :n, :n])
            m = margin * s
            for k in shifts:
                moved = net(x[..., k : k + n, k : k + n])  # output (i, j) <- input (i + k, j + k)
                ks = k * s
                shift_rows[k].append(_psnr(ref[..., ks + m : n * s - m, ks + m : n * s - m],
                                           moved[..., m : (n - k) * s - m, m : (n - k) * s - m]))
            for key, (fwd, inv) in DIHEDRAL.items():
                back = inv(net(fwd(x[..., :n, :n])))
                dihedral_rows[key].append(_psnr(ref[..., m:-m, m:-m], back[..., m:-m, m:-m]))
    return {
        "victim": name, "arch": recipe.arch, "scale": s, "sides": sides,
        "shift": {str(k): {"per_image": v, "mean": _mean(v)} for k, v in shift_rows.items()},
        "dihedral": {k: {"per_image": v, "mean": _mean(v)} for k, v in dihedral_rows.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--victims", default="all", help="comma-separated zoo names, or all")
    ap.add_argument("--zoo-profile", default="default")
    ap.add_argument("--side", type=int, default=256, help="input crop side (px) before the shifts")
    ap.add_argument("--shifts", default="1,2,4,8,16,32")
    ap.add_argument("--margin", type=int, default=16, help="border (input px) left out of every comparison")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "victim_symmetry.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = list(ZOO) if args.victims == "all" else [v.strip() for v in args.victims.split(",") if v.strip()]
    shifts = sorted({int(v) for v in args.shifts.split(",")})
    if not shifts or shifts[0] < 1:
        ap.error("--shifts takes positive integers, e.g. 1,2,4,8")
    rows = [measure(n, args.zoo_profile, args.side, shifts, args.margin) for n in names]
    out = {"benchmark": "victim_symmetry", "zoo_profile": args.zoo_profile, "side": args.side,
           "margin": args.margin, "metric": "PSNR dB, piq, data_range 1, RGB, unrounded outputs",
           "command": " ".join(["bench/victim_symmetry.py", *sys.argv[1:]]), "victims": rows}
    atomic_write_json(args.out, out)
    sys.stdout.write(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
