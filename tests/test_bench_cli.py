"""The bench scripts refuse bad arguments with one argparse-style line (exit 2, no traceback), and SIGTERM to
``bench/serve.py`` stops what it started (the uvicorn server in its own session, load generators) and removes
its temporary folders, as Ctrl-C does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def run_bench(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd or ROOT, env={**os.environ, "COLUMNS": "200"})


def assert_arg_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, result.stderr
    assert message in errors[0], errors[0]


@pytest.mark.parametrize(("script", "args", "message"), [
    ("serve.py", ["--levels", "abc"], "argument --levels: 'abc' is not an integer"),
    ("serve.py", ["--configs", "fast"], "argument --configs"),
    ("serve.py", ["--model", "/nonexistent.safetensors"], "no such file"),
    ("serve.py", ["--requests", "-5"], "argument --requests: -5 is below the minimum 1"),
    ("serve.py", ["--device", "cud"], "argument --device: 'cud' is not a device"),
    ("codecs.py", ["--images", "0"], "argument --images: 0 is below the minimum 1"),
    ("sybil_linking.py", ["--benign-clients", "1"], "argument --benign-clients: 1 is below the minimum 2"),
    ("cli_startup.py", ["--repeats", "0"], "argument --repeats: 0 is below the minimum 1"),
    ("loadgen.py", ["drive", "--url", "http://127.0.0.1:9/v1/x", "--key", "k", "--body", __file__,
                    "--concurrency", "0", "--requests", "1"], "argument --concurrency: 0 is below the minimum 1"),
])
def test_bad_arguments_are_one_line_errors(script: str, args: list[str], message: str) -> None:
    assert_arg_error(run_bench(script, *args), message)


def test_cuda_without_a_gpu_fails_up_front() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_arg_error(run_bench("watermark.py", "--device", "cuda"), "no CUDA device on this machine")


def test_loadgen_against_a_closed_port_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    body = tmp_path / "in.png"
    body.write_bytes(b"x")
    r = run_bench("loadgen.py", "drive", "--url", f"http://127.0.0.1:{port}/v1/models/m/translate", "--key", "k",
                  "--body", str(body), "--concurrency", "2", "--requests", "2")
    assert_arg_error(r, "cannot reach")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _descendants(pid: int) -> set[int]:
    kids, out, todo = _children(), set(), [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            if k not in out:
                out.add(k)
                todo.append(k)
    return out


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_sigterm_to_serve_stops_the_server_and_cleans_up(tmp_path: Path) -> None:
    """SIGTERM once the victim server runs (smallest settings): serve.py exits 143 within seconds, its uvicorn
    server (own session) and every other child are gone, and its temporary folders are removed."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / "serve.py"), "--small", "--no-redis", "--levels", "1", "--configs", "1",
         "--requests", "2", "--raw-seconds", "0.2", "--size", "16", "--clients", "1",
         "--out", str(tmp_path / "serve.json")],
        cwd=ROOT, env={**os.environ, "TMPDIR": str(tmpdir)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 50
        server = None
        while server is None and time.monotonic() < deadline and proc.poll() is None:
            seen |= _descendants(proc.pid)
            server = next((p for p in seen if "victim_service.app" in _cmdline(p)), None)
            time.sleep(0.2)
        assert server is not None, f"no uvicorn child within 50 s (rc {proc.poll()})"
        seen |= _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {p: _cmdline(p) for p in seen if _alive(p)}
    for p in left:  # do not leave them behind even when the test fails
        os.kill(p, signal.SIGKILL)
    assert not left, left
    assert list(tmpdir.iterdir()) == [], list(tmpdir.iterdir())
