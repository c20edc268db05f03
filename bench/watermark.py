"""Benchmark: the client-traceable watermark (``trace_watermark``): cost, honest-user quality, robustness.

For ``--images`` crops of the bundled natural photos at each ``--sizes`` side (random positions, seeded),
each crop is watermarked for a client drawn from ``--clients`` names by the real defense
(``TraceWatermark.apply`` with a :class:`DefenseContext`), PNG-quantised as the API serves it, then:

- cost: wall time of ``apply`` per image (ms; median and mean over crops), on ``--device`` (the embedding's
  FFT work runs on the CPU in float64 whatever the device; the device only holds the output tensor);
- honest-user quality: PSNR and SSIM (``evaluation.metrics``, RGB, data_range 1) of watermarked vs clean;
- robustness: for each distortion, bit accuracy of the blind-decoded 32-bit id (after error correction)
  and of the 56 raw code bits, and the identification rate: ``identify`` names the right client among
  all ``--clients`` candidates at false-match probability <= 1e-6 (a wrong name counts as a failure and
  is also reported as ``wrong``);
- calibration (the null): the same crops *unmarked* are traced against the same candidates; the false
  identification rate and the distribution of the nearest candidate's distance are reported next to the
  binomial model ``P(Bin(56, 1/2) <= d)`` that ``p_false_match`` assumes.

Distortions: ``png`` (round trip), ``jpeg75``, ``resize_half`` (bicubic 0.5x then back), ``crop50``
(a random crop of half the area, side x 0.707), ``crop_half_side`` (quarter of the area),
``noise002`` (Gaussian sigma 0.02, clamped, PNG), ``thief_jpeg90`` and ``thief_webp80`` (the served PNG
re-encoded by the thief as JPEG 90 / WebP 80).

Run: ``python bench/watermark.py [--images 24] [--sizes 128 256] [--device cpu|cuda]``; prints JSON and
writes ``bench/results/watermark.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import device as device_arg
from _common import int_range

from defenses import DefenseContext, request_rng
from defenses.watermark import codes
from defenses.watermark.trace import TraceWatermark, identify, read_trace
from evaluation.metrics import psnr, ssim
from translators.corpus import load_images
from translators.images import from_uint8, to_uint8


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(to_uint8(x), "RGB")


def _ten(im: Image.Image) -> torch.Tensor:
    return from_uint8(np.array(im.convert("RGB")))


def _codec(x: torch.Tensor, fmt: str, **kw: int) -> torch.Tensor:
    buf = io.BytesIO()
    _pil(x).save(buf, fmt, **kw)
    buf.seek(0)
    with Image.open(buf) as im:
        return _ten(im)


def distortions(rng: np.random.Generator) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    def resize_half(x: torch.Tensor) -> torch.Tensor:
        im = _pil(x)
        w, h = im.size
        return _ten(im.resize((w // 2, h // 2), Image.BICUBIC).resize((w, h), Image.BICUBIC))

    def crop(frac: float) -> Callable[[torch.Tensor], torch.Tensor]:
        def f(x: torch.Tensor) -> torch.Tensor:
            h, w = x.shape[-2:]
            ch, cw = round(h * frac), round(w * frac)
            y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return x[..., y0 : y0 + ch, x0 : x0 + cw]
        return f

    def noise(x: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(rng.integers(0, 2**31)))
        return _codec((x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1), "PNG")

    return {
        "png": lambda x: _codec(x, "PNG"),
        "jpeg75": lambda x: _codec(x, "JPEG", quality=75),
        "resize_half": resize_half,
        "crop50": crop(math.sqrt(0.5)),
        "crop_half_side": crop(0.5),
        "noise002": noise,
        "thief_jpeg90": lambda x: _codec(x, "JPEG", quality=90),
        "thief_webp80": lambda x: _codec(x, "WEBP", quality=80),
    }


def crops(size: int, n: int, rng: np.random.Generator) -> list[torch.Tensor]:
    photos = [im.image for im in load_images("corpus:all", max_side=max(2 * size, 256))]
    out = []
    for i in range(n):
        x = photos[i % len(photos)]
        h, w = x.shape[-2:]
        if min(h, w) < size:
            x = torch.nn.functional.interpolate(x, scale_factor=size / min(h, w) + 1e-3, mode="bicubic").clamp(0, 1)
            h, w = x.shape[-2:]
        y0, x0 = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        out.append(_codec(x[..., y0 : y0 + size, x0 : x0 + size], "PNG"))
    return out


def run(args: argparse.Namespace) -> dict[str, object]:
    rng = np.random.default_rng(args.seed)
    device = torch.device(args.device)
    secret = 0x5EC12E7
    clients = [f"client-{i:04d}" for i in range(args.clients)]
    defense = TraceWatermark()
    results: dict[str, object] = {}
    for size in args.sizes:
        images = crops(size, args.images, rng)
        dist = distortions(rng)
        ms: list[float] = []
        ps: list[float] = []
        ss: list[float] = []
        bit_acc: dict[str, list[float]] = {k: [] for k in dist}
        code_acc: dict[str, list[float]] = {k: [] for k in dist}
        ident: dict[str, list[int]] = {k: [] for k in dist}
        wrong: dict[str, int] = dict.fromkeys(dist, 0)
        null_false, null_d = 0, []
        for i, clean in enumerate(images):
            who = clients[int(rng.integers(0, len(clients)))]
            ctx = DefenseContext(client_id=who, request_id=f"r{i}", model="bench", tier="free",
                                 rng=request_rng(i), secret=secret)
            x = clean.to(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            y = defense.apply(x, x, ctx)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ms.append((time.perf_counter() - t0) * 1000)
            served = _codec(y.cpu(), "PNG")
            ps.append(float(psnr(served, clean, data_range=1.0)))
            ss.append(float(ssim(served, clean, data_range=1.0)))
            truth_id = codes.client_id(secret, who)
            truth_bits = codes.id_bits(truth_id)
            truth_code = codes.encode(truth_id)
            for name, f in dist.items():
                z = f(served)
                r = read_trace(z, secret)
                bit_acc[name].append(float((codes.id_bits(r.payload_id) == truth_bits).float().mean()))
                code_acc[name].append(float((r.code_bits == truth_code).float().mean()))
                m = identify(z, secret, clients)
                ident[name].append(int(m.client == who))
                wrong[name] += int(m.client is not None and m.client != who)
            m0 = identify(clean, secret, clients)
            null_false += int(m0.client is not None)
            null_d.append(m0.distance)
        n = len(images)
        results[str(size)] = {
            "images": n,
            "embed_ms_median": round(statistics.median(ms), 2),
            "embed_ms_mean": round(statistics.fmean(ms), 2),
            "psnr_db_mean": round(statistics.fmean(ps), 2),
            "psnr_db_min": round(min(ps), 2),
            "ssim_mean": round(statistics.fmean(ss), 4),
            "ssim_min": round(min(ss), 4),
            "distortions": {
                k: {
                    "id_bit_accuracy": round(statistics.fmean(bit_acc[k]), 4),
                    "code_bit_accuracy": round(statistics.fmean(code_acc[k]), 4),
                    "identification_rate": round(sum(ident[k]) / n, 4),
                    "wrong_client": wrong[k],
                }
                for k in dist
            },
            "null_unmarked": {
                "false_identifications": null_false,
                "nearest_distance_mean": round(statistics.fmean(null_d), 2),
                "nearest_distance_min": min(null_d),
                "model_expected_min_distance_over_candidates": "about 20 of 56 for 100 candidates",
                "model_p_at_observed_min": codes.binomial_tail(56, min(null_d)) * len(clients),
            },
        }
    return {
        "bench": "watermark",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
                    "torch_threads": torch.get_num_threads(), "load_average_1m": round(os.getloadavg()[0], 2)},
        "settings": {"images_per_size": args.images, "sizes": args.sizes, "candidates": args.clients,
                     "strength": defense.params.strength, "max_rms": defense.params.max_rms,
                     "max_false_match": 1e-6, "seed": args.seed, "photos": "corpus:all (bundled)"},
        "results": results,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int_range(1), default=24)
    p.add_argument("--sizes", type=int_range(16, 8192), nargs="+", default=[128, 256])
    p.add_argument("--clients", type=int_range(1), default=100)
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (checked at once)")
    p.add_argument("--threads", type=int_range(1), default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "watermark.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    report = run(args)
    text = json.dumps(report, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)  # noqa: T201


if __name__ == "__main__":
    main()
