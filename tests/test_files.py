"""``translators.files``: the one implementation of atomic writes, exclusive creation and file digests."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import stat
from pathlib import Path

import pytest

from translators.files import atomic_path, atomic_write_bytes, content_id, create_exclusive, file_digest


def test_atomic_write_creates_secrets_with_their_mode_and_leaves_no_temp(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        p = atomic_write_bytes(tmp_path / "sub" / "secret", b"s3cret", mode=0o600)
    finally:
        os.umask(old)
    assert p.read_bytes() == b"s3cret"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert [f.name for f in p.parent.iterdir()] == ["secret"]


def test_atomic_path_keeps_the_suffix_and_removes_the_temp_on_error(tmp_path: Path) -> None:
    target = tmp_path / "fig.png"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".png"
        assert tmp.parent == tmp_path
        assert tmp != target
        tmp.write_bytes(b"png")
        assert not target.exists()  # nothing under the name until the block ends
    assert target.read_bytes() == b"png"
    with pytest.raises(RuntimeError, match="writer failed"):
        _failing_write(target)
    assert target.read_bytes() == b"png"  # the old file is untouched
    assert sorted(f.name for f in tmp_path.iterdir()) == ["fig.png"]


def _failing_write(target: Path) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")


def _race(path: str, data: bytes) -> bool:
    return create_exclusive(Path(path), data)


def test_create_exclusive_has_exactly_one_winner(tmp_path: Path) -> None:
    target = tmp_path / "defense-secret"
    with mp.get_context("spawn").Pool(4) as pool:
        won = pool.starmap(_race, [(str(target), f"writer {i}".encode()) for i in range(8)])
    assert sum(won) == 1
    assert target.read_bytes() == f"writer {won.index(True)}".encode()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert not create_exclusive(target, b"late")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["defense-secret"]


def test_digests_follow_the_content(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"a" * (3 << 20))
    assert file_digest(f) == hashlib.sha256(b"a" * (3 << 20)).hexdigest()
    first = content_id(f)
    assert first == "sha256:" + file_digest(f)
    f.write_bytes(b"b" * 10)
    assert content_id(f) != first
    assert content_id(tmp_path / "missing") is None
    assert content_id(tmp_path) is None  # a folder has no content digest


def test_file_lock_excludes_writers_and_shares_readers(tmp_path: Path) -> None:
    from translators.files import file_lock

    lock = tmp_path / "sub" / ".lock"
    with file_lock(lock, shared=True), file_lock(lock, shared=True, blocking=False):
        pass  # two readers at once (flock locks belong to open files, so this works within a process too)
    with file_lock(lock), pytest.raises(BlockingIOError):
        _try_lock(lock)
    with file_lock(lock, blocking=False):
        pass  # released at the end of the block
    assert lock.exists()  # the lock file stays: unlinking it would split lockers across inodes


def _try_lock(lock: Path) -> None:
    from translators.files import file_lock

    with file_lock(lock, blocking=False):
        pass
