"""Run the victim service as a real uvicorn subprocess: start, wait until ready, stop or kill.

Used by the campaign runner, the attacker's tests and ``tests/servers.py``. Contract::

    from victim_service.process import start_service

    with start_service("configs/victim.toml", workers=2) as svc:   # port 0 = a free port
        print(svc.url)            # http://127.0.0.1:PORT
        ...                       # talk HTTP to it
    # leaving the block stops it (SIGTERM, then SIGKILL after `grace` seconds)

    svc = start_service(path, host="127.0.0.1", port=8000, workers=1, env={"HEIST_VICTIM_REDIS_URL": ...})
    svc.stop()                    # graceful
    svc.kill()                    # SIGKILL the whole process group at once (crash tests)

``start_service`` returns only when every worker has finished its start-up (models loaded and warmed up)
and ``GET /readyz`` answered 200; it raises :class:`ServiceStartError` with the tail of the server's log
if the process exits first or ``ready_timeout`` passes. The command is
``python -m uvicorn --factory victim_service.app:create_app_from_env`` with ``HEIST_VICTIM_CONFIG`` set to
the settings file; each worker writes ``$HEIST_VICTIM_READY_DIR/<pid>`` when ready, which is how all
``workers`` are awaited. ``PROMETHEUS_MULTIPROC_DIR`` points at a fresh temporary folder so ``/metrics``
sums every worker. ``zoo:`` models are built here, once, before the workers start. The server's
stdout/stderr go to ``log_path`` (a temporary file unless given).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

from translators.errors import HeistError
from victim_service.settings import CONFIG_ENV, resolve_settings

READY_DIR_ENV = "HEIST_VICTIM_READY_DIR"
#: Seconds a worker may take to answer the supervisor's ping before uvicorn kills and restarts it (uvicorn's
#: default is 5). A worker busy with CPU inference on a loaded machine answered late and was restarted,
#: dropping its in-flight requests and its key cache; a hung worker is still replaced, later.
WORKER_HEALTHCHECK_S = 60


def worker_health() -> dict[str, int]:
    """``timeout_worker_healthcheck`` (as a ``uvicorn.Config`` keyword) for uvicorn versions that have it
    (0.30 and later), else nothing. ``heist serve`` and :func:`start_service` both use it."""
    import inspect

    import uvicorn

    has = "timeout_worker_healthcheck" in inspect.signature(uvicorn.Config).parameters
    return {"timeout_worker_healthcheck": WORKER_HEALTHCHECK_S} if has else {}


class ServiceStartError(HeistError):
    """The service process exited or did not become ready in time."""

    code = "service_start_failed"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class ServiceProcess:
    """A running uvicorn process serving the victim API. ``url`` has no trailing slash."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    workers: int
    config_path: Path
    log_path: Path
    _tmp: Path = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def ready_workers(self) -> int:
        d = self._tmp / "ready"
        return sum(1 for _ in d.iterdir()) if d.exists() else 0

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until all workers are ready and ``/readyz`` answers 200 (or raise :class:`ServiceStartError`)."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as http:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise ServiceStartError(
                        f"victim service exited with code {self.proc.returncode} before it was ready:\n"
                        f"{self.log_tail()}"
                    )
                if self.ready_workers() >= self.workers:
                    try:
                        if http.get(f"{self.url}/readyz").status_code == 200:
                            return
                    except httpx.HTTPError:
                        pass
                time.sleep(0.05)
        tail = self.log_tail()
        self.kill()
        raise ServiceStartError(f"victim service not ready after {timeout:.0f} s:\n{tail}")

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM (uvicorn shuts down gracefully), SIGKILL after ``grace`` seconds. Returns the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()
        self._cleanup()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the server and its workers (its whole process group) without any shutdown."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._cleanup()

    def _cleanup(self) -> None:
        # Workers may outlive a SIGTERMed supervisor for a moment; take the group down for good.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _preflight(config_path: Path, env: dict[str, str], prebuild: bool) -> None:
    """Fail fast, with one clear error, on bad settings or missing model files (before any worker starts);
    build ``zoo:`` models once so the workers find them cached."""
    from victim_service.models import check_sources, model_specs, prebuild_zoo

    old = dict(os.environ)
    os.environ.update(env)  # the server will see these overrides; so must the check
    try:
        settings = resolve_settings(config_path).settings  # what the workers will resolve from HEIST_VICTIM_CONFIG
        check_sources(model_specs(settings))
        if prebuild:
            prebuild_zoo(settings)
    finally:
        os.environ.clear()
        os.environ.update(old)


def start_service(
    config: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    workers: int = 1,
    env: dict[str, str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    ready_timeout: float = 120.0,
    log_level: str = "warning",
    prebuild: bool = True,
) -> ServiceProcess:
    """Start ``uvicorn`` serving the settings file ``config``; returns once every worker is ready.

    Args:
        config: settings file (.toml, .yaml or .json) for :meth:`Settings.from_file`.
        port: 0 picks a free port.
        workers: uvicorn worker processes (share Redis for exact limits; without Redis use 1).
        env: extra environment variables for the server (e.g. ``HEIST_VICTIM_REDIS_URL``).
        log_path: where the server's output goes; a temporary file by default.
        prebuild: build ``zoo:`` models here before the workers start.

    Raises:
        SettingsError / CheckpointError: bad settings or a missing model file (checked before starting).
        ServiceStartError: the server exited or did not become ready within ``ready_timeout`` seconds.
    """
    config_path = Path(config).resolve()
    merged = {**os.environ, **(env or {})}
    _preflight(config_path, env or {}, prebuild)
    port = port or free_port(host)
    tmp = Path(tempfile.mkdtemp(prefix="heist-victim-"))
    (tmp / "ready").mkdir()
    (tmp / "prom").mkdir()
    log_file = Path(log_path) if log_path else tmp / "server.log"
    merged.update({
        CONFIG_ENV: str(config_path),
        READY_DIR_ENV: str(tmp / "ready"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp / "prom"),
        "PYTHONUNBUFFERED": "1",
    })
    cmd = [
        sys.executable, "-m", "uvicorn", "--factory", "victim_service.app:create_app_from_env",
        "--host", host, "--port", str(port), "--workers", str(workers), "--log-level", log_level,
        "--timeout-graceful-shutdown", "5", "--no-access-log",
        *(f"--{k.replace('_', '-')}={v}" for k, v in worker_health().items()),
    ]
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=merged, start_new_session=True)
    svc = ServiceProcess(proc, host, port, workers, config_path, log_file, tmp)
    try:
        svc.wait_ready(ready_timeout)
    except BaseException:
        svc.kill()
        raise
    return svc
