"""The model host: one inference thread per device, fed by an asyncio-side dynamic batcher.

Flow of a request: the route decodes the image to ``(1, 3, H, W)`` and calls :meth:`ModelHost.infer`.
If the model already holds ``max_queue`` unfinished requests, or their expected wait (requests ahead /
the model's measured images per second) exceeds ``max_queue_wait_ms``, the call fails at once with
:class:`~victim_service.errors.OverloadedError` (HTTP 503 with ``Retry-After``): queue-time admission keeps
p99 latency bounded under overload while the device stays saturated. Otherwise the job joins the device's
pending groups, keyed by ``(model, H, W)``: only same-shaped requests of one model are stacked. The
device's batcher task takes the group with the oldest request; if it holds fewer than the model's
``max_batch`` jobs it waits up to ``max_delay_ms`` (counted from that oldest request's arrival) for more,
then hands the batch to the device's single worker thread. While the thread computes, new requests
accumulate, so under load batches fill without any waiting (as in Triton's dynamic batcher).

In the worker thread: stack (in pinned memory on CUDA) -> device (non-blocking copy) -> forward
(``torch.inference_mode``; ``no_grad`` when a defense needs autograd; AMP + channels_last on CUDA) -> each
request's defense pipeline (requests sharing a pipeline are defended together) -> CPU (pinned, one copy).
Timings come back for the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from defenses import DefenseContext, DefensePipeline, DefenseTiming
from translators.errors import ImageError
from victim_service.errors import OverloadedError
from victim_service.metrics import Metrics
from victim_service.models import ServedModel, load_served_model, model_specs, set_configured_batch, warm_up
from victim_service.policy import DefensePolicy
from victim_service.settings import Settings

log = logging.getLogger("heist.victim.host")


@dataclass
class Job:
    """One request's image on its way through the batcher."""

    model: ServedModel
    x: torch.Tensor  # (1, 3, H, W) float32 on CPU
    ctx: DefenseContext
    pipeline: DefensePipeline
    future: asyncio.Future[JobResult]
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple[str, int, int]:
        return self.model.name, int(self.x.shape[-2]), int(self.x.shape[-1])


@dataclass(frozen=True)
class JobResult:
    """``output``: ``(1, 3, sH, sW)`` float32 on CPU in [0, 1]; times in seconds; ``defenses``: ``describe()``
    (name and parameters) of each defense actually applied to this output, in order."""

    output: torch.Tensor
    queue_s: float
    infer_s: float
    batch_size: int
    defense_timings: tuple[DefenseTiming, ...]
    defenses: tuple[str, ...] = ()


@dataclass(frozen=True)
class _BatchOut:
    outputs: list[torch.Tensor]
    infer_s: float
    batch_s: float  # the whole batch on the device thread: copy in, forward, defenses, copy out
    timings: list[tuple[DefenseTiming, ...]]  # per job: the timings of the group it was defended in
    applied: list[tuple[str, ...]]  # per job: describe() of the defenses that ran on its output
    group_timings: list[tuple[DefenseTiming, ...]]  # once per pipeline group (what the metrics observe)
    group_sizes: list[int] = field(default_factory=list)  # requests in each pipeline group


