"""Docs that run: the README's tour and every ``bash runnable`` block of docs/*.md, typed as a user would,
on a fresh data dir with the real server and Redis (tests/docsrun.py; convention in docs/CONTRIBUTING.md)."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.docsrun import (
    ROOT,
    Command,
    docs_files,
    forget_prefix,
    run_commands,
    runnable_blocks,
    scratch_clone,
    session_env,
)

log = logging.getLogger(__name__)

SMALL = {"BUDGET": "12", "STEPS": "20"}  # the sizes README.md and docs/CONTRIBUTING.md name


def test_runnable_blocks_are_found_with_their_lines(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("# t\n\n```bash\nnot run\n```\n\n"
                   "```bash runnable\n# a comment\necho a \\\n  b\n\nheist serve &\n```\n")
    cmds = runnable_blocks(doc, tmp_path)
    assert cmds == [Command("x.md", 9, "echo a \\\n  b"), Command("x.md", 12, "heist serve &")]
    assert [c.is_serve for c in cmds] == [False, True]


def test_runner_reports_the_line_that_broke(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("```bash runnable\nX=$(echo hi)\ntest \"$X\" = hi\nfalse && echo never\necho after\n```\n")
    cmds = runnable_blocks(doc, tmp_path)
    work = tmp_path / "w"
    work.mkdir()
    res = run_commands(cmds, work, session_env(tmp_path / "data", "heist-test:unused:"), free_port())
    assert res.failed == Command("doc.md", 4, "false && echo never")
    assert res.returncode == 1
    assert len(res.seconds) == 3
    assert "$ echo after" not in res.log
    assert "FAILED (exit 1) at doc.md:4" in res.report()


@pytest.mark.slow
def test_readme_tour_and_runnable_docs_blocks_run(tmp_path: Path, redis_url: str) -> None:
    files = docs_files()
    commands = [c for f in files for c in runnable_blocks(f)]
    tour = [c for c in commands if c.file == "README.md"]
    assert len(tour) >= 15, "the README's tour must stay a runnable block"
    assert any(c.is_serve for c in tour)
    assert {c.file for c in commands} >= {"README.md", "docs/attacker.md", "docs/victim-service.md"}

    prefix = f"heist-test:docs-{uuid.uuid4().hex[:8]}:"
    work = scratch_clone(tmp_path / "clone", ROOT)
    try:
        res = run_commands(commands, work, session_env(tmp_path / "data", prefix, SMALL), free_port())
    finally:
        forget_prefix(redis_url, prefix)
    log.info("executed blocks, seconds per command:\n%s", res.report())
    assert res.failed is None, f"{res.report()}\n--- session output (tail) ---\n{res.log[-6000:]}"
    assert "warning: the server running at" not in res.log  # every key went where the server reads them
    assert (work / "runs" / "a1" / "eval" / "results.json").exists()
    assert (work / "out.png").read_bytes()[:4] == b"\x89PNG"
