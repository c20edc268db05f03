"""Run the command blocks of the README and docs/*.md that are marked runnable, as a user would type them.

A fenced block whose info string is ``bash runnable`` is executed; every other block is illustrative
(docs/CONTRIBUTING.md states the convention). All runnable blocks of the given files run in order, in one
bash session (variables such as ``KEY=$(...)`` carry over), inside a scratch copy of the repository (every
top-level entry symlinked, except ``.git`` and ``runs/``) with a fresh ``HEIST_DATA_DIR``. Rules:

- a command is a line plus its ``\\`` continuations; blank and ``#`` lines are skipped;
- a ``heist serve`` command (``.venv/bin/heist serve`` too, with or without a trailing ``&``) starts in the
  background and the session waits until ``GET /readyz`` answers 200; a later ``heist serve`` replaces it,
  and the session stops it at the end;
- the server listens on a free port (``HEIST_VICTIM_PORT``) and ``127.0.0.1:8000`` in commands is rewritten to
  it, so the run never collides with a server already on the default port;
- ``HEIST_VICTIM_KEY_PREFIX`` is a fresh prefix (removed from Redis afterwards), and the caller's environment
  sets the small sizes the docs mention (``BUDGET``, ``STEPS``, ...);
- the first command that exits non-zero stops the run: :class:`DocsRun` names its file and line.

Use::

    python -m tests.docsrun README.md docs/*.md            # the same check as tests/test_docs_run.py
    python -m tests.docsrun --list README.md docs/*.md     # only list the commands that would run
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
MARKER = "runnable"
_SERVE = re.compile(r"^(?:\S*/)?heist\s+serve(?:\s|$)")
_DEFAULT_HOSTPORT = "127.0.0.1:8000"


@dataclass(frozen=True)
class Command:
    """One logical command of a runnable block: ``text`` as written, at ``file:line``."""

    file: str
    line: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def is_serve(self) -> bool:
        return bool(_SERVE.match(self.text.strip()))


@dataclass
class DocsRun:
    """Outcome of :func:`run_commands`: per-command seconds, the failing command (if any) and the session log."""

    commands: list[Command]
    seconds: list[float] = field(default_factory=list)
    failed: Command | None = None
    returncode: int = 0
    log: str = ""

    def report(self) -> str:
        """One line per executed command with its wall time; the failure, if any, last."""
        lines = [f"{s:7.1f} s  {c.where}  {c.text.splitlines()[0][:100]}" for c, s in zip(self.commands, self.seconds)]
        if self.failed is not None:
            lines.append(f"FAILED (exit {self.returncode}) at {self.failed.where}: {self.failed.text}")
        return "\n".join(lines)


def runnable_blocks(path: Path, root: Path = ROOT) -> list[Command]:
    """The commands of every ```` ```bash runnable ```` block of a Markdown file, in order."""
    text = path.read_text()
    rel = str(path.resolve().relative_to(root)) if path.resolve().is_relative_to(root) else str(path)
    out: list[Command] = []
    for tok in MarkdownIt().parse(text):
        info = tok.info.split()
        if tok.type != "fence" or MARKER not in info[1:] or not tok.map:
            continue
        first = tok.map[0] + 2  # 1-based line of the block's first content line
        buf: list[str] = []
        start = first
        for i, line in enumerate(tok.content.splitlines()):
            if not buf:
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                start = first + i
            buf.append(line)
            if not line.rstrip().endswith("\\"):
                out.append(Command(rel, start, "\n".join(buf)))
                buf = []
        if buf:
            out.append(Command(rel, start, "\n".join(buf)))
    return out


_PRELUDE = r"""
set -o pipefail
__serve_pid=""
__stop_server() {
  if [ -n "$__serve_pid" ] && kill -0 "$__serve_pid" 2>/dev/null; then
    kill -TERM "$__serve_pid" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$__serve_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$__serve_pid" 2>/dev/null
    wait "$__serve_pid" 2>/dev/null
  fi
  __serve_pid=""
}
trap __stop_server EXIT
__serve() {  # run a `heist serve` command in the background until /readyz answers
  __stop_server
  ( eval "exec $1" ) > "$__DOCS_DIR/serve-$2.log" 2>&1 &  # a subshell: it sees the session's variables
  __serve_pid=$!
  local deadline=$(( $(date +%s) + ${DOCS_SERVE_TIMEOUT:-300} ))
  until curl -sf "http://127.0.0.1:$HEIST_VICTIM_PORT/readyz" >/dev/null 2>&1; do
    if ! kill -0 "$__serve_pid" 2>/dev/null; then
      echo "heist serve exited before it was ready:"; tail -n 30 "$__DOCS_DIR/serve-$2.log"; return 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "heist serve not ready after ${DOCS_SERVE_TIMEOUT:-300} s:"; tail -n 30 "$__DOCS_DIR/serve-$2.log"; return 1
    fi
    sleep 0.3
  done
  echo "(server ready on port $HEIST_VICTIM_PORT; its log: serve-$2.log)"
}
__step() { echo "$1 $(date +%s.%N)" >> "$__DOCS_DIR/steps.txt"; }
"""


def _script(commands: list[Command], port: int) -> str:
    parts = [_PRELUDE]
    for i, c in enumerate(commands):
        text = c.text.replace(_DEFAULT_HOSTPORT, f"127.0.0.1:{port}")
        parts.append(f"\n__step {i}\necho {shlex.quote(f'$ {c.text}  # {c.where}')}")
        if c.is_serve:
            body = re.sub(r"\s*&\s*$", "", text.strip())
            parts.append(f"__serve {shlex.quote(body)} {i}")
        else:
            parts.append(text)
        parts.append(f'__rc=$?; if [ $__rc -ne 0 ]; then __step {i + 1}; echo "{i} $__rc" > "$__DOCS_DIR/failed.txt"; '
                     'exit $__rc; fi')
    parts.append(f"\n__step {len(commands)}\n")
    return "\n".join(parts)


def scratch_clone(dest: Path, root: Path = ROOT) -> Path:
    """``dest`` with a symlink to every top-level entry of the repository but ``.git`` and ``runs``, as a clone.

    ``.venv`` points at the running interpreter's environment (created as a tiny one whose ``activate`` puts
    that interpreter first on ``PATH`` when it is not a virtual environment)."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        if entry.name in (".git", "runs", ".venv", ".cache") or (dest / entry.name).exists():
            continue
        (dest / entry.name).symlink_to(entry)
    venv = Path(sys.prefix)
    if (venv / "bin" / "activate").exists():
        (dest / ".venv").symlink_to(venv)
    else:
        (dest / ".venv" / "bin").mkdir(parents=True)
        (dest / ".venv" / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    return dest


def run_commands(commands: list[Command], workdir: Path, env: dict[str, str], port: int,
                 timeout: float = 1800.0) -> DocsRun:
    """Run ``commands`` in one bash session in ``workdir`` (see the module docstring); never raises on failure."""
    logs = workdir / ".docsrun"
    logs.mkdir(parents=True, exist_ok=True)
    script = logs / "session.sh"
    script.write_text(_script(commands, port))
    full_env = {**env, "__DOCS_DIR": str(logs), "HEIST_VICTIM_PORT": str(port)}
    with open(logs / "session.log", "wb") as out:
        # its own process group, so that a server left behind (the session killed by a timeout) goes with it
        proc = subprocess.Popen(["bash", str(script)], cwd=workdir, env=full_env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            _kill_group(proc)
    stamps = [float(line.split()[1]) for line in (logs / "steps.txt").read_text().splitlines()] \
        if (logs / "steps.txt").exists() else []
    result = DocsRun(commands, [b - a for a, b in itertools.pairwise(stamps)], returncode=proc.returncode,
                     log=(logs / "session.log").read_text(errors="replace"))
    if (logs / "failed.txt").exists():
        idx, rc = (logs / "failed.txt").read_text().split()
        result.failed, result.returncode = commands[int(idx)], int(rc)
        result.seconds = result.seconds[: int(idx) + 1]
    elif proc.returncode != 0:
        result.failed = commands[min(len(stamps) - 1, len(commands) - 1)] if stamps else commands[0]
    return result


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop whatever of the session's process group still runs: SIGTERM, then SIGKILL after 10 s."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            proc.poll()
            time.sleep(0.1)
        else:
            continue
        break
    proc.poll()


def forget_prefix(redis_url: str, prefix: str) -> int:
    """Delete the session's Redis keys (``prefix*``); returns how many. Redis down: 0."""
    import redis

    try:
        r = redis.Redis.from_url(redis_url, socket_connect_timeout=1)
        keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
        return int(r.delete(*keys)) if keys else 0
    except redis.RedisError:
        return 0


def docs_files(root: Path = ROOT) -> list[Path]:
    """The README, then every docs/*.md in name order."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def session_env(data_dir: Path, key_prefix: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment with a fresh data dir and Redis key prefix, the repository first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEIST_VICTIM_")}
    env.update({
        "HEIST_DATA_DIR": str(data_dir),
        "HEIST_VICTIM_KEY_PREFIX": key_prefix,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        "COLUMNS": "200",
        **(extra or {}),
    })
    return env


def main(argv: list[str]) -> int:
    import socket
    import tempfile

    listing = "--list" in argv
    files = [Path(a) for a in argv if a != "--list"] or docs_files()
    commands = [c for f in files for c in runnable_blocks(f)]
    if listing:
        for c in commands:
            print(f"{c.where}  {c.text.splitlines()[0]}")  # noqa: T201 - a command-line listing
        return 0
    work = Path(tempfile.mkdtemp(prefix="heist-docsrun-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    t0 = time.monotonic()
    prefix = f"heist-docs:{uuid.uuid4().hex[:8]}:"
    try:
        result = run_commands(commands, scratch_clone(work / "clone"), session_env(work / "data", prefix), port)
    finally:
        forget_prefix(os.environ.get("HEIST_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"), prefix)
    print(result.report())  # noqa: T201 - a command-line report
    print(json.dumps({"commands": len(commands), "seconds": round(time.monotonic() - t0, 1),  # noqa: T201
                      "failed": result.failed.where if result.failed else None, "workdir": str(work)}))
    return 1 if result.failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
