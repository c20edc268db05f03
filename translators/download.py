"""Resumable, verified downloads and safe archive extraction (used by ``heist data fetch``).

A download streams into ``DEST.part``; when the connection drops, the next attempt (or the next run
after a kill) asks for ``Range: bytes=<size of .part>-`` and appends. A server that ignores ``Range``
(plain 200) restarts the file from zero. Only a complete file whose size and checksum match what was
expected is renamed to ``DEST`` (``os.replace``): a mismatch deletes the bad ``.part`` and raises
:class:`ChecksumError`, so a corrupt final file never exists. A lock file keeps two processes from
writing the same ``.part``.

Archives (zip, tar, tar.gz/bz2/xz) are checked member by member before anything is written: absolute
paths, ``..`` components, links and special files are refused (:class:`UnsafeArchiveError`), and the
declared uncompressed size is capped. Extraction goes to a hidden temporary folder renamed into place
when complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import httpx

from translators.errors import HeistError
from translators.files import file_digest, file_lock

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int | None], None]
"""Called as ``progress(bytes_done, total_bytes_or_None)`` while a download runs."""

USER_AGENT = "heist-datasets/0.1 (+https://github.com/heist)"
CHUNK = 1 << 20
DEFAULT_MAX_EXTRACT_BYTES = 64 * 1024**3


class DownloadError(HeistError):
    """A download that failed (HTTP error, network error after retries, another download running)."""

    code = "download_failed"


class ChecksumError(DownloadError):
    """A completed download whose size or checksum differs from the expected one (it was deleted)."""

    code = "checksum_mismatch"


class _TransientHTTPError(Exception):
    """A 5xx answer: worth retrying like a dropped connection."""


class UnsafeArchiveError(DownloadError):
    """An archive with a member that would escape the extraction folder, a link, or a bomb-sized payload."""

    code = "unsafe_archive"


def part_path(dest: Path) -> Path:
    """Where an unfinished download of ``dest`` accumulates."""
    return dest.with_name(dest.name + ".part")


@contextlib.contextmanager
def _exclusive(dest: Path) -> Iterator[None]:
    lock = dest.with_name(f".{dest.name}.lock")
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(lock, blocking=False))
        except BlockingIOError:
            raise DownloadError(f"{dest}: another download of this file is running (lock {lock})") from None
        yield


def _content_range_total(value: str | None) -> int | None:
    """Total size from ``Content-Range: bytes a-b/TOTAL`` or ``bytes */TOTAL``."""
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _content_range_start(value: str | None) -> int | None:
    if not value or not value.startswith("bytes ") or "-" not in value:
        return None
    start = value[6:].split("-", 1)[0].strip()
    return int(start) if start.isdigit() else None


def _attempt(client: httpx.Client, url: str, part: Path, size: int | None, progress: ProgressFn | None) -> bool:
    """One HTTP request that appends to ``part``. Returns True when the file is complete.

    Raises ``httpx.TransportError`` or :class:`_TransientHTTPError` on failures worth retrying and
    :class:`DownloadError` on HTTP errors that retrying will not fix.
    """
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        log.warning("%s is larger than the expected %d bytes; starting over", part, size)
        part.unlink()
        offset = 0
    if size is not None and offset == size:
        return True
    # identity encoding: byte offsets (Range) then mean the same thing on the wire and on disk.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with client.stream("GET", url, headers=headers) as resp:
        if resp.status_code == 416 and offset:
            total = _content_range_total(resp.headers.get("content-range"))
            if total == offset:
                return True  # the .part already holds the whole file
            log.warning("server refused to resume at byte %d (size %s); starting over", offset, total)
            part.unlink()
            return False
        if resp.status_code >= 500:
            raise _TransientHTTPError(f"HTTP {resp.status_code} from {url}")
        if resp.status_code not in (200, 206):
            raise DownloadError(f"{url}: HTTP {resp.status_code} {resp.reason_phrase}".rstrip())
        if resp.status_code == 206:
            start = _content_range_start(resp.headers.get("content-range"))
            if start != offset:
                raise DownloadError(f"{url}: server resumed at byte {start}, asked for {offset}")
            total = _content_range_total(resp.headers.get("content-range"))
            mode = "ab"
        else:  # 200: the whole file, whether or not we asked for a range
            if offset:
                log.info("server ignored the Range request; downloading %s from the start", url)
            offset = 0
            length = resp.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        if size is not None and total is not None and total != size:
            raise ChecksumError(f"{url}: server announces {total} bytes, expected {size}; is the URL right?")
        expected_total = size if size is not None else total
        done = offset
        if progress:
            progress(done, expected_total)
        with open(part, mode) as fh:
            # iter_raw() hands over bytes as they arrive (iter_bytes(CHUNK) would buffer up to a chunk and lose
            # it when the connection drops), so the .part keeps everything received before a failure.
            for block in resp.iter_raw():
                fh.write(block)
                done += len(block)
                if progress:
                    progress(done, expected_total)
            fh.flush()
            os.fsync(fh.fileno())
    if expected_total is not None and done < expected_total:
        raise httpx.RemoteProtocolError(f"connection closed at byte {done} of {expected_total}")
    return True


def _verify(part: Path, url: str, size: int | None, sha256: str | None, md5: str | None) -> str:
    """Check size and checksums of a finished ``.part``; deletes it and raises on a mismatch.

    Returns the sha256 actually computed (always, so unknown checksums can be recorded).
    """
    actual_size = part.stat().st_size
    problems = []
    if size is not None and actual_size != size:
        problems.append(f"size {actual_size} bytes, expected {size}")
    actual_sha = file_digest(part, "sha256")
    if sha256 is not None and actual_sha != sha256.lower():
        problems.append(f"sha256 {actual_sha}, expected {sha256.lower()}")
    if md5 is not None and not problems:
        actual_md5 = file_digest(part, "md5")
        if actual_md5 != md5.lower():
            problems.append(f"md5 {actual_md5}, expected {md5.lower()}")
    if problems:
        part.unlink()
        raise ChecksumError(
            f"download from {url} is corrupt or not the expected file ({'; '.join(problems)}); "
            "the bad download was deleted: run again, or use another mirror"
        )
    return actual_sha


def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    size: int | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    progress: ProgressFn | None = None,
    client: httpx.Client | None = None,
    retries: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
) -> tuple[Path, str]:
    """Download ``url`` to ``dest`` with resume, verification and an atomic rename.

    Args:
        size: expected size in bytes (None: unknown).
        sha256, md5: expected hex digests (None: unknown; whichever are given are checked).
        retries: network failures tolerated in a row (each retry resumes from the ``.part``); an attempt
            that received bytes restarts the count. ``0`` gives up at the first failure.
        backoff_s: base delay between retries (doubles each time, capped at 30 s).
        timeout_s: connect/read timeout in seconds.

    Returns ``(dest, sha256 of the file)``. If ``dest`` already exists it is trusted (it only appears
    after verification) and returned without network access.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        return dest, file_digest(dest)
    part = part_path(dest)
    own_client = client is None
    http = client or httpx.Client(
        follow_redirects=True, timeout=httpx.Timeout(timeout_s), headers={"User-Agent": USER_AGENT}
    )
    try:
        with _exclusive(dest):
            failures = 0
            while True:
                before = part.stat().st_size if part.exists() else 0
                try:
                    if _attempt(http, url, part, size, progress):
                        break
                    continue  # the server asked us to start over
                except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
                    raise DownloadError(f"{url}: not a usable http(s) URL ({exc})") from None
                except (httpx.TransportError, _TransientHTTPError) as exc:
                    after = part.stat().st_size if part.exists() else 0
                    # A failure after progress counts as the first of a new run of failures.
                    failures = 1 if after > before else failures + 1
                    if failures > retries:
                        raise DownloadError(
                            f"{url}: download failed after {retries} retries ({exc}); "
                            f"{after} bytes kept in {part}, run the command again to resume"
                        ) from None
                    delay = min(backoff_s * 2 ** max(failures - 1, 0), 30.0)
                    log.warning("download interrupted at byte %d (%s); resuming in %.1f s", after, exc, delay)
                    time.sleep(delay)
            digest = _verify(part, url, size, sha256, md5)
            os.replace(part, dest)
    finally:
        if own_client:
            http.close()
    return dest, digest


