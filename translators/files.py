"""Atomic file writes, file locks and file digests, the one implementation every package uses.

A reader never sees a half-written file: the data goes to a temporary file beside the target
(``.NAME.PID.tmp``, so concurrent writers never share one), which ``os.replace`` then renames over the
target. With ``durable`` the file and its folder are fsynced too, so the write survives a power loss.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks (``algorithm`` as in :func:`hashlib.new`)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_id(path: Path) -> str | None:
    """``sha256:HEX`` of the file at ``path`` (None when it is not a readable file), cached while its size
    and modification time stay the same, so asking again for a large checkpoint costs one ``stat``."""
    try:
        st = Path(path).resolve().stat()
    except OSError:
        return None
    return _cached_content_id(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _cached_content_id(path: str, size: int, mtime_ns: int) -> str | None:
    try:
        return "sha256:" + file_digest(Path(path))
    except (OSError, IsADirectoryError):
        return None


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, durable: bool = True,
                       mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders created); ``mode`` (e.g. ``0o600``) is set
    before the file appears under its name. Returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    with _replaced_on_success(tmp, p):
        _write_new(tmp, data, durable, mode)
    if durable:
        fsync_dir(p.parent)
    return p


@contextlib.contextmanager
def _replaced_on_success(tmp: Path, target: Path) -> Iterator[None]:
    """Rename ``tmp`` over ``target`` when the block ends without error; remove ``tmp`` when it raises."""
    try:
        yield
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _write_new(tmp: Path, data: bytes, durable: bool, mode: int | None) -> None:
    """Write ``tmp`` (replacing any leftover) created with ``mode``, so a secret is never readable at the
    umask's mode, not even for a moment."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    if mode is not None:
        os.chmod(tmp, mode)  # exactly ``mode``, whatever the umask took away


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], durable: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that need a file name (matplotlib, pyarrow): renamed over
    ``path`` when the block ends without error, removed when it raises. The temporary name keeps the
    suffix (``.NAME.PID.tmp.png``), for writers that pick the format from it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.stem}.{os.getpid()}.tmp{p.suffix}")
    with _replaced_on_success(tmp, p):
        yield tmp
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
    if durable:
        fsync_dir(p.parent)


@contextlib.contextmanager
def file_lock(lock_path: str | os.PathLike[str], *, shared: bool = False, blocking: bool = True) -> Iterator[None]:
    """``flock`` on ``lock_path`` for the block: exclusive, or ``shared`` (readers). With ``blocking=False``
    a lock held elsewhere raises :class:`BlockingIOError` at once (callers turn it into their own error).
    The kernel releases the lock when the process dies. The (empty) lock file is created and never removed:
    unlinking it would let two processes lock different inodes."""
    p = Path(lock_path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a+b") as fh:
        fcntl.flock(fh.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def create_exclusive(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> bool:
    """Create ``path`` with ``data`` unless it exists (several processes racing: exactly one wins, by
    ``os.link``; nobody ever sees it half-written). Returns whether this call created it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        _write_new(tmp, data, True, mode)
        try:
            os.link(tmp, p)
        except FileExistsError:
            return False
        fsync_dir(p.parent)
        return True
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike[str], text: str, durable: bool = True,
                      mode: int | None = None) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable, mode)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, durable: bool = True,
                      mode: int | None = None) -> Path:
    """:func:`atomic_write_bytes` of ``obj`` as indented JSON with a final newline."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode(), durable, mode)


def unwritable_reason(path: str | os.PathLike[str]) -> str | None:
    """Why a file cannot be written at ``path`` (a folder there, a file in the way of its folder, or a folder
    this process cannot create or write in, tried with an empty probe file); None when it can. Creates the
    missing folders. Every ``--out FILE`` check uses this, so a bad path fails before any work is done."""
    from translators.paths import file_in_the_way

    p = Path(path)
    if p.is_dir():
        return "is a folder"
    if (blocked := file_in_the_way(p.parent)) is not None:
        return f"{blocked} is a file, not a folder"
    return _cannot_write_in(p.parent, f".{p.name}")


def unusable_folder_reason(folder: str | os.PathLike[str]) -> str | None:
    """Why ``folder`` cannot be used as an output folder (a file in its place or above it, or a folder this
    process cannot create or write in, tried with an empty probe file); None when it can. Creates it.
    Every ``--out FOLDER`` / ``--dest FOLDER`` that Heist writes into uses this before any work is done."""
    from translators.paths import file_in_the_way

    p = Path(folder)
    if (blocked := file_in_the_way(p)) is not None:
        return "is a file, not a folder" if blocked == p else f"{blocked} is a file, not a folder"
    return _cannot_write_in(p, "")


def _cannot_write_in(folder: Path, stem: str) -> str | None:
    """Create ``folder`` and write and remove an empty probe file in it; the OS's reason when that fails."""
    probe = folder / f"{stem}.{os.getpid()}.probe"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as exc:
        return f"cannot write there ({exc.strerror or exc})"
    return None