class DeviceWorker:
    """The batcher task and the single inference thread of one device."""

    def __init__(self, device: torch.device, metrics: Metrics, defense_budget_ms: float | None = None) -> None:
        self.device = device
        self.metrics = metrics
        self.defense_budget_s = defense_budget_ms / 1000.0 if defense_budget_ms is not None else None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"heist-infer-{device}")
        self._pending: dict[tuple[str, int, int], deque[Job]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def run_in_thread(self, fn, *args):  # type: ignore[no-untyped-def]
        """Run ``fn(*args)`` on this device's worker thread (loading, warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.device}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for group in self._pending.values():
            for job in group:
                if not job.future.done():
                    job.future.set_exception(OverloadedError("the server is shutting down"))
        self._pending.clear()
        self.executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, job: Job) -> None:
        """Queue ``job`` or refuse it (:class:`OverloadedError`, 503 + ``Retry-After``) when the model's queue
        is full or its expected wait exceeds ``max_queue_wait_ms`` (queue-time admission)."""
        admit(job.model)
        job.model.inflight += 1
        self.metrics.queue_depth.labels(job.model.name).inc()
        self._pending.setdefault(job.key, deque()).append(job)
        self._wakeup.set()

    def _check_budget(self, model: str, t: DefenseTiming, requests: int) -> None:
        """Count and log a defense that ran longer than ``defense_budget_ms`` on a group of ``requests``
        (each request waited the whole group's defense time, so each counts once)."""
        if self.defense_budget_s is None or t.seconds <= self.defense_budget_s:
            return
        self.metrics.defense_over_budget.labels(model, t.name).inc(requests)
        log.warning("defense %s on model %s took %.1f ms for %d request(s): over the per-request defense budget "
                    "of %.1f ms", t.name, model, t.seconds * 1000.0, requests, self.defense_budget_s * 1000.0)

    def _finish(self, job: Job) -> None:
        job.model.inflight -= 1
        self.metrics.queue_depth.labels(job.model.name).dec()

    def _oldest(self) -> deque[Job] | None:
        best: deque[Job] | None = None
        for key in list(self._pending):
            group = self._pending[key]
            while group and group[0].future.done():  # cancelled (timed out) before running
                self._finish(group.popleft())
            if not group:
                del self._pending[key]
                continue
            if best is None or group[0].enqueued < best[0].enqueued:
                best = group
        return best

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = self._oldest()
            if group is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            model = group[0].model
            limit = model.max_batch
            if len(group) < limit and model.max_delay_s > 0:
                deadline = group[0].enqueued + model.max_delay_s
                while len(group) < limit:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
            jobs: list[Job] = []
            while group and len(jobs) < limit:
                job = group.popleft()
                if job.future.done():
                    self._finish(job)
                else:
                    jobs.append(job)
            if not jobs:  # every job of the group had been cancelled; _oldest() drops the empty group
                continue
            started = time.perf_counter()
            try:
                out: _BatchOut = await loop.run_in_executor(self.executor, _run_batch, model, jobs)
            except Exception as exc:  # noqa: BLE001 - delivered to every waiting request
                for job in jobs:
                    self._finish(job)
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            model.observe_batch(len(jobs), out.batch_s)
            self.metrics.batch_size.labels(model.name).observe(len(jobs))
            self.metrics.inference.labels(model.name).observe(out.infer_s)
            for group, size in zip(out.group_timings, out.group_sizes or [len(jobs)] * len(out.group_timings)):
                for t in group:
                    self.metrics.defense.labels(model.name, t.name).observe(t.seconds)
                    self._check_budget(model.name, t, size)
            for job, y, timings, applied in zip(jobs, out.outputs, out.timings, out.applied):
                self._finish(job)
                if not job.future.done():
                    job.future.set_result(
                        JobResult(y, started - job.enqueued, out.infer_s, len(jobs), timings, applied)
                    )


def _run_batch(model: ServedModel, jobs: list[Job]) -> _BatchOut:
    """Forward + defenses for same-shaped jobs of one model (runs on the device's worker thread)."""
    t0 = time.perf_counter()
    cuda = model.device.type == "cuda"
    if cuda:  # stage in page-locked memory (torch's caching host allocator reuses it) for an async copy
        staged = torch.empty((len(jobs), *jobs[0].x.shape[1:]), dtype=jobs[0].x.dtype, pin_memory=True)
        x = torch.cat([j.x for j in jobs], out=staged).to(model.device, non_blocking=True)
    else:
        x = torch.cat([j.x for j in jobs])
    needs_grad = any(j.pipeline.requires_grad for j in jobs)
    try:
        with torch.no_grad() if needs_grad else torch.inference_mode():
            y = model.forward(x)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise OverloadedError(f"model {model.name}: out of device memory for a batch of {len(jobs)}") from None
    except RuntimeError as exc:
        h, w = x.shape[-2:]
        log.warning("model %s failed on a %dx%d batch of %d: %s", model.name, w, h, len(jobs),
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise ImageError("bad_size", f"model {model.name} cannot process a {w}x{h} input") from None
    n, _, h, w = x.shape
    expected = (n, 3, h * model.scale, w * model.scale)
    if tuple(y.shape) != expected:
        raise RuntimeError(f"model {model.name} returned {tuple(y.shape)}, expected {expected}")
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    infer_s = time.perf_counter() - t0
    outputs: list[torch.Tensor | None] = [None] * n
    timings: list[tuple[DefenseTiming, ...]] = [()] * n
    applied: list[tuple[str, ...]] = [()] * n
    group_timings: list[tuple[DefenseTiming, ...]] = []
    group_sizes: list[int] = []
    by_pipe: dict[int, list[int]] = {}
    for i, j in enumerate(jobs):
        by_pipe.setdefault(id(j.pipeline), []).append(i)
    for idx in by_pipe.values():
        pipe = jobs[idx[0]].pipeline
        if not pipe:
            for i in idx:
                outputs[i] = y[i : i + 1]
            continue
        sel = torch.tensor(idx, device=y.device)
        mode = contextlib.nullcontext() if needs_grad else torch.inference_mode()
        with mode:
            sub, t = pipe.apply(y.index_select(0, sel), x.index_select(0, sel), [jobs[i].ctx for i in idx])
        group_timings.append(tuple(t))
        group_sizes.append(len(idx))
        names = tuple(pipe.names)
        for k, i in enumerate(idx):
            outputs[i] = sub[k : k + 1]
            timings[i] = tuple(t)
            applied[i] = names
    with torch.inference_mode():
        dev_out = torch.cat([o for o in outputs if o is not None]).float()
        if cuda:  # one pinned, non-blocking copy for the batch, then one wait
            cpu = torch.empty(dev_out.shape, dtype=dev_out.dtype, pin_memory=True)
            cpu.copy_(dev_out, non_blocking=True)
            torch.cuda.current_stream(model.device).synchronize()
        else:
            cpu = dev_out.cpu()
    outs = [cpu[i : i + 1] for i in range(n)]
    return _BatchOut(outs, infer_s, time.perf_counter() - t0, timings, applied, group_timings, group_sizes)


def admit(m: ServedModel) -> None:
    """Raise :class:`OverloadedError` (503 + ``Retry-After``) when ``m`` holds ``max_queue`` unfinished requests
    or its expected queue wait exceeds ``max_queue_wait_ms``; routes may call it before reading a body."""
    if m.inflight >= m.spec.max_queue:
        raise OverloadedError(
            f"model {m.name} has {m.inflight} requests queued (limit {m.spec.max_queue}); retry later",
            retry_after=_retry_after(m.expected_wait_s()),
        )
    wait = m.expected_wait_s()
    bound = m.spec.max_queue_wait_ms
    if bound is not None and wait is not None and wait * 1000.0 > bound:
        raise OverloadedError(
            f"model {m.name} is busy: about {wait:.1f} s of queued work (bound {bound / 1000:.1f} s); retry later",
            retry_after=_retry_after(wait),
        )


def _retry_after(wait_s: float | None) -> int:
    """Whole seconds a refused client should wait: the expected queue wait, at least 1."""
    return max(1, math.ceil(wait_s)) if wait_s is not None else 1


class ModelHost:
    """Loads the served models, sets up their defense pipelines (:class:`DefensePolicy`), and runs inference."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, ServedModel] = {}
        self.workers: dict[str, DeviceWorker] = {}
        self.policy = DefensePolicy(settings)

    async def start(self) -> None:
        """Load every model on its device's thread, warm up (and probe batch sizes), set up defenses."""
        from translators.device import pick_device

        for spec in model_specs(self.settings):
            dev = pick_device(spec.device)
            worker = self.workers.get(str(dev))
            if worker is None:
                worker = self.workers[str(dev)] = DeviceWorker(dev, self.metrics, self.settings.defense_budget_ms)
            model: ServedModel = await worker.run_in_thread(load_served_model, spec, self.settings)
            if self.settings.warmup or spec.max_batch == "auto":
                await worker.run_in_thread(warm_up, model, self.settings.batch_probe_s, self.settings.warmup)
            else:
                set_configured_batch(model)
            self.models[model.name] = model
            await self.policy.setup_model(model, worker.run_in_thread)
            log.info("serving %s (%s, x%d) from %s on %s, max_batch=%d (%s)", model.name, model.task, model.scale,
                     model.loaded.source, dev, model.max_batch, model.max_batch_source)
        for w in self.workers.values():
            w.start()

    def pipeline(self, model: str, tier: str, level: int = 0) -> DefensePipeline:
        """The defenses for (model, tier) at ``level`` (see :class:`DefensePolicy`)."""
        return self.policy.resolve(model, tier, level).pipeline

    async def infer(
        self, model: ServedModel, x: torch.Tensor, ctx: DefenseContext, timeout_s: float,
        pipeline: DefensePipeline | None = None,
    ) -> JobResult:
        """Queue ``x (1, 3, H, W)`` for ``model``, defended by ``pipeline`` (default: the one of ``ctx``'s tier
        and level); raises :class:`OverloadedError` when the model's queue is full."""
        loop = asyncio.get_running_loop()
        pipe = pipeline if pipeline is not None else self.pipeline(model.name, ctx.tier, ctx.level)
        job = Job(model, x, ctx, pipe, loop.create_future())
        self.workers[str(model.device)].submit(job)
        try:
            return await asyncio.wait_for(job.future, timeout_s)
        except TimeoutError:
            raise OverloadedError(f"model {model.name} did not answer within {timeout_s:.0f} s; retry later") from None

    async def close(self) -> None:
        for w in self.workers.values():
            await w.close()
