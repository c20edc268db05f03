"""Training throughput (images/s) of each surrogate on the CPU, with the plain-L2 U-Net as the baseline,
and the speed-up of mixed precision (bfloat16 autocast) against float32 in the same run.

    .venv/bin/python bench/attack_train.py                    # tiny and small profiles, 1 thread
    .venv/bin/python bench/attack_train.py --profiles tiny --steps 20 --threads 2

For every surrogate kind (``resunet``, ``unet-l2``, ``pix2pix`` at scale 1; ``resunet``, ``srresnet``,
``pix2pix`` and ``unet-l2`` at scale 4) and profile, in float32 (``amp=False``) and, where the CPU has
native bfloat16 (:func:`attacker.surrogates.base.amp_dtype`), with ``amp=True`` (the trainer's default),
a run of ``--steps`` optimisation steps on random
crops of synthetic pairs, through :func:`attacker.train.train_surrogate` minus validation (one
validation at the end). Reports images/s (training crops per second, the ``train_s`` the trainer
measures), milliseconds per step, and the ratio to ``unet-l2`` at the same profile and scale: the GAN
pays for its discriminator, SRResNet for working at low resolution with a x4 head; ``amp_speedup`` is
images/s with ``amp`` over images/s in float32 for the same case. Prints JSON and
writes ``--out`` (default ``bench/results/attack_train.json`` in the repository).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import RESULTS, exit_on_sigterm, int_range  # noqa: E402

from attacker.pairstore import PairStore  # noqa: E402
from attacker.runinfo import update_run  # noqa: E402
from attacker.surrogates import get_surrogate  # noqa: E402
from attacker.surrogates.base import amp_dtype  # noqa: E402
from attacker.train import train_surrogate  # noqa: E402
from translators.codecs import encode_image  # noqa: E402
from translators.corpus import PatchSampler, load_images  # noqa: E402
from translators.images import upscale  # noqa: E402

CASES = [("resunet", 1), ("unet-l2", 1), ("pix2pix", 1), ("resunet", 4), ("srresnet", 4), ("unet-l2", 4),
         ("pix2pix", 4)]


def make_pairs(root: Path, scale: int, side: int, n: int = 16) -> None:
    photos = [im.image for im in load_images("corpus:attacker", max_side=384)]
    sampler = PatchSampler(photos, side * scale, seed=0)
    with PairStore(root / "pairs", durable=False).open() as st:
        for i in range(n):
            hr = sampler.crop()
            x = F.interpolate(hr, scale_factor=1 / scale, mode="bicubic", antialias=True).clamp(0, 1) \
                if scale > 1 else hr
            y = upscale(x, scale) if scale > 1 else (1 - x)
            st.add_pair(i, encode_image(x), encode_image(y), source="bench", crop=None)
    update_run(root, target={"url": "bench", "model": "bench",
                             "info": {"name": "bench", "task": "sr" if scale > 1 else "style", "scale": scale}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default="tiny,small")
    ap.add_argument("--steps", type=int_range(1), default=30)
    ap.add_argument("--threads", type=int_range(1), default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "attack_train.json")
    args = ap.parse_args()
    for profile in args.profiles.split(","):
        missing = sorted({k for k, _ in CASES if profile not in get_surrogate(k).profiles})
        if missing:
            ap.error(f"argument --profiles: {profile!r} is not a profile of {', '.join(missing)}")
    exit_on_sigterm()  # the temporary folder is removed on SIGTERM too
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    rows = []
    amps = (False, True) if amp_dtype(torch.device("cpu")) is not None else (False,)
    with tempfile.TemporaryDirectory(prefix="bench-attack-train-") as tmp:
        for profile in args.profiles.split(","):
            for (kind, scale), amp in ((c, a) for c in CASES for a in amps):
                p = get_surrogate(kind).profiles[profile]
                side = max(p.patch, 16)
                run = Path(tmp) / f"{kind}-{scale}-{profile}-{amp}"
                make_pairs(run, scale, side)
                t0 = time.monotonic()
                r = train_surrogate(run, arch=kind, profile=profile, steps=args.steps, val_every=args.steps,
                                    checkpoint_every=args.steps, device="cpu", val_max_side=16, amp=amp,
                                    time_budget=None)
                rows.append({
                    "kind": kind, "scale": scale, "profile": profile, "arch": r.summary["arch"],
                    "amp": r.summary["amp_dtype"] or False,
                    "batch": r.summary["batch"], "patch_in": r.summary["patch"],
                    "patch_out": r.summary["patch"] * scale, "steps": args.steps,
                    "images_per_s": round(r.images_per_s, 2),
                    "ms_per_step": round(1000 * r.summary["train_s"] / args.steps, 1),
                    "wall_s": round(time.monotonic() - t0, 2),
                })
                logging.getLogger("bench").warning("%s", rows[-1])
    for row in rows:
        same = [b for b in rows if b["scale"] == row["scale"] and b["profile"] == row["profile"]]
        base = next(b for b in same if b["kind"] == "unet-l2" and b["amp"] == row["amp"])
        row["ratio_to_unet_l2"] = round(row["images_per_s"] / base["images_per_s"], 3)
        if row["amp"]:
            fp32 = next(b for b in same if b["kind"] == row["kind"] and not b["amp"])
            row["amp_speedup"] = round(row["images_per_s"] / fp32["images_per_s"], 3)
    result = {"benchmark": "attack_train", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "device": "cpu", "torch_threads": args.threads, "cpu_count": os.cpu_count(), "rows": rows}
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
