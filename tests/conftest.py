"""Shared fixtures: real Redis (shared server with per-test key prefixes, or a private server),
free ports, and an isolated Heist data dir for the whole session.

The shared Redis is the one ``make test`` ensures at 127.0.0.1:6379 (override with ``HEIST_TEST_REDIS_URL``).
Tests that stop or flood Redis use :func:`private_redis`, which starts its own ``redis-server``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _worker_threads() -> int:
    """Torch threads for one test process: the CLI's policy (``default_threads``) split over the pytest-xdist
    workers (``make test`` runs one per core), so workers and the servers they start do not oversubscribe."""
    from translators.device import default_threads

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    return max(1, default_threads() // workers)


os.environ.setdefault("HEIST_TORCH_THREADS", str(_worker_threads()))  # inherited by servers the tests start
SHARED_REDIS_URL = os.environ.get("HEIST_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    """The same thread policy as the CLI (translators.device.default_threads)."""
    from translators.device import configure_threads

    configure_threads()


@pytest.fixture(autouse=True)
def _seeded_rngs() -> None:
    """Every test starts from the same global RNG state (torch, random), as a seeded run would: a test
    that builds a randomly initialised model without its own seed is then the same test in every run,
    not a new draw each time (CI once drew a narrow DnCNN whose ReLUs all switched off)."""
    import random

    import torch

    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def heist_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test session gets its own HEIST_DATA_DIR so nothing touches the user's cache."""
    d = tmp_path_factory.mktemp("heist-data")
    old = os.environ.get("HEIST_DATA_DIR")
    os.environ["HEIST_DATA_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("HEIST_DATA_DIR", None)
    else:
        os.environ["HEIST_DATA_DIR"] = old


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the shared real Redis; fails (never skips) with install advice when it is not running."""
    import redis

    try:
        redis.Redis.from_url(SHARED_REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"no Redis at {SHARED_REDIS_URL} ({exc}). Run the tests with `make test` (it starts one), "
            "or install redis-server (apt-get install redis-server) and start it."
        )
    return SHARED_REDIS_URL


@pytest.fixture
def key_prefix() -> str:
    """A unique Redis key prefix for one test, so tests never collide on the shared server."""
    return f"heist-test:{uuid.uuid4().hex[:12]}:"


@dataclass
class RedisServer:
    """A private redis-server process on a free port that a test may stop and restart."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.2).ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"private redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), workdir=tmp_path)
    server.start()
    yield server
    server.stop()
