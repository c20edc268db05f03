"""Membership-inference throughput: MIA queries/s through the real API, and AKD training images/s.

    .venv/bin/python bench/mia.py                    # CPU, tiny sizes (about a minute)
    .venv/bin/python bench/mia.py --device cuda --side 256 --akd-steps 200 --candidates 200

A real victim (``victim_service.process``, one uvicorn worker, unlimited tier) serves a random U-Net of
the ``mia-edges`` tiny architecture. The bench writes members/non-members pair folders of ``side`` px
crops, runs :func:`attacker.mia.run_mia` (concurrency 1 and 4) and times it; then it trains an AKD student
(:func:`defenses.model_level.akd.distill`) for ``--akd-steps`` steps at batch 8 against the same teacher
and reports images/s (proxy set and teacher labelling included; after an untimed 2-step warm-up of each), next
to plain L1 distillation (DMP) in the same run as the baseline (``akd_over_dmp`` = the discriminator's cost).
Prints JSON and writes ``--out`` (default ``bench/results/mia.json`` in the repository, on the CPU only: a GPU
run writes a file only when ``--out`` is given).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import RESULTS, exit_on_sigterm, int_range  # noqa: E402
from _common import device as device_arg  # noqa: E402

from attacker.mia import load_candidates, run_mia  # noqa: E402
from defenses.model_level.akd import distill  # noqa: E402
from translators.archs.registry import build_arch  # noqa: E402
from translators.checkpoint import ModelCard, save_checkpoint  # noqa: E402
from translators.codecs import write_image  # noqa: E402
from translators.corpus import image_digest  # noqa: E402
from translators.zoo.membership import edge_map, private_crops  # noqa: E402
from victim_service.process import start_service  # noqa: E402
from victim_service.settings import Settings  # noqa: E402


def _victim(folder: Path, side: int, n: int) -> Path:
    """A random U-Net with a membership card and ``n`` + ``n`` pair folders (the timing does not need training)."""
    kw = {"norm": "none", "residual": False, "base": 24, "depth": 4, "max_channels": 96}
    torch.manual_seed(0)
    crops = private_crops(2 * n, side, seed=0)
    split: dict[str, Any] = {}
    for label, cs in (("members", crops[0::2]), ("non_members", crops[1::2])):
        for i, c in enumerate(cs):
            for sub, img in (("inputs", edge_map(c)), ("targets", c)):
                (folder / label / sub).mkdir(parents=True, exist_ok=True)
                write_image(img, folder / label / sub / f"{label[:3]}{i:04d}.png")
        split[label] = {"dir": str(folder / label), "n": len(cs), "side": side,
                        "digests": [image_digest(c) for c in cs]}
    card = ModelCard(name="mia", arch="unet", kwargs=kw, task="edges2photo", size_multiple=16, min_side=16,
                     membership=split)
    return save_checkpoint(build_arch("unet", kw).eval(), folder / "mia.safetensors", card)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (checked at once)")
    ap.add_argument("--side", type=int_range(16, 4096), default=32)
    ap.add_argument("--candidates", type=int_range(1), default=32, help="members (and as many non-members)")
    ap.add_argument("--akd-steps", type=int_range(1), default=30)
    ap.add_argument("--out", type=Path, default=None,
                    help="result file (default: bench/results/mia.json in the repository, CPU runs only)")
    args = ap.parse_args()
    exit_on_sigterm()  # SIGTERM stops the victim server and removes the temporary folder, as Ctrl-C does
    out_path = args.out or (RESULTS / "mia.json" if args.device == "cpu" else None)
    torch.set_num_threads(int(os.environ.get("HEIST_TORCH_THREADS", "1")))
    out: dict[str, Any] = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt = _victim(folder, args.side, args.candidates)
        settings = Settings.from_mapping({
            "models": [{"name": "mia", "source": str(ckpt)}], "tiers": {"open": {"rate": None}},
            "keys": [{"name": "b", "tier": "open", "key": "hk_bench_mia_0123456789abcdef"}],
            "data_dir": str(folder / "data"), "torch_threads": 1, "batch_probe_s": 0.03,
            "query_log": {"backend": "off"}})
        settings.to_json_file(folder / "settings.json")
        svc = start_service(folder / "settings.json", log_path=folder / "server.log")
        try:
            m = load_candidates(folder / "members", "members")
            n = load_candidates(folder / "non_members", "non-members")
            for conc in (1, 4):
                t0 = time.perf_counter()
                res = run_mia(str(svc.url), "hk_bench_mia_0123456789abcdef", "mia", m, n, concurrency=conc)
                dt = time.perf_counter() - t0
                out[f"mia_queries_per_s_c{conc}"] = round(res.queries / dt, 2)
        finally:
            svc.stop()
        methods = (("dmp", False), ("akd", True))
        for method, adversarial in methods:  # untimed: the device's first kernels (CUDA context, cuDNN) are not DMP's
            distill(ckpt, folder / f"warm-{method}.safetensors", name=method, adversarial=adversarial, steps=2,
                    device=args.device, n_proxy=8)
        for method, adversarial in methods:
            t0 = time.perf_counter()
            distill(ckpt, folder / f"{method}.safetensors", name=method, adversarial=adversarial,
                    steps=args.akd_steps, device=args.device, n_proxy=32)
            out[f"{method}_images_per_s"] = round(args.akd_steps * 8 / (time.perf_counter() - t0), 2)
    out["akd_over_dmp"] = round(out["akd_images_per_s"] / out["dmp_images_per_s"], 3)
    text = json.dumps(out, indent=2)
    print(text)  # noqa: T201 - the bench's output
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(text + "\n")


if __name__ == "__main__":
    main()
