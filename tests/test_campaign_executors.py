"""The sequential executor fails a crashing cell alone (as a crashed Ray task does) and still stops on
Ctrl-C; an unreadable saved cell record is redone with a warning, never silently."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from evaluation.campaign.executors import SequentialExecutor
from evaluation.campaign.runner import _load_cell


@dataclass(frozen=True)
class _Task:
    id: str


def _run_one(task: _Task) -> str:
    if task.id == "bug":
        raise KeyError("missing_setting")
    if task.id == "stop":
        raise KeyboardInterrupt
    return f"done:{task.id}"


def test_a_crashing_cell_fails_alone_and_the_others_run(caplog: pytest.LogCaptureFixture) -> None:
    done: list[str] = []
    cells = SequentialExecutor().run(_run_one, [_Task("a"), _Task("bug"), _Task("c")], on_done=done.append,
                                     failed=lambda t, err: f"failed:{t.id}:{err}")
    assert cells == ["done:a", "failed:bug:KeyError: 'missing_setting'", "done:c"]
    assert done == cells
    assert "cell bug crashed" in caplog.text
    assert "Traceback" in caplog.text  # the bug's traceback is logged, not lost


def test_ctrl_c_still_stops_the_sequential_run() -> None:
    done: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        SequentialExecutor().run(_run_one, [_Task("a"), _Task("stop"), _Task("c")], on_done=done.append,
                                 failed=lambda t, err: "failed")
    assert done == ["done:a"]


@pytest.mark.parametrize("text", ['{"id": "x", "status": "do', "[1, 2]", '{"id": 3}'])
def test_an_unreadable_cell_record_is_redone_with_a_warning(tmp_path: Path, text: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cell.json"
    path.write_text(text)
    assert _load_cell(path) is None
    assert f"{path} is unreadable" in caplog.text
    assert _load_cell(tmp_path / "none.json") is None
