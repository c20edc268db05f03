"""Upload edge cases of the translate route against a real server (embedded mode: no Redis, JSONL query log):
sizes reported upright and logged for size refusals, one ``image`` part per multipart body, and the
configured byte limit in ``too_many_bytes`` details."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from tests.servers import VictimServer, image_bytes, start_victim, tiny_models

MAX_BYTES = 1_000_000


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
