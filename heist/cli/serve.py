"""``heist serve``: run the victim API with uvicorn (several workers share Redis for exact limits)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import typer

from heist.cli.common import config_option, console, err_console, victim_settings
from translators.errors import HeistError


def _stop_like_ctrl_c(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _check_bind(host: str, port: int) -> None:
    """Refuse, in one line, an address that cannot be bound (port in use, unknown host), by binding it once
    as uvicorn will (``SO_REUSEADDR``); uvicorn would only find out after every worker loaded its models."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise HeistError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            hint = "; stop the server using it or pass --port" if exc.errno == errno.EADDRINUSE else ""
            raise HeistError(f"cannot listen on {host}:{port} ({exc.strerror or exc}){hint}") from None


def serve(
    config: Path | None = config_option(),
    models_dir: Path | None = typer.Option(
        None, "--models-dir", help="Serve every .safetensors (+card), .pt and .pt2 file in this folder."
    ),
    host: str | None = typer.Option(None, help="Bind address (settings: host, default 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Port (settings: port, default 8000)."),
    workers: int | None = typer.Option(None, help="uvicorn worker processes (need redis_url when > 1)."),
    redis_url: str | None = typer.Option(None, "--redis-url", help="Redis for limits, keys and the query log."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    no_monitor: bool = typer.Option(False, "--no-monitor", help="Do not run the query monitor (docs/monitor.md)."),
    defense: list[str] = typer.Option(
        [], "--defense", help="Defense for every model of --models-dir: NAME or NAME:key=value,... (repeatable, "
        "applied in order), e.g. --defense trace_watermark --defense jpeg:quality=75."
    ),
) -> None:
    """Serve translation models over HTTP (see docs/victim-service.md)."""
    import uvicorn

    from defenses import parse_defense_spec
    from victim_service.models import check_sources, model_specs, prebuild_zoo
    from victim_service.process import worker_health
    from victim_service.settings import CONFIG_ENV, Settings

    resolved = victim_settings(config, host=host, port=port, workers=workers, redis_url=redis_url,
                               models_dir=str(models_dir.resolve()) if models_dir else None)
    settings = resolved.settings
    if no_monitor:
        settings = settings.model_copy(update={"monitor": settings.monitor.model_copy(update={"enabled": False})})
    specs_cli = [parse_defense_spec(d) for d in defense]  # one-line error (exit 2) naming the valid choices
    if specs_cli:
        if models_dir is None and settings.models_dir is None:
            raise HeistError("--defense applies to the models of --models-dir; pass --models-dir DIR, or list "
                             "defenses per model in the settings file")
        dflt = settings.models_dir_defaults
        base = dflt.model_dump() if dflt is not None else {"name": "models-dir", "source": "models-dir"}
        defaults = {**base, "defenses": [*base.get("defenses", []), *specs_cli]}
        settings = Settings.from_mapping({**settings.to_dict(), "models_dir_defaults": defaults}, resolved.origin)
    specs = model_specs(settings)  # fails early, with one line, when there is nothing to serve
    check_sources(specs)
    if settings.workers > 1 and not settings.redis_url:
        raise HeistError(
            "several workers need redis_url: the in-process rate limiter is exact only inside one process "
            "(use --workers 1, or --redis-url redis://127.0.0.1:6379/0)"
        )
    _check_bind(settings.host, settings.port)  # before the zoo builds and model loads, which take minutes
    prebuild_zoo(settings)
    tmp = Path(tempfile.mkdtemp(prefix="heist-serve-"))
    try:
        cfg = settings.to_json_file(tmp / "settings.json")
        os.environ[CONFIG_ENV] = str(cfg)
        if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            (tmp / "prom").mkdir()
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(tmp / "prom")
        names = ", ".join(s.name for s in specs)
        limiter = f"Redis {settings.redis_url}" if settings.redis_url else "in-process (embedded)"
        err_console.print(f"serving [bold]{names}[/bold] on http://{settings.host}:{settings.port} "
                          f"({settings.workers} worker(s), limits: {limiter}; settings: {resolved.origin}; "
                          f"API keys in {settings.store().describe()})", highlight=False)
        # uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler it found:
        # the default one would kill the process before the finally below deletes the settings file (it
        # holds the admin key). Stop as on Ctrl-C instead (docker stop, systemd, kill).
        previous = signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
        try:
            uvicorn.run(
                "victim_service.app:create_app_from_env", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_level=log_level, timeout_graceful_shutdown=5, **worker_health(),
            )
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    console.print("stopped")
