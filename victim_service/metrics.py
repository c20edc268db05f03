"""Prometheus metrics of one app, correct under several uvicorn workers.

Every app gets its own :class:`~prometheus_client.CollectorRegistry` (no import-time globals, so tests can
build several apps in one process). With ``PROMETHEUS_MULTIPROC_DIR`` set before ``prometheus_client`` is
imported (``victim_service.process`` and ``heist serve --workers N`` do it), every worker writes its
samples to memory-mapped files in that folder and ``/metrics`` aggregates all workers' files, whichever
worker answers the scrape.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client import values as prom_values

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)


def multiprocess_enabled() -> bool:
    """True when prometheus_client writes to ``PROMETHEUS_MULTIPROC_DIR`` (decided at its import)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR")) and prom_values.ValueClass is not prom_values.MutexValue


class Metrics:
    """The service's metrics. Label ``status`` is the HTTP status; ``tier`` is ``none`` for unknown clients."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "heist_requests_total", "Translate requests by model, HTTP status and client tier",
            ["model", "status", "tier"], registry=r)
        self.latency = Histogram(
            "heist_request_latency_seconds", "Translate request latency, arrival to response", ["model"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "heist_queue_wait_seconds", "Time from admission to the model host until the batch starts", ["model"],
            buckets=FAST_BUCKETS, registry=r)
        self.inference = Histogram(
            "heist_inference_seconds", "Forward time of one batch", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "heist_batch_size", "Requests per forward batch", ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.refusals = Counter(
            "heist_rate_limit_refusals_total", "Requests refused by the limiter", ["tier", "reason"], registry=r)
        self.limiter = Histogram(
            "heist_limiter_seconds", "Limiter decision time per request (one Redis round trip)",
            buckets=FAST_BUCKETS, registry=r)
        self.defense = Histogram(
            "heist_defense_seconds", "Output-defense time per batch, by defense", ["model", "defense"],
            buckets=FAST_BUCKETS, registry=r)
        self.defense_over_budget = Counter(
            "heist_defense_over_budget_total",
            "Requests whose output defense ran longer than the per-request defense budget (defense_budget_ms)",
            ["model", "defense"], registry=r)
        self.backend_errors = Counter(
            "heist_backend_errors_total", "Requests that met an unreachable Redis", ["component"], registry=r)
        self.queue_depth = Gauge(
            "heist_queue_depth", "Requests admitted to the model host and not finished", ["model"],
            multiprocess_mode="livesum", registry=r)

    def render(self) -> bytes:
        """Prometheus text exposition: all workers' samples in multiprocess mode, else this registry's."""
        if multiprocess_enabled():
            reg = CollectorRegistry()
            multiprocess.MultiProcessCollector(reg)
            return generate_latest(reg)
        return generate_latest(self.registry)
