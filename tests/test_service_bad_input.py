"""Every kind of bad input gets a 4xx JSON ``{error, detail}`` and a query-log entry, never a 500.

The server runs in embedded mode (no Redis: in-process limiter, JSONL query log) with the strict image
policy (alpha and 16-bit refused) so both sides of the mode policy are exercised across the test files.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.servers import VictimServer, image_bytes, start_victim, tiny_models
from victim_service.querylog import LogReader


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A 100-byte PNG whose header declares ``width x height`` RGB pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictimServer]:
    root = tmp_path_factory.mktemp("bad")
    models = tiny_models(root / "models", ("denoise", "unet8"))
    server = start_victim(
        root,
        models=[
            {"name": "denoise", "source": str(models["denoise"]), "max_batch": 1},
            {"name": "unet8", "source": str(models["unet8"]), "max_batch": 1},
            {"name": "small", "source": str(models["denoise"]), "max_batch": 1, "max_bytes": 3000,
             "max_pixels": 64 * 64},
        ],
        tiers={"unlimited": {"rate": None}},
        keys={"bob": "unlimited"},
        extra={"images": {"alpha": "refuse", "bit16": "refuse"}},
    )
    yield server
    server.stop()


def _multipart(fields: dict[str, tuple[str, bytes, str]], boundary: str = "XyZ") -> tuple[bytes, str]:
    parts = []
    for name, (filename, data, ctype) in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def flat_png(w: int, h: int) -> bytes:
    """A one-colour PNG: a few hundred bytes however many pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 130, 140)).save(buf, "PNG")
    return buf.getvalue()


PNG = image_bytes(16, 16)
JPEG = image_bytes(16, 16, "jpeg")
MP_NO_IMAGE = _multipart({"photo": ("a.png", PNG, "image/png")})
MP_EMPTY_IMAGE = _multipart({"image": ("a.png", b"", "image/png")})

CASES: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    # (id, model, body, headers, status, error code)
    ("empty body", "denoise", b"", {"Content-Type": "image/png"}, 400, "empty_body"),
    ("not an image", "denoise", b"hello, this is text" * 3, {"Content-Type": "image/png"}, 400, "not_an_image"),
    ("truncated png", "denoise", PNG[: len(PNG) // 2], {"Content-Type": "image/png"}, 400, "corrupt_image"),
    ("truncated jpeg", "denoise", JPEG[: len(JPEG) * 2 // 3], {"Content-Type": "image/jpeg"}, 400, "corrupt_image"),
    ("text content type", "denoise", PNG, {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ("json content type", "denoise", PNG, {"Content-Type": "application/json"}, 415, "unsupported_media_type"),
    ("form content type", "denoise", PNG, {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "unsupported_media_type"),
    ("no content type", "denoise", PNG, {"Content-Type": ""}, 415, "unsupported_media_type"),
    ("gif", "denoise", image_bytes(16, 16, "gif"), {"Content-Type": "image/png"}, 415, "unsupported_format"),
    ("bmp", "denoise", image_bytes(16, 16, "bmp"), {"Content-Type": "application/octet-stream"}, 415,
     "unsupported_format"),
    ("too many bytes", "small", image_bytes(64, 64, seed=1) + b"\0" * 4000, {"Content-Type": "image/png"}, 413,
     "too_many_bytes"),
    ("too many pixels", "small", flat_png(80, 80), {"Content-Type": "image/png"}, 413, "too_many_pixels"),
    ("decompression bomb", "denoise", bomb_png(), {"Content-Type": "image/png"}, 413, "too_many_pixels"),
    ("below min size", "denoise", image_bytes(4, 32), {"Content-Type": "image/png"}, 400, "too_small"),
    ("odd size for the model", "unet8", image_bytes(20, 24), {"Content-Type": "image/png"}, 400, "bad_size"),
    ("rgba refused", "denoise", image_bytes(16, 16, mode="RGBA"), {"Content-Type": "image/png"}, 415,
     "unsupported_mode"),
    ("16-bit refused", "denoise", image_bytes(16, 16, mode="I;16"), {"Content-Type": "image/png"}, 415,
     "unsupported_mode"),
    ("unknown model", "nosuch", PNG, {"Content-Type": "image/png"}, 404, "unknown_model"),
    ("bad accept", "denoise", PNG, {"Content-Type": "image/png", "Accept": "application/json"}, 406,
     "not_acceptable"),
    ("accept q=0", "denoise", PNG, {"Content-Type": "image/png", "Accept": "image/png;q=0, text/*"}, 406,
     "not_acceptable"),
    ("multipart without image", "denoise", MP_NO_IMAGE[0], {"Content-Type": MP_NO_IMAGE[1]}, 400, "bad_multipart"),
    ("multipart empty image", "denoise", MP_EMPTY_IMAGE[0], {"Content-Type": MP_EMPTY_IMAGE[1]}, 400, "empty_body"),
    ("multipart garbage", "denoise", b"--XyZ\r\nnonsense", {"Content-Type": "multipart/form-data; boundary=XyZ"},
     400, "bad_multipart"),
    ("multipart no boundary", "denoise", PNG, {"Content-Type": "multipart/form-data"}, 400, "bad_multipart"),
]


@pytest.mark.parametrize(("model", "body", "headers", "status", "code"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_a_4xx_json_error_with_a_log_entry(
    srv: VictimServer, model: str, body: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    h = {**srv.headers("bob"), **headers}
    if h.get("Content-Type") == "":
        del h["Content-Type"]
    r = httpx.post(f"{srv.url}/v1/models/{model}/translate", content=body, headers=h, timeout=30)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    payload = r.json()
    assert payload["error"] == code
    assert isinstance(payload["detail"], str)
    assert payload["detail"]
    entry = srv.log_entry(r.headers["x-request-id"])
    assert (entry.status, entry.code, entry.client) == (status, code, "bob")


def test_oversized_streamed_body_without_content_length_is_cut_off(srv: VictimServer) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield b"\0" * 1024

    r = httpx.post(f"{srv.url}/v1/models/small/translate", content=chunks(),
                   headers={**srv.headers("bob"), "Content-Type": "image/png"}, timeout=30)
    assert r.status_code == 413
    assert r.json()["error"] == "too_many_bytes"


def test_mode_policy_refuse_does_not_touch_plain_images(srv: VictimServer) -> None:
    for mode in ("RGB", "L", "P"):
        r = httpx.post(f"{srv.url}/v1/models/denoise/translate", content=image_bytes(16, 16, mode=mode),
                       headers={**srv.headers("bob"), "Content-Type": "image/png"})
        assert r.status_code == 200, (mode, r.text)


def test_embedded_log_is_jsonl_in_the_data_dir(srv: VictimServer) -> None:
    path = Path(srv.data_dir) / "querylog.jsonl"
    assert path.exists()
    entries = list(LogReader(srv.settings).iter_entries())
    assert len(entries) >= len(CASES)
    assert all(e.status < 500 for e in entries), [e for e in entries if e.status >= 500]
