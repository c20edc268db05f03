"""One load-generator process for ``bench/serve.py`` (several run at once), or a stub server to measure them.

    python bench/loadgen.py drive --url URL --key KEY --body in.png --concurrency 16 --requests 128 --start-at T
    python bench/loadgen.py stub --port 8123 --reply out.png        # answers every POST with reply's bytes

``drive`` keeps ``concurrency`` requests in flight over keep-alive connections (opened before ``--start-at``,
a shared wall-clock instant so all processes start together) until ``requests`` were answered 200, and
prints one JSON line: per-request latencies of the 200s (seconds), refused (503/429, each retried after its
``Retry-After``, capped at 10 s), other errors, and the first/last instants. A refused attempt is not a request:
throughput counts answered images.

``stub`` is a minimal HTTP/1.1 keep-alive server (``SO_REUSEPORT``: several processes share the port) that
reads the body and answers with fixed bytes: what the load generator reaches against it is the client's
own ceiling, measured in the same run as the service.

Only the standard library and httpx are imported, so the processes start fast and stay small.
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


async def drive(url: str, key: str, body: bytes, concurrency: int, total: int, start_at: float,
                accept: str, max_retry_s: float) -> dict[str, object]:
    lat: list[float] = []
    refused = errors = 0
    remaining = total
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"X-API-Key": key, "Content-Type": "image/png", "Accept": accept}
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        async def one() -> httpx.Response:
            return await c.post(url, content=body, headers=headers)

        await asyncio.gather(*[one() for _ in range(min(concurrency, 2))])  # warm the route
        base = url.split("/v1/", 1)[0]
        await asyncio.gather(*[c.get(f"{base}/healthz") for _ in range(concurrency)])  # open every connection
        await asyncio.sleep(max(0.0, start_at - time.time()))

        async def worker() -> None:
            nonlocal remaining, refused, errors
            while remaining > 0:
                remaining -= 1
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
                        lat.append(time.perf_counter() - t0)
                    else:
                        errors += 1
                    break

        t_start = time.time()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        t_end = time.time()
    return {"latencies": lat, "refused": refused, "errors": errors, "t_start": t_start, "t_end": t_end}


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
    d.add_argument("--concurrency", type=int, required=True)
    d.add_argument("--requests", type=int, required=True)
    d.add_argument("--start-at", type=float, default=0.0)
    d.add_argument("--accept", default="image/png")
    d.add_argument("--max-retry-s", type=float, default=10.0)
    s = sub.add_parser("stub")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--reply", type=Path, required=True)
    args = ap.parse_args()
    if args.cmd == "stub":
        asyncio.run(stub(args.port, args.reply.read_bytes()))
        return
    res = asyncio.run(drive(args.url, args.key, args.body.read_bytes(), args.concurrency, args.requests,
                            args.start_at, args.accept, args.max_retry_s))
    sys.stdout.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
