"""Dataset fetching against a real local HTTP server (127.0.0.1): resume, verification, safe extraction.

The server is a threaded ``http.server`` that serves archives built by the tests, honours ``Range``
(206 / 416), and can be told to drop the connection half-way through a body, answer 503, or ignore
``Range``. Nothing is mocked: the real httpx client talks to it over TCP.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import socket
import subprocess
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from translators.codecs import encode_image
from translators.corpus import image_sizes, load_images
from translators.datasets import (
    DATASETS,
    MARKER,
    MIRROR_ENV,
    DatasetError,
    DatasetSpec,
    dataset_images_dir,
    fetch,
    get_dataset,
    resolve_url,
)
from translators.download import ChecksumError, DownloadError, UnsafeArchiveError, download, extract_archive

HEIST = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "heist"


# --- a real HTTP server ------------------------------------------------------------------------------


@dataclass
class ArchiveServer:
    """Files served at ``/NAME``; knobs change behaviour per path; ``log`` records ``(path, Range)``."""

    base: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    log: list[tuple[str, str | None]] = field(default_factory=list)
    drop: dict[str, int] = field(default_factory=dict)  # path -> how many responses to cut half-way
    fail_503: dict[str, int] = field(default_factory=dict)  # path -> how many 503 answers first
    ignore_range: bool = False

    def ranges(self, path: str) -> list[str | None]:
        return [r for p, r in self.log if p == path]


def _handler(state: ArchiveServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            return

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            rng = self.headers.get("Range")
            state.log.append((path, rng))
            data = state.files.get(path)
            if data is None:
                self.send_error(404, "Not Found")
                return
            if state.fail_503.get(path, 0) > 0:
                state.fail_503[path] -= 1
                self.send_error(503, "Busy")
                return
            start = 0
            if rng and not state.ignore_range:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if state.drop.get(path, 0) > 0:
                state.drop[path] -= 1
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # drop the connection mid-body
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture
def server() -> Iterator[ArchiveServer]:
    state = ArchiveServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


# --- archives ----------------------------------------------------------------------------------------


def _png(seed: int, side: int = 24) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return encode_image(torch.rand(1, 3, side, side + 8, generator=g))


def make_targz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Large enough (several hundred KB of incompressible PNG) that dropping half-way is a real partial file.
IMAGES = {f"Tiny_HR/img_{i:03d}.png": _png(i, side=96) for i in range(6)}
ARCHIVE = make_targz(IMAGES)


@pytest.fixture
def tiny_spec(monkeypatch: pytest.MonkeyPatch, server: ArchiveServer) -> DatasetSpec:
    """A dataset registered like the real ones, pointing at the local server, with a real sha256."""
    server.files["/tiny.tar.gz"] = ARCHIVE
    spec = DatasetSpec(name="tiny", title="test archive", url=f"{server.base}/tiny.tar.gz", filename="tiny.tar.gz",
                       size=len(ARCHIVE), sha256=_sha(ARCHIVE), subsets={"hr": "Tiny_HR"}, default_subset="hr")
    monkeypatch.setitem(DATASETS, "tiny", spec)
    return spec


# --- the registry ------------------------------------------------------------------------------------


def test_registry_holds_the_papers_datasets_with_wellformed_checksums() -> None:
    for name in ("div2k-train-hr", "div2k-valid-hr", "set5", "set14", "bsd100", "urban100", "monet2photo", "facades"):
        spec = get_dataset(name)
        assert spec.url.startswith("https://")
        assert spec.url.rsplit("/", 1)[1].split("?")[0] == spec.filename
        assert spec.default_subset in spec.subsets
        if spec.sha256 is not None:
            assert len(spec.sha256) == 64
            int(spec.sha256, 16)
        if spec.md5 is not None:
            assert len(spec.md5) == 32
            int(spec.md5, 16)
        if spec.sha256 or spec.md5:
            assert spec.checksum_source, f"{name}: a checksum must say where it comes from"
    assert get_dataset("DIV2K-Valid-HR").size == 448993893
    with pytest.raises(DatasetError, match=r"unknown dataset 'nope'; known: .*set5"):
        get_dataset("nope")


def test_url_resolution_prefers_override_then_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = get_dataset("set5")
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    assert resolve_url(spec) == spec.url
    monkeypatch.setenv(MIRROR_ENV, "http://mirror.example/data/")
    assert resolve_url(spec) == "http://mirror.example/data/Set5_HR.tar.gz"
    assert resolve_url(spec, "http://other/x.tgz") == "http://other/x.tgz"


# --- fetch: happy paths --------------------------------------------------------------------------------


def test_fetch_downloads_verifies_and_extracts(tmp_path: Path, server: ArchiveServer, tiny_spec: DatasetSpec) -> None:
    seen: list[tuple[int, int | None]] = []
    res = fetch("tiny", tmp_path, progress=lambda done, total: seen.append((done, total)))
    assert res.verified == "sha256"
    assert res.sha256 == _sha(ARCHIVE)
    assert res.images_dir == tmp_path / "tiny" / "Tiny_HR"
    assert sorted(p.name for p in res.images_dir.iterdir()) == [Path(n).name for n in sorted(IMAGES)]
    for name, data in IMAGES.items():
        assert (tmp_path / "tiny" / name).read_bytes() == data
    assert (tmp_path / "tiny" / MARKER).is_file()
    assert not (tmp_path / ".downloads" / "tiny.tar.gz").exists(), "archive is removed after extraction"
    assert not list((tmp_path / ".downloads").glob("*.part"))
    assert seen[-1] == (len(ARCHIVE), len(ARCHIVE))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen), "progress only moves forward"
    # A second fetch is a no-op that never touches the network.
    n_requests = len(server.log)
    again = fetch("tiny", tmp_path)
    assert again.already_present
    assert again.sha256 == res.sha256
    assert len(server.log) == n_requests
    assert dataset_images_dir("tiny", dest=tmp_path) == res.images_dir


def test_force_keeps_the_good_copy_until_the_new_one_is_complete(tmp_path: Path, server: ArchiveServer,
                                                                  tiny_spec: DatasetSpec) -> None:
    """--force deleted the extracted copy before downloading: a failed download left nothing (DIV2K: 3.5 GB
    to fetch again); and with --keep-archive it re-extracted the kept archive without asking the server."""
    fetch("tiny", tmp_path, keep_archive=True)
    archive = server.files.pop("/tiny.tar.gz")
    with pytest.raises(DownloadError, match="404"):
        fetch("tiny", tmp_path, force=True, retries=0)
    assert tiny_spec.is_fetched(tmp_path)
    for name, data in IMAGES.items():
        assert (tmp_path / "tiny" / name).read_bytes() == data
    server.files["/tiny.tar.gz"] = archive
    n = len(server.log)
    res = fetch("tiny", tmp_path, force=True)
    assert len(server.log) > n, "forced: fetched from the server again"
    assert not res.already_present
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tiny")) == []


def test_mirror_env_and_dataset_images_spec(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            server: ArchiveServer) -> None:
    """A registered dataset (set5, no published checksum) fetched through HEIST_DATASETS_MIRROR, then
    used as an images spec ``dataset:set5`` by the corpus loader."""
    server.files["/Set5_HR.tar.gz"] = make_targz({"Set5_HR/baby.png": _png(1), "Set5_HR/bird.png": _png(2)})
    monkeypatch.setenv(MIRROR_ENV, server.base + "/")
    monkeypatch.setenv("HEIST_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetError, match="heist data fetch set5"):
        load_images("dataset:set5")
    res = fetch("set5")
    assert res.verified == "none"  # no published checksum: recorded, not verified
    assert res.sha256 == _sha(server.files["/Set5_HR.tar.gz"])
    assert server.ranges("/Set5_HR.tar.gz") == [None]
    images = load_images("dataset:set5")
    assert [im.name for im in images] == ["baby.png", "bird.png"]
    assert images[0].image.shape == (1, 3, 24, 32)
    assert image_sizes("dataset:set5:hr") == [("baby.png", 32, 24), ("bird.png", 32, 24)]
    with pytest.raises(DatasetError, match="no subset 'lr'"):
        load_images("dataset:set5:lr")


def test_url_override_with_own_sha256(tmp_path: Path, server: ArchiveServer) -> None:
    data = make_zip({"facades/test/1.jpg": _png(3), "facades/train/2.jpg": _png(4), "facades/val/3.jpg": _png(5)})
    server.files["/elsewhere/facades.zip"] = data
    with pytest.raises(DatasetError, match="--sha256 must be 64 hexadecimal characters"):
        fetch("facades", tmp_path, url=f"{server.base}/elsewhere/facades.zip", sha256="abc")
    assert server.log == [], "a malformed checksum is refused before any download"
    res = fetch("facades", tmp_path, url=f"{server.base}/elsewhere/facades.zip", sha256=_sha(data))
    assert res.verified == "sha256"
    assert res.images_dir == tmp_path / "facades" / "facades" / "test"
    assert dataset_images_dir("facades", "train", dest=tmp_path).is_dir()


# --- resume ---------------------------------------------------------------------------------------------


def test_dropped_connection_resumes_with_range(tmp_path: Path, server: ArchiveServer, tiny_spec: DatasetSpec) -> None:
    server.drop["/tiny.tar.gz"] = 1
    res = fetch("tiny", tmp_path, retries=2, backoff_s=0.0)
    assert res.sha256 == _sha(ARCHIVE)
    first, second = server.ranges("/tiny.tar.gz")
    assert first is None
    assert second == f"bytes={len(ARCHIVE) // 2}-", "the retry asks only for the missing bytes"


def test_killed_download_resumes_on_next_run(tmp_path: Path, server: ArchiveServer, tiny_spec: DatasetSpec) -> None:
    server.drop["/tiny.tar.gz"] = 1
    with pytest.raises(DownloadError, match="run the command again to resume"):
        fetch("tiny", tmp_path, retries=0, backoff_s=0.0)
    part = tmp_path / ".downloads" / "tiny.tar.gz.part"
    assert part.stat().st_size == len(ARCHIVE) // 2
    assert part.read_bytes() == ARCHIVE[: len(ARCHIVE) // 2]
    assert not (tmp_path / "tiny").exists()
    res = fetch("tiny", tmp_path, retries=0)
    assert res.sha256 == _sha(ARCHIVE)
    assert server.ranges("/tiny.tar.gz")[-1] == f"bytes={len(ARCHIVE) // 2}-"
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(tmp_path: Path, server: ArchiveServer,
                                                  tiny_spec: DatasetSpec) -> None:
    part = tmp_path / ".downloads" / "tiny.tar.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 1000)  # a stale partial file that does not even match the archive
    server.ignore_range = True
    res = fetch("tiny", tmp_path)
    assert server.ranges("/tiny.tar.gz") == ["bytes=1000-"]
    assert res.sha256 == _sha(ARCHIVE), "a 200 answer to a Range request rewrites the file from zero"


def test_complete_part_is_finished_via_416(tmp_path: Path, server: ArchiveServer) -> None:
    data = make_targz({"Urban100_HR/a.png": _png(7)})
    server.files["/u.tar.gz"] = data
    dest = tmp_path / "u.tar.gz"
    (tmp_path / "u.tar.gz.part").write_bytes(data)  # everything already downloaded, size not known
    path, digest = download(f"{server.base}/u.tar.gz", dest, md5=hashlib.md5(data).hexdigest())
    assert path.read_bytes() == data
    assert digest == _sha(data)
    assert server.ranges("/u.tar.gz") == [f"bytes={len(data)}-"]


def test_transient_503_is_retried(tmp_path: Path, server: ArchiveServer, tiny_spec: DatasetSpec) -> None:
    server.fail_503["/tiny.tar.gz"] = 2
    res = fetch("tiny", tmp_path, retries=3, backoff_s=0.0)
    assert res.sha256 == _sha(ARCHIVE)
    assert len(server.ranges("/tiny.tar.gz")) == 3


# --- failures never leave a corrupt final file ------------------------------------------------------------


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.name.endswith(".lock"))


def test_checksum_mismatch_deletes_the_download(tmp_path: Path, server: ArchiveServer,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    server.files["/tiny.tar.gz"] = ARCHIVE
    bad = DatasetSpec(name="tiny", title="t", url=f"{server.base}/tiny.tar.gz", filename="tiny.tar.gz",
                      sha256=_sha(b"something else"), subsets={"hr": "Tiny_HR"}, default_subset="hr")
    monkeypatch.setitem(DATASETS, "tiny", bad)
    with pytest.raises(ChecksumError, match=r"sha256 [0-9a-f]{64}, expected .*the bad download was deleted"):
        fetch("tiny", tmp_path)
    assert _leftovers(tmp_path) == [".downloads"], "no .part, no archive, no dataset folder"


def test_md5_mismatch_through_the_mirror(tmp_path: Path, server: ArchiveServer,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """urban100's published md5 cannot match a test archive: the mirror download is refused."""
    server.files["/Urban100_HR.tar.gz"] = make_targz({"Urban100_HR/img_001.png": _png(9)})
    monkeypatch.setenv(MIRROR_ENV, server.base)
    with pytest.raises(ChecksumError, match=r"md5 .*expected 65d9d84a34b72c6f7ca1e26a12df1e4c"):
        fetch("urban100", tmp_path)
    assert _leftovers(tmp_path) == [".downloads"]
    # --no-verify is the explicit escape hatch
    assert fetch("urban100", tmp_path, verify=False).verified == "none"


