"""Upload edge cases of the translate route against a real server (embedded mode: no Redis, JSONL query log):
sizes reported upright and logged for size refusals, one ``image`` part per multipart body, the
configured byte limit in ``too_many_bytes`` details, damaged pixel streams refused (not served black),
and clients that hang up or stall mid-upload."""

from __future__ import annotations

import io
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.servers import VictimServer, image_bytes, start_victim, tiny_models
from victim_service.querylog import LogReader

MAX_BYTES = 1_000_000
BODY_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictimServer]:
    root = tmp_path_factory.mktemp("uploads")
    models = tiny_models(root / "models", ("denoise",))
    server = start_victim(
        root,
        models=[
            {"name": "denoise", "source": str(models["denoise"]), "max_batch": 1, "min_side": 16,
             "max_bytes": MAX_BYTES},
            {"name": "small", "source": str(models["denoise"]), "max_batch": 1, "max_pixels": 64 * 64},
        ],
        tiers={"unlimited": {"rate": None}},
        keys={"bob": "unlimited"},
        extra={"body_timeout_s": BODY_TIMEOUT_S},
    )
    yield server
    server.stop()


def _post(srv: VictimServer, model: str, ctype: str | None = None, **kwargs: object) -> httpx.Response:
    headers = {**srv.headers("bob"), **({"Content-Type": ctype} if ctype else {})}
    return httpx.post(f"{srv.url}/v1/models/{model}/translate", headers=headers, timeout=30,
                      **kwargs)  # type: ignore[arg-type]


