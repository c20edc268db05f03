"""Map a pydantic error location to a line in the TOML file it came from.

``tomllib`` reports syntax errors with positions but gives none for values that parse and are then
rejected. :func:`locate` walks the text, tracking ``[table]`` and ``[[array-of-tables]]`` headers and
``key = value`` lines, and returns the line (1-based) of the deepest key on the error's path.
Inline tables and arrays are attributed to the line of their key.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"'.]+)\s*=")


def _split_dotted(key: str) -> list[str]:
    return [p.strip().strip("\"'") for p in key.split(".")]


def key_lines(text: str) -> list[tuple[tuple[object, ...], int]]:
    """Every (path, line) in ``text``: tables, array-of-table entries and keys. Lines are 1-based."""
    out: list[tuple[tuple[object, ...], int]] = []
    table: list[object] = []
    counts: dict[tuple[object, ...], int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        m = _HEADER.match(line)
        if m:
            parts: list[object] = list(_split_dotted(m.group(2)))
            if m.group(1) == "[[":
                key = tuple(parts)
                idx = counts.get(key, -1) + 1
                counts[key] = idx
                parts.append(idx)
            table = parts
            out.append((tuple(table), lineno))
            continue
        k = _KEY.match(line)
        if k:
            out.append((tuple(table + list(_split_dotted(k.group(1)))), lineno))
    return out


def locate(text: str, loc: Sequence[object]) -> int | None:
    """Line of the longest path in ``text`` that is a prefix of ``loc``; when none is, the first path that
    ``loc`` is a prefix of (``defense`` -> its first ``[[defense]]`` table); None if nothing matches."""
    best: tuple[int, int] | None = None  # (prefix length, line)
    target = tuple(loc)
    below: int | None = None
    for path, line in key_lines(text):
        n = len(path)
        if n <= len(target) and target[:n] == path and (best is None or n > best[0]):
            best = (n, line)
        if below is None and target and len(path) > len(target) and path[:len(target)] == target:
            below = line
    return best[1] if best else below