def test_announced_size_mismatch_is_refused_before_downloading(tmp_path: Path, server: ArchiveServer,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    server.files["/tiny.tar.gz"] = ARCHIVE
    spec = DatasetSpec(name="tiny", title="t", url=f"{server.base}/tiny.tar.gz", filename="tiny.tar.gz",
                       size=len(ARCHIVE) + 1, subsets={"hr": "Tiny_HR"}, default_subset="hr")
    monkeypatch.setitem(DATASETS, "tiny", spec)
    with pytest.raises(ChecksumError, match=f"announces {len(ARCHIVE)} bytes, expected {len(ARCHIVE) + 1}"):
        fetch("tiny", tmp_path)
    assert not (tmp_path / ".downloads" / "tiny.tar.gz").exists()


def test_http_404_is_a_clear_error(tmp_path: Path, server: ArchiveServer) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{server.base}/missing.zip", tmp_path / "missing.zip", retries=0)
    assert not (tmp_path / "missing.zip").exists()


def test_unreachable_server_gives_up_after_retries(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    with pytest.raises(DownloadError, match="download failed after 1 retries"):
        download(f"http://127.0.0.1:{port}/x.zip", tmp_path / "x.zip", retries=1, backoff_s=0.0)
    with pytest.raises(DownloadError, match="not a usable http"):
        download("ftp://127.0.0.1/x.zip", tmp_path / "x.zip")


def test_a_second_process_cannot_write_the_same_part(tmp_path: Path, server: ArchiveServer) -> None:
    server.files["/a.zip"] = b"data"
    dest = tmp_path / "a.zip"
    with open(tmp_path / ".a.zip.lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        with pytest.raises(DownloadError, match="another download of this file is running"):
            download(f"{server.base}/a.zip", dest)
    assert download(f"{server.base}/a.zip", dest)[0].read_bytes() == b"data"


# --- extraction safety -----------------------------------------------------------------------------------


def _tar_with(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ok = tarfile.TarInfo("ok/inside.txt")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        (make_zip({"ok/inside.txt": b"ok", "../evil.txt": b"pwned"}), "escapes the extraction folder"),
        (make_zip({"ok/inside.txt": b"ok", "/tmp/evil.txt": b"pwned"}), "absolute path"),
        (make_targz({"ok/inside.txt": b"ok", "a/../../evil.txt": b"pwned"}), "escapes the extraction folder"),
        (_tar_with(tarfile.TarInfo("/etc/evil.txt"), b"pwned"), "absolute path"),
        (_tar_with(_symlink("ok/link", "../../evil.txt")), "is a link"),
        (_tar_with(_symlink("ok/link", "inside.txt")), "is a link"),
    ],
    ids=["zip-dotdot", "zip-absolute", "tar-dotdot", "tar-absolute", "tar-symlink-out", "tar-symlink-in"],
)
def test_unsafe_archives_are_refused_before_writing(tmp_path: Path, archive: bytes, message: str) -> None:
    src = tmp_path / "in" / "a.bin"
    src.parent.mkdir()
    src.write_bytes(archive)
    out = tmp_path / "deep" / "out"
    with pytest.raises(UnsafeArchiveError, match=message):
        extract_archive(src, out)
    assert not out.exists()
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "deep" / "evil.txt").exists()
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == [], "no temporary folder is left behind"


def test_zip_bomb_declared_size_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "bomb.zip"
    with zipfile.ZipFile(src, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", b"\0" * 2_000_000)
    assert src.stat().st_size < 20_000
    with pytest.raises(UnsafeArchiveError, match="over the 1000000-byte limit"):
        extract_archive(src, tmp_path / "out", max_bytes=1_000_000)
    assert extract_archive(src, tmp_path / "out2").joinpath("zeros.bin").stat().st_size == 2_000_000


def test_an_html_page_instead_of_the_archive_is_named_as_such(tmp_path: Path) -> None:
    page = tmp_path / "set5.tar.gz"
    page.write_bytes(b"\n<!DOCTYPE html><html><body>Please log in</body></html>")
    with pytest.raises(DownloadError, match="not a zip or tar archive \\(it is an HTML page"):
        extract_archive(page, tmp_path / "out")


def test_corrupt_archive_from_fetch_is_removed(tmp_path: Path, server: ArchiveServer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    server.files["/Set14_HR.tar.gz"] = ARCHIVE[: len(ARCHIVE) // 3]  # truncated gzip stream
    monkeypatch.setenv(MIRROR_ENV, server.base)
    with pytest.raises(DownloadError, match="cannot extract"):
        fetch("set14", tmp_path)
    assert _leftovers(tmp_path) == [".downloads"], "neither the archive nor a half-extracted folder remains"

    server.files["/Set14_HR.tar.gz"] = make_targz({"x/../../evil.png": b"pwned"})
    with pytest.raises(UnsafeArchiveError):
        fetch("set14", tmp_path)
    assert _leftovers(tmp_path) == [".downloads"]


# --- the CLI -------------------------------------------------------------------------------------------


def _heist(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if not HEIST.exists():
        pytest.fail(f"{HEIST} is missing: install the project into .venv (pip install -e .)")
    full_env = {**os.environ, "COLUMNS": "250", **env}
    return subprocess.run([str(HEIST), *args], capture_output=True, text=True, env=full_env, timeout=120,
                          check=False)


def test_cli_fetch_list_and_errors(tmp_path: Path, server: ArchiveServer) -> None:
    server.files["/Set5_HR.tar.gz"] = make_targz({"Set5_HR/baby.png": _png(1)})
    server.files["/Urban100_HR.tar.gz"] = make_targz({"Urban100_HR/img_001.png": _png(2)})
    env = {MIRROR_ENV: server.base, "HEIST_DATA_DIR": str(tmp_path / "data")}
    dest = tmp_path / "ds"

    ok = _heist("data", "fetch", "set5", "--dest", str(dest), env=env)
    assert ok.returncode == 0, ok.stderr
    assert f"images: {dest / 'set5' / 'Set5_HR'}" in ok.stdout
    assert "verified: none" in ok.stdout

    listed = _heist("data", "list", "--dest", str(dest), env=env)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if " set5 " in line)
    assert "yes" in row
    assert "div2k-train-hr" in listed.stdout
    assert "3.5 GB" in listed.stdout

    bad = _heist("data", "fetch", "urban100", "--dest", str(dest), env=env)
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, bad.stderr
    assert errors[0].startswith("error: download from"), bad.stderr
    assert "md5" in errors[0]
    assert "HTTP Request" not in bad.stderr, "httpx's per-request INFO lines are kept out of the CLI output"
    assert "Traceback" not in bad.stderr + bad.stdout
    assert not (dest / "urban100").exists()



def test_cli_fetch_resumes_a_partial_download(tmp_path: Path, server: ArchiveServer) -> None:
    data = make_targz({"BSD100_HR/3096.png": _png(5, side=128)})
    server.files["/BSD100_HR.tar.gz"] = data
    server.drop["/BSD100_HR.tar.gz"] = 1
    env = {MIRROR_ENV: server.base, "HEIST_DATA_DIR": str(tmp_path)}
    first = _heist("data", "fetch", "bsd100", "--retries", "0", env=env)
    assert first.returncode == 2
    assert "run the command again to resume" in first.stderr
    second = _heist("data", "fetch", "bsd100", env=env)
    assert second.returncode == 0, second.stderr
    assert server.ranges("/BSD100_HR.tar.gz") == [None, f"bytes={len(data) // 2}-"]
    assert (tmp_path / "datasets" / "bsd100" / "BSD100_HR" / "3096.png").is_file()