def _sideways_jpeg(width: int, height: int) -> bytes:
    """A JPEG stored ``width x height`` whose EXIF orientation 6 makes it ``height x width`` upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def _flat_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 130, 140)).save(buf, "PNG")
    return buf.getvalue()


# --- bug 5: upright sizes in too_small, sizes of refused images in the log ----------------------------------


def test_too_small_names_the_upright_size_and_logs_it(srv: VictimServer) -> None:
    r = _post(srv, "denoise", "image/jpeg", content=_sideways_jpeg(60, 12))
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "too_small"
    assert "image is 12x60;" in r.json()["detail"]
    e = srv.log_entry(r.headers["x-request-id"])
    assert (e.code, e.width, e.height) == ("too_small", 12, 60)


def test_too_many_pixels_logs_the_header_size(srv: VictimServer) -> None:
    r = _post(srv, "small", "image/png", content=_flat_png(80, 70))
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "too_many_pixels"
    e = srv.log_entry(r.headers["x-request-id"])
    assert (e.code, e.width, e.height) == ("too_many_pixels", 80, 70)


# --- bug 6: one image part ----------------------------------------------------------------------------------------


def test_two_image_parts_are_refused(srv: VictimServer) -> None:
    one, two = image_bytes(16, 16, seed=1), image_bytes(16, 24, seed=2)
    r = _post(srv, "denoise", files=[("image", ("a.png", one, "image/png")), ("image", ("b.png", two, "image/png"))])
    assert r.status_code == 400, r.headers
    assert r.json()["error"] == "bad_multipart"
    assert "send one image part" in r.json()["detail"]
    assert srv.log_entry(r.headers["x-request-id"]).code == "bad_multipart"
    single = _post(srv, "denoise", files={"image": ("a.png", one, "image/png")})
    assert single.status_code == 200, single.text


# --- bug 7: the configured byte limit in the detail -----------------------------------------------------------


def _chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_an_oversized_multipart_body_reports_the_configured_limit(srv: VictimServer) -> None:
    big = image_bytes(16, 16) + b"\0" * 1_200_000
    r = _post(srv, "denoise", files={"image": ("a.png", big, "image/png")})
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "too_many_bytes"
    assert f"the limit is {MAX_BYTES}" in r.json()["detail"]
    assert str(MAX_BYTES + 64 * 1024) not in r.json()["detail"]
    # Without Content-Length (chunked), the body is cut off while streaming: same limit in the detail.
    multipart = httpx.Request("POST", srv.url, files={"image": ("a.png", big, "image/png")})
    streamed = _post(srv, "denoise", multipart.headers["content-type"], content=_chunks(multipart.read()))
    assert streamed.status_code == 413, streamed.text
    assert streamed.json()["detail"] == f"the body is over {MAX_BYTES} bytes; the limit is {MAX_BYTES}"
    # A raw body over the limit says the same.
    raw = _post(srv, "denoise", "image/png", content=big)
    assert raw.status_code == 413
    assert f"the limit is {MAX_BYTES}" in raw.json()["detail"]


# --- bug 1, API side: BMP and TIFF stay refused as documented -------------------------------------------------


@pytest.mark.parametrize("fmt", ["BMP", "TIFF"])
def test_the_api_keeps_refusing_bmp_and_tiff(srv: VictimServer, fmt: str) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buf, fmt)
    r = _post(srv, "denoise", "application/octet-stream", content=buf.getvalue())
    assert r.status_code == 415, r.text
    assert r.json()["error"] == "unsupported_format"


# --- damaged pixel data: 400 corrupt_image, never a 200 with a half-decoded (black) image ---------------------


def _gradient_png(width: int = 64, height: int = 48) -> bytes:
    x = np.linspace(0, 200, width, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 50, (height, width, 3), dtype=np.uint8)
    arr = np.stack([np.tile(x, (height, 1))] * 3, axis=-1) + noise
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "PNG")
    return buf.getvalue()


def _interlaced_png(width: int = 64, height: int = 48) -> bytes:
    """An Adam7-interlaced RGB PNG (Pillow cannot write one), its seven passes filtered with filter 0."""
    arr = np.asarray(Image.open(io.BytesIO(_gradient_png(width, height))))
    raw = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)):
        sub = arr[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\x00" + row.tobytes() for row in sub)
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1))
    return b"\x89PNG\r\n\x1a\n" + ihdr + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _flip_idat_byte(png: bytes) -> bytes:
    """The PNG with one byte in the middle of its compressed pixel data flipped."""
    at = png.index(b"IDAT") + 4 + (struct.unpack(">I", png[png.index(b"IDAT") - 4 : png.index(b"IDAT")])[0] // 2)
    return png[:at] + bytes([png[at] ^ 0xFF]) + png[at + 1 :]


@pytest.mark.parametrize("case", ["flipped pixel byte", "truncated interlaced"])
def test_a_damaged_pixel_stream_is_refused_not_served_black(srv: VictimServer, case: str) -> None:
    png = _flip_idat_byte(_gradient_png()) if case == "flipped pixel byte" else _interlaced_png()[:3000]
    assert np.asarray(Image.open(io.BytesIO(_interlaced_png()))).shape == (48, 64, 3)  # the whole file decodes
    r = _post(srv, "denoise", "image/png", content=png)
    assert r.status_code == 400, (r.status_code, r.text[:200])
    assert r.json()["error"] == "corrupt_image"
    assert srv.log_entry(r.headers["x-request-id"]).code == "corrupt_image"
    assert _post(srv, "denoise", "image/png", content=_gradient_png()).status_code == 200


def test_a_metadata_bomb_is_named_as_such(srv: VictimServer) -> None:
    png = _gradient_png()
    bomb = _chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * 20_000_000, 9))
    at = png.index(b"IDAT") - 4
    r = _post(srv, "denoise", "image/png", content=png[:at] + bomb + png[at:])
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "corrupt_image"
    assert "decompresses to more than the decoder allows" in r.json()["detail"]


# --- clients that hang up or stall mid-upload -------------------------------------------------------------------


def _raw_request(srv: VictimServer, declared: int, sent: bytes) -> socket.socket:
    u = urlsplit(srv.url)
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    head = (f"POST /v1/models/denoise/translate HTTP/1.1\r\nHost: {u.hostname}\r\nX-API-Key: {srv.keys['bob']}\r\n"
            f"Content-Type: image/png\r\nContent-Length: {declared}\r\n\r\n")
    sock.sendall(head.encode() + sent)
    return sock


def test_a_stalled_upload_gets_408_and_a_hang_up_is_logged_as_499(srv: VictimServer) -> None:
    png = _gradient_png()
    sock = _raw_request(srv, len(png), png[:10])
    t0 = time.monotonic()
    answer = ""
    while "}" not in answer:  # headers and the JSON body may come in separate packets
        part = sock.recv(4096).decode("latin-1")
        if not part:
            break
        answer += part
    sock.close()
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert '"body_timeout"' in answer
    assert BODY_TIMEOUT_S * 0.5 < time.monotonic() - t0 < BODY_TIMEOUT_S + 20
    rid = next(line.split(":", 1)[1].strip() for line in answer.splitlines() if line.lower().startswith("x-request-id"))
    assert (srv.log_entry(rid).status, srv.log_entry(rid).code) == (408, "body_timeout")

    time.sleep(0.5)  # the asynchronous log writer: entries of earlier requests land before the snapshot
    before = {e.request_id for e in LogReader(srv.settings).iter_entries()}
    _raw_request(srv, len(png), png[:10]).close()  # hangs up after 10 of the declared bytes
    deadline = time.monotonic() + 10
    new: list[tuple[int, str]] = []
    while time.monotonic() < deadline and (499, "client_closed") not in new:
        new = [(e.status, e.code) for e in LogReader(srv.settings).iter_entries() if e.request_id not in before]
        time.sleep(0.1)
    assert (499, "client_closed") in new
    assert all(status < 500 for status, _ in new), new
    assert httpx.get(f"{srv.url}/healthz", timeout=10).status_code == 200