# --- extraction ------------------------------------------------------------------------------------


def _safe_member_name(name: str, archive: Path) -> PurePosixPath:
    """Refuse absolute names, drive letters and ``..``; returns the normalised relative path."""
    norm = name.replace("\\", "/")
    pp = PurePosixPath(norm)
    if pp.is_absolute() or norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    parts = [p for p in pp.parts if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} escapes the extraction folder; refusing to extract")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _check_total(total: int, archive: Path, max_bytes: int) -> None:
    if total > max_bytes:
        raise UnsafeArchiveError(
            f"{archive}: declares {total} uncompressed bytes, over the {max_bytes}-byte limit; refusing to extract"
        )


def _extract_zip(archive: Path, into: Path, max_bytes: int) -> int:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        total = 0
        for info in infos:
            _safe_member_name(info.filename, archive)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a symbolic link; refusing")
            total += info.file_size
        _check_total(total, archive, max_bytes)
        count = 0
        for info in infos:
            rel = _safe_member_name(info.filename, archive)
            target = into / rel
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
            count += 1
    return count


def _extract_tar(archive: Path, into: Path, max_bytes: int) -> int:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        total = 0
        for m in members:
            _safe_member_name(m.name, archive)
            if not (m.isfile() or m.isdir()):
                kind = "link" if (m.issym() or m.islnk()) else "special file"
                raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a {kind}; refusing to extract")
            total += m.size
        _check_total(total, archive, max_bytes)
        count = 0
        for m in members:
            rel = _safe_member_name(m.name, archive)
            target = into / rel
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(m)
            if src is None:
                raise UnsafeArchiveError(f"{archive}: member {m.name!r} cannot be read")
            with src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
            count += 1
    return count


def extract_archive(
    archive: str | os.PathLike[str], dest: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_EXTRACT_BYTES
) -> Path:
    """Extract a zip or tar(.gz/.bz2/.xz) ``archive`` so its members end up under ``dest``.

    Every member is validated before a byte is written (see module doc). Regular files and folders
    only; permissions are not copied. ``dest`` must not exist: the archive is unpacked into a hidden
    sibling folder that is renamed to ``dest`` when complete, so an interrupted extraction leaves no
    half-filled ``dest``. Returns ``dest``.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise DownloadError(f"{dest}: already exists; remove it to extract again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.extracting")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        if zipfile.is_zipfile(archive):
            count = _extract_zip(archive, tmp, max_bytes)
        elif tarfile.is_tarfile(archive):
            count = _extract_tar(archive, tmp, max_bytes)
        else:
            with open(archive, "rb") as fh:
                head = fh.read(512).lstrip().lower()
            html = head.startswith((b"<!doctype html", b"<html")) or b"<html" in head
            hint = " (it is an HTML page: the server answered with a web page, e.g. a login page)" if html else ""
            raise DownloadError(f"{archive}: not a zip or tar archive{hint}")
        os.replace(tmp, dest)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(f"{archive}: cannot extract: corrupt archive or write failure ({exc})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("extracted %d files from %s into %s", count, archive.name, dest)
    return dest
