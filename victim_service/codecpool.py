"""Image decode/encode off the event loop, on a thread pool sized to the machine's cores.

Pillow releases the GIL while it inflates/deflates and (de)quantises, so ``n`` threads encode about ``n``
PNGs at once (measured on a 16-core H200 host: 12x with 16 threads, issue 13). The event loop only
awaits; the device thread keeps computing the next batch while this pool decodes the requests that will
form it and encodes the results of the last one.

JPEG responses are encoded by nvJPEG (``torchvision.io.encode_jpeg`` on a CUDA tensor) when the model
runs on CUDA, torchvision offers it and ``output.gpu_jpeg`` is on: about 0.15 ms per 256x256 image
against about 8 ms for Pillow's PNG. GPU encodes are serialised per device (a lock; concurrent calls from
several threads have produced corrupt output, pytorch/vision#9060), which still allows thousands per second.
WebP has no GPU encoder and stays on Pillow; PNG (the lossless default) stays on Pillow too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import torch

from translators.codecs import ImageFormat, encode_image
from translators.images import to_uint8
from victim_service.settings import OutputSettings

log = logging.getLogger("heist.victim.codecs")
P = ParamSpec("P")
T = TypeVar("T")


def pool_size(threads: int | None) -> int:
    """Threads of the pool: ``threads`` when set, else the cores this process may use."""
    if threads:
        return threads
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


def gpu_jpeg_available(device: torch.device) -> bool:
    """Whether ``torchvision.io.encode_jpeg`` can encode a CUDA tensor on ``device`` (tried once)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import encode_jpeg

        encode_jpeg(torch.zeros(3, 16, 16, dtype=torch.uint8, device=device), quality=90)
    except (ImportError, RuntimeError, TypeError) as exc:
        log.info("nvJPEG encoding unavailable on %s (%s): JPEG responses use Pillow", device, exc)
        return False
    return True


class CodecPool:
    """The service's codec threads (``Services.codecs``). ``run`` for any codec call; ``encode`` for responses."""

    def __init__(self, output: OutputSettings, threads: int | None = None) -> None:
        self.output = output
        self.threads = pool_size(threads)
        self.executor = ThreadPoolExecutor(self.threads, thread_name_prefix="heist-codec")
        self._gpu_jpeg: dict[str, bool] = {}
        self._gpu_locks: dict[str, threading.Lock] = {}
        self.gpu_encoded = 0  # responses encoded by nvJPEG (tests and the benchmark read it)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on a codec thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))

    def enable_gpu_jpeg(self, device: torch.device) -> bool:
        """Probe nvJPEG on ``device`` (at start-up, from the device's thread); remembered for :meth:`encode`."""
        key = str(device)
        if key not in self._gpu_jpeg:
            self._gpu_jpeg[key] = self.output.gpu_jpeg and gpu_jpeg_available(device)
        return self._gpu_jpeg[key]

    def encode_sync(self, t: torch.Tensor, fmt: ImageFormat, device: torch.device | None = None) -> bytes:
        """``(1, 3, H, W)`` float in [0, 1] -> bytes; JPEG on ``device``'s nvJPEG when it was enabled."""
        o = self.output
        if fmt == "jpeg" and device is not None and self._gpu_jpeg.get(str(device)):
            from torchvision.io import encode_jpeg

            u8 = torch.from_numpy(to_uint8(t)).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
            # one encode at a time per device, input copy finished first: concurrent CUDA encode_jpeg calls
            # from several threads have produced corrupt JPEGs (pytorch/vision#9060)
            with self._gpu_locks.setdefault(str(device), threading.Lock()):
                src = u8.to(device)
                torch.cuda.current_stream(device).synchronize()
                data = encode_jpeg(src, quality=o.jpeg_quality).cpu()
                self.gpu_encoded += 1
            return bytes(data.numpy().tobytes())
        quality = o.jpeg_quality if fmt == "jpeg" else o.webp_quality
        return encode_image(t, fmt, quality=quality, png_compress_level=o.png_compress_level)

    async def encode(self, t: torch.Tensor, fmt: ImageFormat, device: torch.device | None = None) -> bytes:
        """:meth:`encode_sync` on a codec thread."""
        return await self.run(self.encode_sync, t, fmt, device)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
