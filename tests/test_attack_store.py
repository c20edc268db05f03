"""Pair store and crash-safe file helpers: atomic writes, torn-tail repair, resume bookkeeping, locks."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from attacker.errors import PairStoreError, RunFolderError
from attacker.files import folder_lock, open_jsonl_for_append, read_jsonl
from attacker.pairstore import PairStore
from translators.codecs import encode_image


def _png(seed: int, side: int = 8) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return encode_image(torch.rand(1, 3, side, side, generator=g))


def _fill(store: PairStore, indices: range) -> None:
    for i in indices:
        store.add_pair(i, _png(i), _png(1000 + i, 16), source=f"src{i}", crop=[0, 0, 8, 8], in_hw=[8, 8],
                       out_hw=[16, 16])


def test_pairs_round_trip_and_reopen(tmp_path: Path) -> None:
    with PairStore(tmp_path / "pairs").open() as st:
        _fill(st, range(3))
        st.add_refused(3, source="src3", crop=None, code="too_small")
    st2 = PairStore(tmp_path / "pairs").open(writable=False)
    assert len(st2) == 3
    assert st2.done_indices() == {0, 1, 2, 3}
    assert [r.code for r in st2.refused_records()] == ["too_small"]
    x, y = st2.load_pair(st2.ok_records()[1])
    assert x.shape == (1, 3, 8, 8)
    assert y.shape == (1, 3, 16, 16)
    assert (tmp_path / "pairs" / "inputs" / "q000001.png").read_bytes() == _png(1)
    lines = (tmp_path / "pairs" / "manifest.jsonl").read_text().splitlines()
    assert {"id", "input", "output", "query_index", "source", "crop", "status", "t"} <= set(json.loads(lines[0]))


def test_recording_an_index_twice_is_refused(tmp_path: Path) -> None:
    with PairStore(tmp_path).open() as st:
        _fill(st, range(1))
        with pytest.raises(PairStoreError, match="already recorded"):
            _fill(st, range(1))


def test_torn_tail_is_detected_and_repaired(tmp_path: Path) -> None:
    with PairStore(tmp_path).open() as st:
        _fill(st, range(4))
    manifest = tmp_path / "manifest.jsonl"
    good = manifest.read_bytes()
    manifest.write_bytes(good + b'{"id": "q000004", "input": "inputs/q0')  # killed mid-write
    st = PairStore(tmp_path).open()
    assert len(st) == 4
    assert st.repaired_lines == 1
    assert manifest.read_bytes() == good  # rewritten without the torn line
    _fill(st, range(4, 5))
    st.close()
    assert len(PairStore(tmp_path).open(writable=False)) == 5


def test_corrupt_middle_line_and_missing_files_are_dropped(tmp_path: Path) -> None:
    with PairStore(tmp_path).open() as st:
        _fill(st, range(4))
    manifest = tmp_path / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    lines[1] = "not json at all"
    manifest.write_text("\n".join(lines) + "\n")
    (tmp_path / "outputs" / "q000002.png").unlink()  # a pair whose file vanished
    st = PairStore(tmp_path).open()
    assert sorted(st.done_indices()) == [0, 3]  # 1 (corrupt) and 2 (no file) will be asked again
    st.close()
    assert len(read_jsonl(manifest).records) == 2


def test_read_only_open_needs_a_manifest(tmp_path: Path) -> None:
    with pytest.raises(PairStoreError, match="harvest pairs first"):
        PairStore(tmp_path / "nothing").open(writable=False)


def _writer(root: str, n: int) -> None:
    st = PairStore(root).open()
    i = 0
    while True:  # until killed
        st.add_pair(i, _png(i % 7), _png(i % 5, 16), source="s", crop=None)
        i += 1
        if i >= n:
            time.sleep(60)


def test_kill_9_during_writes_leaves_a_consistent_store(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_writer, args=(str(tmp_path), 10_000))
    p.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (tmp_path / "manifest.jsonl").exists() and (tmp_path / "manifest.jsonl").stat().st_size > 4000:
            break
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    st = PairStore(tmp_path).open()
    n = len(st)
    assert n > 10
    assert st.done_indices() == set(range(n))  # a prefix, no hole, no duplicate
    for rec in st.ok_records():
        st.load_pair(rec)  # every listed pair is readable


def test_folder_lock_excludes_a_second_process(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def other() -> None:
        try:
            with folder_lock(tmp_path):
                q.put("locked")
        except RunFolderError as exc:
            q.put(str(exc))

    with folder_lock(tmp_path):
        p = ctx.Process(target=other)
        p.start()
        p.join()
    assert "another heist process is using this run folder" in q.get(timeout=10)
    p = ctx.Process(target=other)  # released after the block
    p.start()
    p.join()
    assert q.get(timeout=10) == "locked"


def test_jsonl_appender_repairs_its_log(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a"')
    app, contents = open_jsonl_for_append(log)
    with app:
        app.append({"a": 3})
    assert [r["a"] for r in read_jsonl(log).records] == [1, 2, 3]
    assert contents.bad_lines == [3]
