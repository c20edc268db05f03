"""The pair store: harvested (input, output) images plus an append-only JSONL manifest.

Layout (``docs/CONTRACTS.md``, attacker run folder)::

    pairs/manifest.jsonl       one JSON line per query outcome (see :class:`PairRecord`)
    pairs/inputs/q000123.png   exactly the bytes sent to the victim
    pairs/outputs/q000123.png  exactly the bytes the victim returned

Write order makes every manifest line trustworthy: both image files are written first (temp file +
``os.replace``, fsync when ``durable``), then the manifest line is appended with one ``write`` and
fsynced. A ``kill -9`` therefore leaves at most orphan image files (overwritten when the query is
redone) or one torn manifest line, which :meth:`PairStore.open` detects and drops. Lines whose image
files are missing are dropped too, so the query is simply asked again on resume.

Records are keyed by ``query_index``: the strategy's deterministic index, so a resumed harvest asks
exactly the indices the manifest does not hold, never one twice.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from attacker.errors import PairStoreError
from attacker.files import JsonlAppender, JsonlContents, read_jsonl, repair_jsonl
from translators.codecs import ImageLimits, decode_image
from translators.errors import ImageError
from translators.files import atomic_write_bytes

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
_LOCAL_LIMITS = ImageLimits(max_bytes=1 << 31, max_pixels=1 << 31)


class PairRecord(BaseModel):
    """One manifest line. ``status`` is ``ok`` (a pair) or ``refused`` (the victim rejected the input:
    no output file, ``code`` says why). ``crop`` is ``[top, left, height, width]`` in the source image
    after any downscale, or None for whole images. ``t`` is the Unix time of the answer."""

    model_config = ConfigDict(extra="allow")

    id: str
    input: str | None = None
    output: str | None = None
    query_index: int
    source: str
    crop: list[int] | None = None
    status: Literal["ok", "refused"] = "ok"
    t: float
    code: str | None = None
    in_hw: list[int] | None = None
    out_hw: list[int] | None = None
    input_sha256: str | None = None
    key: str | None = None
    request_id: str | None = None
    latency_ms: float | None = None


def pair_id(query_index: int) -> str:
    return f"q{query_index:06d}"


class PairStore:
    """Harvested pairs of one run folder (``RUN/pairs``). Use :meth:`open` before anything else."""

    def __init__(self, root: str | Path, durable: bool = True) -> None:
        self.root = Path(root)
        self.durable = durable
        self.records: dict[int, PairRecord] = {}
        self.repaired_lines = 0
        self.dropped_records = 0
        self._appender: JsonlAppender | None = None

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    # --- reading -------------------------------------------------------------------------------
    def open(self, writable: bool = True) -> PairStore:
        """Read the manifest, drop a torn tail, duplicate indices and lines whose files are gone."""
        if not writable and not self.manifest_path.exists():
            raise PairStoreError(f"{self.root}: no {MANIFEST} here; harvest pairs first (heist attack harvest)")
        if writable:
            (self.root / "inputs").mkdir(parents=True, exist_ok=True)
            (self.root / "outputs").mkdir(parents=True, exist_ok=True)
        contents = read_jsonl(self.manifest_path)
        kept: list[dict[str, Any]] = []
        self.records = {}
        for raw in contents.records:
            try:
                rec = PairRecord.model_validate(raw)
            except ValidationError:
                self.dropped_records += 1
                continue
            if rec.query_index in self.records:
                self.dropped_records += 1
                continue
            if rec.status == "ok" and not self._files_present(rec):
                self.dropped_records += 1
                continue
            self.records[rec.query_index] = rec
            kept.append(raw)
        self.repaired_lines = len(contents.bad_lines)
        if contents.needs_repair or self.dropped_records:
            msg = "%s: repaired the manifest (%d torn/corrupt line(s), %d record(s) without files or duplicated)"
            if writable:
                log.warning(msg, self.manifest_path, self.repaired_lines, self.dropped_records)
                repair_jsonl(self.manifest_path, JsonlContents(records=kept), self.durable)
            else:
                log.warning(msg.replace("repaired", "ignored") + "; not repaired (read-only)", self.manifest_path,
                            self.repaired_lines, self.dropped_records)
        if writable:
            self._appender = JsonlAppender(self.manifest_path, durable=self.durable)
        return self

    def _files_present(self, rec: PairRecord) -> bool:
        for rel in (rec.input, rec.output):
            if rel is None:
                return False
            p = self.root / rel
            try:
                if p.stat().st_size == 0:
                    return False
            except OSError:
                return False
        return True

    def done_indices(self) -> set[int]:
        """Query indices with a final outcome (a pair or a refusal): never asked again."""
        return set(self.records)

    def ok_records(self) -> list[PairRecord]:
        return sorted((r for r in self.records.values() if r.status == "ok"), key=lambda r: r.query_index)

    def refused_records(self) -> list[PairRecord]:
        return sorted((r for r in self.records.values() if r.status == "refused"), key=lambda r: r.query_index)

    def __len__(self) -> int:
        return sum(1 for r in self.records.values() if r.status == "ok")

    def load_pair(self, rec: PairRecord) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input, output)``, each ``(1, 3, H, W)`` float in [0, 1]."""
        if rec.input is None or rec.output is None:
            raise PairStoreError(f"{rec.id}: not a pair (status {rec.status})")
        return self._read(rec.input), self._read(rec.output)

    def _read(self, rel: str) -> torch.Tensor:
        p = self.root / rel
        try:
            return decode_image(p.read_bytes(), _LOCAL_LIMITS)
        except OSError as exc:
            raise PairStoreError(f"{p}: cannot read ({exc.strerror or exc})") from None
        except ImageError as exc:
            raise PairStoreError(f"{p}: {exc}") from None

    # --- writing -------------------------------------------------------------------------------
    def _append(self, rec: PairRecord) -> None:
        if self._appender is None:
            raise PairStoreError(f"{self.root}: store opened read-only")
        if rec.query_index in self.records:
            raise PairStoreError(f"{self.root}: query {rec.query_index} is already recorded")
        line = rec.model_dump(mode="json", exclude_none=True)
        for k in ("input", "output", "crop"):  # contract fields stay present (null) on refusals
            line.setdefault(k, None)
        self._appender.append(line)
        self.records[rec.query_index] = rec

    def add_pair(
        self,
        query_index: int,
        input_bytes: bytes,
        output_bytes: bytes,
        *,
        source: str,
        crop: list[int] | None,
        output_media_type: str = "image/png",
        in_hw: list[int] | None = None,
        out_hw: list[int] | None = None,
        **extra: Any,
    ) -> PairRecord:
        """Store one pair: image files first (atomic), then the manifest line (one write, fsync)."""
        pid = pair_id(query_index)
        ext = _EXT.get(output_media_type.split(";")[0].strip().lower(), "png")
        inp_rel, out_rel = f"inputs/{pid}.png", f"outputs/{pid}.{ext}"
        atomic_write_bytes(self.root / inp_rel, input_bytes, self.durable)
        atomic_write_bytes(self.root / out_rel, output_bytes, self.durable)
        rec = PairRecord(
            id=pid, input=inp_rel, output=out_rel, query_index=query_index, source=source, crop=crop,
            status="ok", t=time.time(), in_hw=in_hw, out_hw=out_hw,
            input_sha256=hashlib.sha256(input_bytes).hexdigest(), **extra,
        )
        self._append(rec)
        return rec

    def add_refused(
        self, query_index: int, *, source: str, crop: list[int] | None, code: str, **extra: Any
    ) -> PairRecord:
        """Record that the victim refused this input, so a resume does not ask it again."""
        rec = PairRecord(id=pair_id(query_index), input=None, output=None, query_index=query_index, source=source,
                         crop=crop, status="refused", t=time.time(), code=code, **extra)
        self._append(rec)
        return rec

    def close(self) -> None:
        if self._appender is not None:
            self._appender.close()
            self._appender = None

    def __enter__(self) -> PairStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
