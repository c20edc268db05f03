"""Benchmark: evaluator throughput (images/s) for PSNR and SSIM on 256x256 RGB, Heist vs scikit-image, same run.

Pairs: 256x256 crops of the bundled photos (references) and the same crops with Gaussian noise
(sigma 0.05) clamped to [0, 1] (distorted), prepared once as float32 tensors (ours) and float64
``(H, W, 3)`` arrays (scikit-image) before timing, so neither side pays the other's conversion.

- ours, batched:   ``PSNR()(x, y)`` / ``SSIM()(x, y)`` on batches of ``--batch`` images (piq underneath,
  range validation, crop/colour handling, float32; SSIM in channels-last layout)
- ours, streaming: ``ScoreAggregator.add(metric(x_i, y_i), [name])`` one image at a time (what the
  extraction table and the campaign runner do)
- baseline:        ``skimage.metrics.peak_signal_noise_ratio`` / ``structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, channel_axis=2)`` per image (the reference the tests compare to)

Settings: data_range 1, no border crop, RGB. Ours and the baseline run in alternating passes (ABBA)
so load from other processes hits both; throughput is images / median pass time; speedups are the
median of per-pass ratios (ours/baseline throughput, > 1 means ours is faster). The largest
difference between our scores and scikit-image's is reported as a sanity check. Torch runs on
``--threads`` threads (default 1, like scikit-image).

Run: ``.venv/bin/python bench/eval_metrics.py [--images 32] [--repeats 5] [--batch 4]``; prints JSON and
writes ``bench/results/eval_metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import piq
import skimage
import torch
from _common import int_range
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from evaluation.aggregate import ScoreAggregator
from evaluation.metrics import PSNR, SSIM, ImageMetric, MetricSettings
from translators.corpus import load_images, tiles
from translators.files import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results" / "eval_metrics.json"
SIDE = 256


def pairs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` reference crops ``(n, 3, 256, 256)`` and noisy versions, deterministic."""
    per_photo = [tiles(im.image, SIDE) for im in load_images("corpus:all")]
    refs: list[torch.Tensor] = []
    k = 0
    while len(refs) < n:
        for ts in per_photo:
            if k < len(ts) and len(refs) < n:
                refs.append(ts[k])
        k += 1
    y = torch.cat(refs).contiguous()
    g = torch.Generator().manual_seed(seed)
    x = (y + 0.05 * torch.randn(y.shape, generator=g)).clamp(0, 1)
    return x, y


def _passes(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Seconds per pass for each function, in alternating order (ABBA...) after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(repeats):
        for name in order if r % 2 == 0 else reversed(order):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def bench_metric(metric: ImageMetric, baseline: Callable[[np.ndarray, np.ndarray], float], x: torch.Tensor,
                 y: torch.Tensor, xa: list[np.ndarray], ya: list[np.ndarray], batch: int, repeats: int
                 ) -> dict[str, object]:
    n = x.shape[0]

    def batched() -> None:
        for s in range(0, n, batch):
            metric(x[s : s + batch], y[s : s + batch])

    def streaming() -> None:
        agg = ScoreAggregator(metric.name)
        for i in range(n):
            agg.add(metric(x[i : i + 1], y[i : i + 1]), [str(i)])

    def base() -> None:
        for a, b in zip(xa, ya, strict=True):
            baseline(a, b)

    times = _passes({"batched": batched, "streaming": streaming, "baseline": base}, repeats)
    ours = metric(x, y).numpy()
    ref = np.array([baseline(a, b) for a, b in zip(xa, ya, strict=True)])
    ips = {k: n / statistics.median(v) for k, v in times.items()}
    ratio = {k: statistics.median(tb / t for t, tb in zip(times[k], times["baseline"], strict=True))
             for k in ("batched", "streaming")}
    return {
        "images_per_s": {"ours_batched": ips["batched"], "ours_streaming": ips["streaming"],
                         "baseline_skimage": ips["baseline"]},
        "speedup_vs_baseline": {"ours_batched": ratio["batched"], "ours_streaming": ratio["streaming"]},
        "max_abs_diff_vs_skimage": float(np.abs(ours - ref).max()),
        "mean_score": float(ours.mean()),
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int_range(1), default=32)
    parser.add_argument("--repeats", type=int_range(1), default=5)
    parser.add_argument("--batch", type=int_range(1), default=4)
    parser.add_argument("--threads", type=int_range(1), default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    x, y = pairs(args.images)
    xa = [t.permute(1, 2, 0).double().numpy() for t in x]
    ya = [t.permute(1, 2, 0).double().numpy() for t in y]
    settings = MetricSettings()

    def sk_psnr(a: np.ndarray, b: np.ndarray) -> float:
        return float(peak_signal_noise_ratio(b, a, data_range=1.0))

    def sk_ssim(a: np.ndarray, b: np.ndarray) -> float:
        return float(structural_similarity(b, a, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False))

    result: dict[str, object] = {
        "benchmark": "eval_metrics",
        "what": "PSNR/SSIM throughput on 256x256 RGB pairs: Heist evaluator (piq) vs scikit-image, same run",
        "images": args.images,
        "image_side": SIDE,
        "batch": args.batch,
        "repeats": args.repeats,
        "settings": settings.describe(),
        "psnr": bench_metric(PSNR(settings), sk_psnr, x, y, xa, ya, args.batch, args.repeats),
        "ssim": bench_metric(SSIM(settings), sk_ssim, x, y, xa, ya, args.batch, args.repeats),
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "piq": piq.__version__,
            "scikit_image": skimage.__version__,
            "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    }
    atomic_write_json(args.out, result, durable=False)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
