"""The query log: one entry per translate request, admitted or refused.

Backends (``[query_log] backend``): a Redis Stream ``{prefix}querylog`` (``XADD MAXLEN ~ maxlen``; one field
``e`` holding the entry as JSON) when Redis is configured, else a JSONL file (``DATA/victim/querylog.jsonl``,
one process: the embedded mode). Writes never block a request: entries go to an in-memory queue that a
background task drains in batches (one pipelined round trip per batch). When Redis is unreachable, the
batch is appended to ``querylog-spill.jsonl`` beside the JSONL log instead of being lost.

Reading (``heist log tail|export``, the admin route) goes through :class:`LogReader`, which opens the same
backend from the same settings. Raw images are stored only when ``store_images`` is set: under
``images_dir`` named by their SHA-256, so repeated queries are kept once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import redis
import redis.asyncio as aioredis
from pydantic import BaseModel, Field

from translators.files import atomic_path, atomic_write_bytes
from victim_service.settings import Settings

log = logging.getLogger("heist.victim.querylog")
STREAM_FIELD = b"e"
SKEW_S = 60.0  # how far a stream ID (Redis's clock) may lag an entry's ts (the server's clock)
REORDER_WINDOW = 1000  # entries read beyond what a tail needs, to find the ones replayed after an outage


class QueryLogEntry(BaseModel):
    """One translate request. Times are Unix seconds; sizes in pixels and bytes; latency in milliseconds."""

    ts: float = Field(description="arrival time, Unix seconds")
    request_id: str
    client: str | None = Field(None, description="client name; None when the key was missing or bad")
    tier: str | None = None
    key_id: str | None = Field(None, description="first 12 hex digits of the presented key's SHA-256")
    model: str | None = None
    status: int
    code: str = Field(description="'ok' or the error code returned")
    input_sha256: str | None = None
    phash: str | None = Field(None, description="64-bit DCT perceptual hash of the decoded input, hex")
    embedding: str | None = Field(None, description="crop-tolerant source descriptor of the decoded input "
                                  "(defenses.monitor.embedding, base64 float16) for the query monitor")
    regions: str | None = Field(None, description="shared-region fingerprint of the decoded input (corners and "
                                "their descriptors, defenses.monitor.regions, base64) for Sybil linking")
    width: int | None = None
    height: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    content_type: str | None = None
    latency_ms: float = 0.0
    queue_ms: float | None = None
    batch_size: int | None = None
    defenses: list[str] = Field(default_factory=list, description="the defenses applied, with parameters")
    level: int | None = Field(None, description="the client's escalation level that chose the defenses")
    ip: str | None = None
    worker: int = Field(default_factory=os.getpid)
    image_path: str | None = None


def jsonl_path(settings: Settings) -> Path:
    return settings.query_log.path or (settings.state_dir() / "querylog.jsonl")


def images_dir(settings: Settings) -> Path:
    return settings.query_log.images_dir or (settings.state_dir() / "query-images")


def stream_key(settings: Settings) -> str:
    return f"{settings.key_prefix}querylog"


def backend_of(settings: Settings) -> str:
    """``redis``, ``jsonl`` or ``off``: what ``backend = "auto"`` resolves to for these settings."""
    b = settings.query_log.backend
    if b == "auto":
        return "redis" if settings.redis_url else "jsonl"
    return b


def _append_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # One write() per batch with O_APPEND: lines from concurrent writers never interleave mid-line.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, "".join(line + "\n" for line in lines).encode())
    finally:
        os.close(fd)


class QueryLog:
    """Asynchronous writer. ``submit(entry)`` never blocks; ``await close()`` flushes what is queued."""

    def __init__(self, settings: Settings, aredis: aioredis.Redis | None) -> None:
        self.backend = backend_of(settings)
        if self.backend == "redis" and aredis is None:
            self.backend = "jsonl"
        self.r = aredis
        self.key = stream_key(settings)
        self.maxlen = settings.query_log.maxlen
        self.path = jsonl_path(settings)
        self.spill = self.path.with_name("querylog-spill.jsonl")
        self.store_images = settings.query_log.store_images
        self.images = images_dir(settings)
        self._queue: asyncio.Queue[QueryLogEntry] = asyncio.Queue(maxsize=100_000)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.spilled = 0
        self.replayed = 0
        self._spilling = False

    def start(self) -> None:
        if self.backend != "off" and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="querylog-writer")

    def submit(self, entry: QueryLogEntry) -> None:
        if self.backend == "off":
            return
        try:
            self._queue.put_nowait(entry)
        except asyncio.QueueFull:
            self.dropped += 1

    def save_image(self, sha256: str, data: bytes, fmt: str) -> str | None:
        """Keep the raw input when ``store_images`` is on; returns its path (or None)."""
        if not self.store_images:
            return None
        ext = {"jpeg": "jpg"}.get(fmt, fmt)
        p = self.images / sha256[:2] / f"{sha256}.{ext}"
        if not p.exists():
            atomic_write_bytes(p, data, durable=False)
        return str(p)

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            while len(batch) < 500:
                try:
                    batch.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            try:
                await self._write(batch)
            except Exception:
                log.exception("query log: could not write %d entries", len(batch))
                self.dropped += len(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, batch: list[QueryLogEntry]) -> None:
        lines = [e.model_dump_json() for e in batch]
        if self.backend == "redis" and self.r is not None:
            try:
                await self._xadd(lines)
            except (redis.RedisError, OSError) as exc:
                if not self._spilling:  # one warning per outage, not one per batch
                    log.warning("query log: Redis unreachable (%s); spilling entries to %s until it is back",
                                type(exc).__name__, self.spill)
                    self._spilling = True
                await asyncio.to_thread(_append_lines, self.spill, lines)
                self.spilled += len(lines)
                return
            if self._spilling or self.spill.exists():
                await self._replay_spill()
            return
        await asyncio.to_thread(_append_lines, self.path, lines)

    async def _xadd(self, lines: list[str]) -> None:
        pipe = self.r.pipeline(transaction=False)  # type: ignore[union-attr]
        for line in lines:
            pipe.xadd(self.key, {STREAM_FIELD: line}, maxlen=self.maxlen, approximate=True)
        await pipe.execute()

    async def _replay_spill(self) -> None:
        """Move the entries spilled during an outage into the stream (the monitor and ``heist log`` read only the
        stream). One worker claims the spill file by renaming it, so workers sharing the data dir never replay
        an entry twice; entries keep their own ``ts`` and land after the ones written since Redis came back.
        On a new failure the unsent rest goes back to the spill file."""
        claimed = self.spill.with_name(f"querylog-spill.{os.getpid()}.{uuid.uuid4().hex[:8]}.replaying")
        try:
            os.replace(self.spill, claimed)
        except FileNotFoundError:
            self._spilling = False
            return
        lines = [ln for ln in (await asyncio.to_thread(claimed.read_text)).splitlines() if ln.strip()]
        sent = 0
        try:
            for i in range(0, len(lines), 500):
                await self._xadd(lines[i:i + 500])
                sent = min(len(lines), i + 500)
        except (redis.RedisError, OSError):
            await asyncio.to_thread(_append_lines, self.spill, lines[sent:])
        finally:
            claimed.unlink(missing_ok=True)
        self.replayed += sent
        self._spilling = sent < len(lines)
        log.info("query log: Redis is back; %d spilled entries moved into the stream", sent)

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until every submitted entry is written (or ``timeout`` passes)."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)

    async def close(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


# ---------------------------------------------------------------------------------------------- reading


class LogReader:
    """Reads the log the settings point at (synchronously, for the CLI and exports)."""

    def __init__(self, settings: Settings) -> None:
        self.backend = backend_of(settings)
        self.settings = settings
        self.path = jsonl_path(settings)
        self.key = stream_key(settings)
        self._r = redis.Redis.from_url(settings.redis_url) if self.backend == "redis" and settings.redis_url else None

    def _redis(self) -> redis.Redis:
        if self._r is None:
            raise RuntimeError("no Redis configured")
        return self._r

    def iter_entries(self, since: float | None = None, client: str | None = None) -> Iterator[QueryLogEntry]:
        """In log order (oldest first, but entries replayed after a Redis outage come when they were replayed).
        ``since``: Unix seconds, compared with each entry's own ``ts``; ``client``: only that client's entries."""
        for e in self._iter_all(since):
            if (since is None or e.ts >= since) and (client is None or e.client == client):
                yield e

    def _iter_all(self, since: float | None) -> Iterator[QueryLogEntry]:
        if self.backend == "redis":
            r = self._redis()
            # A stream ID is the time Redis stored the entry, never much before the entry's ts (a minute of
            # clock skew allowed): start there, and let iter_entries filter on ts.
            start = f"{max(0, int((since - SKEW_S) * 1000))}-0" if since else "-"
            while True:
                chunk = r.xrange(self.key, min=start, max="+", count=1000)
                if not chunk:
                    return
                for _id, fields in chunk:
                    yield QueryLogEntry.model_validate_json(fields[STREAM_FIELD])
                last = chunk[-1][0].decode()
                ms, seq = last.split("-")
                start = f"{ms}-{int(seq) + 1}"
        elif self.backend == "jsonl":
            if not self.path.exists():
                return
            with open(self.path) as fh:
                for line in fh:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        e = QueryLogEntry.model_validate_json(line)
                    except ValueError:
                        continue  # a line cut short by a crash
                    if since is None or e.ts >= since:
                        yield e

    def tail(self, n: int = 20, client: str | None = None) -> list[QueryLogEntry]:
        """The ``n`` most recent entries (oldest first), optionally of one client."""
        if self.backend == "redis":
            # Entries spilled during an outage enter the stream when Redis returns, after newer ones: read
            # REORDER_WINDOW entries more than needed and keep the n latest by their own time.
            r = self._redis()
            out: list[QueryLogEntry] = []
            end, scanned = "+", 0
            while len(out) < n or scanned < n + REORDER_WINDOW:
                chunk = r.xrevrange(self.key, max=end, min="-", count=max(n * 2, 200))
                if not chunk:
                    break
                scanned += len(chunk)
                for _id, fields in chunk:
                    e = QueryLogEntry.model_validate_json(fields[STREAM_FIELD])
                    if client is None or e.client == client:
                        out.append(e)
                ms, seq = chunk[-1][0].decode().split("-")
                if int(seq) > 0:
                    end = f"{ms}-{int(seq) - 1}"
                elif int(ms) > 0:
                    end = f"{int(ms) - 1}-18446744073709551615"
                else:
                    break
            return sorted(out, key=lambda e: e.ts)[-n:] if n > 0 else []
        entries = list(self.iter_entries(client=client))
        return entries[-n:] if n > 0 else []

    def count(self) -> int:
        if self.backend == "redis":
            return int(self._redis().xlen(self.key))
        return sum(1 for _ in self.iter_entries())


def export_entries(entries: Iterator[QueryLogEntry], out: Path, fmt: str) -> int:
    """Write entries as ``jsonl`` or ``parquet`` to ``out`` atomically (temp file + rename). Returns the count."""
    with atomic_path(out) as tmp:  # an export that failed half-way leaves nothing behind
        return _write_entries(entries, tmp, fmt)


def _write_entries(entries: Iterator[QueryLogEntry], tmp: Path, fmt: str) -> int:
    n = 0
    if fmt == "jsonl":
        with open(tmp, "w") as fh:
            for e in entries:
                fh.write(e.model_dump_json() + "\n")
                n += 1
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([
            ("ts", pa.float64()), ("request_id", pa.string()), ("client", pa.string()), ("tier", pa.string()),
            ("key_id", pa.string()), ("model", pa.string()), ("status", pa.int32()), ("code", pa.string()),
            ("input_sha256", pa.string()), ("phash", pa.string()),
            ("embedding", pa.string()), ("regions", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
            ("bytes_in", pa.int64()), ("bytes_out", pa.int64()), ("content_type", pa.string()),
            ("latency_ms", pa.float64()), ("queue_ms", pa.float64()), ("batch_size", pa.int32()),
            ("defenses", pa.list_(pa.string())), ("level", pa.int32()), ("ip", pa.string()), ("worker", pa.int32()),
            ("image_path", pa.string()),
        ])
        with pq.ParquetWriter(str(tmp), schema) as writer:
            rows: list[dict[str, object]] = []
            for e in entries:
                rows.append(e.model_dump())
                n += 1
                if len(rows) >= 10_000:
                    writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                    rows = []
            if rows or n == 0:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    else:
        raise ValueError(f"unknown export format {fmt!r}")
    return n
