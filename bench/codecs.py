"""Benchmark: PNG encode/decode time per 256x256 image, Heist's codec vs Pillow's default, same run.

Heist encodes PNG responses with zlib level 1 (``translators.codecs.encode_image``); Pillow's default
is level 6. Both sides start from the same float tensor ``(1, 3, 256, 256)`` in [0, 1] (what a model
returns) so both pay the tensor -> uint8 conversion:

- encode, ours:     ``encode_image(x)``                                  (compress_level=1)
- encode, baseline: ``Image.fromarray(to_uint8(x)).save(buf, "PNG")``    (Pillow default, level 6)
- decode, ours:     ``decode_image(ours_bytes)`` (header probe, limits, mode policy, -> float tensor)
- decode, baseline: ``from_uint8(np.asarray(Image.open(baseline_bytes).convert("RGB")))`` (no checks)

``ours_level6`` (our path at Pillow's level) separates the zlib level from our conversion overhead, and
``decode_speedup_same_files`` (both sides decode the Pillow-default files) isolates the cost of our checks.

The images are 256x256 crops of the bundled natural photos (noise would make every level equal).
Ours and the baseline are timed in alternating passes (ABBA) so load from other processes hits both;
times are the median over repeats of the mean per image, in milliseconds; speedups are the median of
the per-repeat ratios baseline/ours (>1 means ours is faster); the size ratio is ours/baseline.
OpenCV is not measured (not installed). Torch runs on one thread (``--threads``) to cut jitter.

Run: ``.venv/bin/python bench/codecs.py [--repeats 10] [--images 16]``; prints JSON and writes
``bench/results/codecs.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import PIL
import torch
from _common import int_range
from PIL import Image

from translators.codecs import decode_image, encode_image
from translators.corpus import load_images, tiles
from translators.files import atomic_write_json
from translators.images import from_uint8, to_uint8

RESULTS = Path(__file__).resolve().parent / "results" / "codecs.json"
SIDE = 256


def crops(n: int) -> list[torch.Tensor]:
    """``n`` 256x256 crops, cycling over the bundled photos (all splits), deterministic."""
    per_photo = [tiles(im.image, SIDE) for im in load_images("corpus:all")]
    out: list[torch.Tensor] = []
    k = 0
    while len(out) < n:
        for ts in per_photo:
            if k < len(ts) and len(out) < n:
                out.append(ts[k].contiguous())
        k += 1
    return out


def pillow_default_png(x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(to_uint8(x)).save(buf, "PNG")
    return buf.getvalue()


def pillow_decode(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        return from_uint8(np.asarray(img.convert("RGB")))


def paired_times(ours: Callable[[object], object], ours_items: list, base: Callable[[object], object],
                 base_items: list, repeats: int) -> tuple[float, float, float]:
    """Mean seconds per item for ``ours`` and ``base``, measured in alternating passes.

    The two sides take turns (ABBA order) so that load from other processes on a shared machine hits
    both alike; each repeat yields a ratio base/ours. Returns ``(median ours, median base, median ratio)``.
    One warm-up pass of each first.
    """
    for it in ours_items:
        ours(it)
    for it in base_items:
        base(it)

    def one_pass(fn: Callable[[object], object], items: list) -> float:
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        return (time.perf_counter() - t0) / len(items)

    t_ours, t_base, ratios = [], [], []
    for r in range(repeats):
        if r % 2 == 0:
            a = one_pass(ours, ours_items)
            b = one_pass(base, base_items)
        else:
            b = one_pass(base, base_items)
            a = one_pass(ours, ours_items)
        t_ours.append(a)
        t_base.append(b)
        ratios.append(b / a)
    return statistics.median(t_ours), statistics.median(t_base), statistics.median(ratios)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int_range(1), default=10)
    parser.add_argument("--images", type=int_range(1), default=16)
    parser.add_argument("--threads", type=int_range(1), default=1, help="torch threads (to_uint8/from_uint8)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    images = crops(args.images)
    ours_bytes = [encode_image(x) for x in images]
    base_bytes = [pillow_default_png(x) for x in images]
    for x, a, b in zip(images, ours_bytes, base_bytes, strict=True):  # both lossless: the same pixels come back
        q = from_uint8(to_uint8(x))
        if not (torch.equal(decode_image(a), q) and torch.equal(pillow_decode(b), q)):
            raise SystemExit("PNG round trip mismatch: the benchmark would compare different outputs")

    enc_ours, enc_base, enc_ratio = paired_times(encode_image, images, pillow_default_png, images, args.repeats)
    enc_l6, _, enc_l6_ratio = paired_times(lambda x: encode_image(x, png_compress_level=6), images,  # type: ignore[arg-type]
                                           pillow_default_png, images, args.repeats)
    dec_ours, dec_base, dec_ratio = paired_times(decode_image, ours_bytes, pillow_decode, base_bytes, args.repeats)
    # Same files on both sides: the cost of our checks alone, apart from the zlib level of the file.
    dec_same, dec_same_base, dec_same_ratio = paired_times(decode_image, base_bytes, pillow_decode, base_bytes,
                                                           args.repeats)
    size_ours = statistics.mean(len(b) for b in ours_bytes)
    size_base = statistics.mean(len(b) for b in base_bytes)

    result: dict[str, object] = {
        "benchmark": "codecs",
        "what": "PNG encode/decode per 256x256 RGB image: Heist codec (zlib level 1) vs Pillow default (level 6)",
        "images": len(images),
        "image_side": SIDE,
        "repeats": args.repeats,
        "encode_ms": {"ours_level1": enc_ours * 1e3, "baseline_pillow_default": enc_base * 1e3,
                      "ours_level6": enc_l6 * 1e3},
        "encode_speedup_vs_baseline": enc_ratio,
        "encode_speedup_level6_vs_baseline": enc_l6_ratio,
        "decode_ms": {"ours": dec_ours * 1e3, "baseline_pillow": dec_base * 1e3,
                      "ours_on_baseline_files": dec_same * 1e3, "baseline_pillow_same_run": dec_same_base * 1e3},
        "decode_speedup_vs_baseline": dec_ratio,
        "decode_speedup_same_files": dec_same_ratio,
        "bytes_mean": {"ours_level1": size_ours, "baseline_pillow_default": size_base},
        "size_ratio_vs_baseline": size_ours / size_base,
        "env": {
            "python": platform.python_version(),
            "pillow": PIL.__version__,
            "zlib": zlib.ZLIB_RUNTIME_VERSION,
            "torch": torch.__version__,
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
