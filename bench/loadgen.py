"""One load-generator process for ``bench/serve.py`` (several run at once), or a stub server to measure them.

    python bench/loadgen.py drive --url URL --key KEY --body in.png --concurrency 16 --requests 128 --start-at T
    python bench/loadgen.py stub --port 8123 --reply out.png        # answers every POST with reply's bytes

``drive`` keeps ``concurrency`` requests in flight over keep-alive connections (opened before ``--start-at``,
a shared wall-clock instant so all processes start together) until ``requests`` were answered 200, and
prints one JSON line: per-request latencies of the 200s in seconds (``latencies``: end to end, from the first
attempt of the request to its answer, refused attempts and ``Retry-After`` waits included;
``attempt_latencies``: the answered attempt alone), refused (503/429, each retried after its ``Retry-After``,
capped at ``--max-retry-s``), other errors, and the first/last instants. A refused attempt is not a request:
throughput counts answered images. If the server cannot be reached at warm-up it exits 2 with one line.

``stub`` is a minimal HTTP/1.1 keep-alive server (``SO_REUSEPORT``: several processes share the port) that
reads the body and answers with fixed bytes: what the load generator reaches against it is the client's
own ceiling, measured in the same run as the service.

Only the standard library, httpx and ``bench/_common.py`` (standard library only) are imported, so the
processes start fast and stay small. A helper, not a benchmark: ``make bench`` does not run it on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import httpx
from _common import float_range, int_range


class UnreachableError(Exception):
    """The server did not answer the warm-up requests."""


async def drive(url: str, key: str, body: bytes, concurrency: int, total: int, start_at: float,
                accept: str, max_retry_s: float) -> dict[str, object]:
    lat: list[float] = []
    attempt: list[float] = []
    refused = errors = 0
    remaining = total
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"X-API-Key": key, "Content-Type": "image/png", "Accept": accept}
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        async def one() -> httpx.Response:
            return await c.post(url, content=body, headers=headers)

        try:
            await asyncio.gather(*[one() for _ in range(min(concurrency, 2))])  # warm the route
            base = url.split("/v1/", 1)[0]
            await asyncio.gather(*[c.get(f"{base}/healthz") for _ in range(concurrency)])  # open every connection
        except httpx.HTTPError as exc:
            raise UnreachableError(f"cannot reach {url}: {exc or type(exc).__name__}") from None
        await asyncio.sleep(max(0.0, start_at - time.time()))

        async def worker() -> None:
            nonlocal remaining, refused, errors
            while remaining > 0:
                remaining -= 1
                t_first = time.perf_counter()  # end-to-end latency starts at the first attempt
                while True:
                    t0 = time.perf_counter()
                    try:
                        r = await one()
                    except httpx.HTTPError:
                        errors += 1
                        break
                    if r.status_code in (429, 503):
                        refused += 1
                        await asyncio.sleep(min(float(r.headers.get("retry-after", "1")), max_retry_s))
                        continue
                    if r.status_code == 200:
                        now = time.perf_counter()
                        lat.append(now - t_first)
                        attempt.append(now - t0)
                    else:
                        errors += 1
                    break

        t_start = time.time()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        t_end = time.time()
    return {"latencies": lat, "attempt_latencies": attempt, "refused": refused, "errors": errors,
            "t_start": t_start, "t_end": t_end}


async def stub(port: int, reply: bytes) -> None:
    head = (f"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {len(reply)}\r\n\r\n").encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                raw = await reader.readuntil(b"\r\n\r\n")
                n = 0
                for line in raw.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        n = int(line.split(b":", 1)[1])
                if n:
                    await reader.readexactly(n)
                writer.write(head + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            writer.close()

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    server = await asyncio.start_server(handle, sock=sock, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("drive")
    d.add_argument("--url", required=True)
    d.add_argument("--key", required=True)
    d.add_argument("--body", type=Path, required=True)
    d.add_argument("--concurrency", type=int_range(1, 10_000), required=True)
    d.add_argument("--requests", type=int_range(1), required=True)
    d.add_argument("--start-at", type=float_range(0), default=0.0)
    d.add_argument("--accept", default="image/png")
    d.add_argument("--max-retry-s", type=float_range(0), default=10.0)
    s = sub.add_parser("stub")
    s.add_argument("--port", type=int_range(1, 65535), required=True)
    s.add_argument("--reply", type=Path, required=True)
    args = ap.parse_args()
    path = args.reply if args.cmd == "stub" else args.body
    if not path.is_file():
        ap.error(f"argument --{'reply' if args.cmd == 'stub' else 'body'}: {path}: no such file")
    if args.cmd == "stub":
        try:
            asyncio.run(stub(args.port, args.reply.read_bytes()))
        except OSError as exc:
            ap.exit(2, f"{ap.prog}: error: cannot serve on 127.0.0.1:{args.port}: {exc.strerror or exc}\n")
        return
    if not args.url.startswith(("http://", "https://")):
        ap.error(f"argument --url: {args.url!r} is not an http(s) URL")
    try:
        res = asyncio.run(drive(args.url, args.key, args.body.read_bytes(), args.concurrency, args.requests,
                                args.start_at, args.accept, args.max_retry_s))
    except UnreachableError as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    sys.stdout.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
