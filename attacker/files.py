"""Crash-safe file helpers: atomic writes, append-only JSONL with corrupt-tail repair, folder locks.

A JSONL file here is only ever appended one whole line per ``write`` call (``O_APPEND``), so a crash
(``kill -9``, power loss) can leave at most one partial line at the end. :func:`read_jsonl` finds it
(no trailing newline, or a line that is not a JSON object) and :func:`repair_jsonl` rewrites the file
without it through a temp file + ``os.replace``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attacker.errors import RunFolderError
from translators.files import atomic_write_bytes, file_lock
from translators.paths import file_in_the_way

log = logging.getLogger(__name__)




def check_out_folder(folder: str | Path, flag: str = "--out") -> Path:
    """``folder`` as a Path, after checking it can be (or is) a folder: neither it nor a folder above it is
    an existing file. Raises :class:`RunFolderError` (one line naming ``flag``) otherwise. Every attacker
    command calls this before it sends anything, so a bad ``--out`` never wastes queries."""
    p = Path(folder)
    q = file_in_the_way(p)
    if q is not None:
        where = "" if q == p else f" ({q} is a file)"
        raise RunFolderError(f"{flag} {p}: not a folder{where}; name a new or existing folder")
    return p


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it does not exist. Raises RunFolderError when corrupt or
    when a folder on its path is a file."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise RunFolderError(f"{path.parent}: not a folder (a file is in the way); check the path") from None
    except IsADirectoryError:
        raise RunFolderError(f"{path}: is a folder, expected a JSON file; move it away or use a new --out") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{path}: not valid JSON ({exc}); move it away or use a new --out") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path}: expected a JSON object")
    return data


@dataclass
class JsonlContents:
    """What :func:`read_jsonl` found: the valid records and how many bad lines were dropped."""

    records: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)  # 1-based line numbers
    valid_bytes: int = 0  # length of the prefix made of valid, newline-terminated lines
    total_bytes: int = 0

    @property
    def needs_repair(self) -> bool:
        return bool(self.bad_lines) or self.valid_bytes != self.total_bytes


def read_jsonl(path: Path) -> JsonlContents:
    """Parse a JSONL file; lines that are not complete JSON objects are reported, not raised."""
    out = JsonlContents()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return out
    out.total_bytes = len(data)
    pos = 0
    lineno = 0
    valid_prefix = True
    while pos < len(data):
        lineno += 1
        nl = data.find(b"\n", pos)
        if nl < 0:  # no newline: a torn last write
            out.bad_lines.append(lineno)
            break
        raw = data[pos:nl]
        pos = nl + 1
        rec: Any = None
        if raw.strip():
            try:
                rec = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                rec = None
        if isinstance(rec, dict):
            out.records.append(rec)
            if valid_prefix:
                out.valid_bytes = pos
        elif raw.strip():
            out.bad_lines.append(lineno)
            valid_prefix = False
        elif valid_prefix:
            out.valid_bytes = pos
    return out


def repair_jsonl(path: Path, contents: JsonlContents, durable: bool = True) -> None:
    """Rewrite ``path`` holding only ``contents.records`` (temp file + rename)."""
    body = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in contents.records)
    atomic_write_bytes(path, body, durable)


class JsonlAppender:
    """Append whole JSON lines to a file with one ``os.write`` each (``O_APPEND``); fsync if ``durable``."""

    def __init__(self, path: Path, durable: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.durable = durable
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            raise RunFolderError(f"{self.path}: appender is closed")
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        n = os.write(self._fd, line)
        if n != len(line):  # a short write on a regular file means the disk is full
            raise RunFolderError(f"{self.path}: short write ({n} of {len(line)} bytes); is the disk full?")
        if self.durable:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_jsonl_for_append(path: Path, durable: bool = False) -> tuple[JsonlAppender, JsonlContents]:
    """Read ``path``, repair a corrupt tail (logged), and open it for appending."""
    contents = read_jsonl(path)
    if contents.needs_repair:
        log.warning("%s: dropped %d corrupt line(s) (%s) left by an interrupted write", path,
                    len(contents.bad_lines), ", ".join(map(str, contents.bad_lines[:5])))
        repair_jsonl(path, contents)
    return JsonlAppender(path, durable), contents


@contextmanager
def folder_lock(folder: Path, what: str = "run folder", *, shared: bool = False) -> Iterator[None]:
    """Non-blocking ``flock`` on ``folder/.lock``, exclusive (a harvest or training writing the folder) or
    ``shared`` (readers: training reading a run folder's pairs, which no harvest may be writing); the kernel
    releases it if the process dies."""
    check_out_folder(folder)
    with ExitStack() as stack:
        try:
            stack.enter_context(file_lock(folder / ".lock", shared=shared, blocking=False))
        except BlockingIOError:
            if shared:
                raise RunFolderError(f"{folder}: a harvest is still writing to this {what}; wait for it to "
                                     "finish (or stop it) before training on its pairs") from None
            raise RunFolderError(f"{folder}: another heist process is using this {what}; wait for it or "
                                 "use a different --out") from None
        yield
