"""The ``heist`` command as users run it (a real subprocess): help, and one-line errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from translators.codecs import write_image

ROOT = Path(__file__).resolve().parents[1]
HEIST = ROOT / ".venv" / "bin" / "heist"


def heist(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    if not HEIST.exists():
        pytest.fail(f"{HEIST} is missing: install the project into .venv (pip install -e '.[dev]')")
    # A wide terminal so rich does not wrap the one-line error (see report: main.py could use soft_wrap).
    full_env = {**os.environ, "COLUMNS": "250", **(env or {})}
    return subprocess.run([str(HEIST), *args], capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=180,
                          check=False)


def assert_user_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit 2, exactly one ``error:`` line carrying ``message``, and no traceback anywhere."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert message in errors[0], errors[0]


def test_help_lists_every_area() -> None:
    result = heist("--help")
    assert result.returncode == 0, result.stderr
    for area in ("zoo", "corpus", "data", "serve", "keys", "log", "attack", "eval", "campaign"):
        assert area in result.stdout


def test_unknown_split_is_a_one_line_error(tmp_path: Path) -> None:
    out = tmp_path / "export"
    assert_user_error(heist("corpus", "export", str(out), "--split", "training"), "unknown corpus split 'training'")
    assert not out.exists(), "nothing is written for a bad split"
    assert_user_error(heist("data", "inspect", "corpus:nope"), "unknown corpus split 'nope'")


def test_missing_folder_is_a_one_line_error(tmp_path: Path) -> None:
    assert_user_error(heist("data", "inspect", str(tmp_path / "no-such-folder")), "no-such-folder: not a folder")


def test_dataset_errors_are_one_line(tmp_path: Path) -> None:
    assert_user_error(heist("data", "fetch", "imagenet"), "unknown dataset 'imagenet'; known: bsd100")
    assert_user_error(heist("data", "inspect", "dataset:set14", env={"HEIST_DATA_DIR": str(tmp_path)}),
                      "run: heist data fetch set14")


def test_inspect_a_folder(tmp_path: Path) -> None:
    write_image(torch.rand(1, 3, 12, 20), tmp_path / "one.png")
    result = heist("data", "inspect", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "1 images" in result.stdout
    assert "20x12" in result.stdout


def test_usage_errors_exit_2_without_traceback() -> None:
    result = heist("data", "fetch")
    assert result.returncode == 2
    assert "Usage: heist data fetch" in result.stderr
    assert "Missing argument" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_start_up_does_not_import_piq_or_torchvision() -> None:
    """piq imports torchvision and torch._dynamo (about half of ``heist --help`` before they were imported
    where used); every command pays for what the CLI imports at start-up, so only scoring code imports them."""
    import sys

    probe = ("import sys, heist.cli.main, victim_service.app, attacker.fidelity, evaluation.metrics; "
             "print(sorted(m for m in ('piq', 'torchvision') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=180,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout

    from evaluation.metrics import psnr

    x = torch.rand(1, 3, 16, 16)
    assert float(psnr(x, x.clamp(0, 0.5), data_range=1.0)) > 0  # the lazy import still scores


def test_mistakes_found_by_users_are_one_line_errors(tmp_path: Path) -> None:
    """Each of these printed a traceback (or, for ``--target-psnr nan``, rewrote the results file first)."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    assert_user_error(heist("corpus", "export", str(blocker), "--split", "benchmark"),
                      "notes.txt is a file, not a folder")
    assert_user_error(heist("corpus", "export", "/proc/heist-nope", "--split", "benchmark"), "cannot write there")
    assert_user_error(heist("data", "fetch", "set5", "--dest", str(blocker / "sub")),
                      "notes.txt is a file, not a folder")
    assert_user_error(heist("data", "list", "--dest", str(blocker)), "notes.txt is a file, not a folder")
    assert blocker.read_text() == "not a folder"
    assert_user_error(heist("zoo", "build", "denoise25", "--profile", "tiny", "--force", "--device", "tpu",
                            env={"HEIST_DATA_DIR": str(tmp_path / "data")}), "device 'tpu': use auto, cpu, cuda")
    cached = tmp_path / "data" / "zoo" / "tiny" / "denoise25.safetensors"  # a cached model: nothing to train
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    cached.with_suffix(".json").write_text("{}")
    assert_user_error(heist("zoo", "build", "denoise25", "--profile", "tiny", "--device", "tpu",
                            env={"HEIST_DATA_DIR": str(tmp_path / "data")}), "device 'tpu': use auto, cpu, cuda")
    yaml_cfg = tmp_path / "victim.yaml"
    yaml_cfg.write_text("foo: [1,\n")
    assert_user_error(heist("keys", "list", "--config", str(yaml_cfg)), "not valid YAML")
    json_cfg = tmp_path / "victim.json"
    json_cfg.write_text('{"models": 5}')
    assert_user_error(heist("keys", "list", "--config", str(json_cfg)), "models: must be a list")
    results = tmp_path / "results.json"
    results.write_text("{}")
    assert_user_error(heist("eval", "report", str(results), "--target-psnr", "nan"), "--target-psnr nan")
    assert results.read_text() == "{}"  # checked before anything is read or written
    assert_user_error(heist("eval", "report", str(results), "--out", str(blocker)), "is a file")
    assert_user_error(heist("eval", "report", str(results), "--out", str(blocker / "sub")), "notes.txt is a file")


def test_empty_secrets_and_impossible_dp_settings_are_refused(tmp_path: Path) -> None:
    """An empty secret keys every watermark alike (a truncated copy, not a secret); a clipping norm of 0
    makes DP-SGD learn nothing. Both were accepted."""
    env = {"HEIST_DATA_DIR": str(tmp_path / "data")}
    empty = tmp_path / "secret"
    empty.write_text("\n")
    suspect = tmp_path / "suspect.safetensors"
    suspect.write_bytes(b"")
    assert_user_error(heist("defend", "verify", "--suspect", str(suspect), "--model", str(suspect),
                            "--secret-file", str(empty), env=env), f"--secret-file {empty} is empty")
    secret = tmp_path / "real-secret"
    secret.write_text("s3cret\n")
    verify = ("defend", "verify", "--suspect", str(suspect), "--secret-file", str(secret), "--model")
    # with no [[models]] these said "add [[models]] ... or pass --models-dir", an option verify lacks
    assert_user_error(heist(*verify, "nosuch", env=env), "--model nosuch: no served model of that name")
    assert_user_error(heist(*verify, "./mine.safetensors", env=env), "--model ./mine.safetensors: no such checkpoint")
    cfg = tmp_path / "victim.toml"
    cfg.write_text('defense_secret = "  "\n')
    assert_user_error(heist("keys", "list", "--config", str(cfg), env=env), "defense_secret is empty")
    victim = tmp_path / "victim.safetensors"
    assert_user_error(heist("defend", "dpsgd", "--victim", str(victim), "--out", str(tmp_path / "dp.safetensors"),
                            "--noise-multiplier", "1", "--max-grad-norm", "0", env=env), "--max-grad-norm 0.0")
    assert_user_error(heist("defend", "dpsgd", "--victim", str(victim), "--out", str(tmp_path / "dp.safetensors"),
                            "--noise-multiplier", "0", env=env), "--noise-multiplier 0.0: give a finite noise sigma")
    from types import SimpleNamespace

    from defenses.model_level.common import student_path
    from translators.errors import HeistError

    teacher = SimpleNamespace(source=victim)
    with pytest.raises(HeistError, match=r"written as NAME\.safetensors"):  # it wrote x.safetensors in silence
        student_path(tmp_path / "x.png", teacher)  # type: ignore[arg-type]
    assert student_path(tmp_path / "x", teacher) == tmp_path / "x.safetensors"  # type: ignore[arg-type]
    # an unwritable --out failed with a traceback only after the whole training run
    with pytest.raises(HeistError, match="cannot write there"):
        student_path("/proc/heist-student.safetensors", teacher)  # type: ignore[arg-type]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(HeistError, match="is a file, not a folder"):
        student_path(tmp_path / "afile" / "s.safetensors", teacher)  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_serve_refuses_bad_model_files_with_one_line_before_starting(tmp_path: Path) -> None:
    """A corrupt model file stopped `heist serve` with a 40-line uvicorn traceback from inside the worker's
    start-up; two files served under one name served one of them, chosen by file order, in silence."""
    from translators.archs import build_arch

    env = {"HEIST_DATA_DIR": str(tmp_path / "data")}
    models = tmp_path / "models"
    models.mkdir()
    module = build_arch("dncnn", {"channels": 4, "depth": 2}).eval()
    torch.jit.script(module).save(str(models / "m.pt"))
    (models / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    (models / "broken.json").write_text('{"name": "broken", "arch": "dncnn"}')
    serve = ("serve", "--models-dir", str(models), "--port", "1", "--no-monitor")
    assert_user_error(heist(*serve, env=env), "model 'broken': ")
    (models / "broken.safetensors").unlink()
    (models / "m b.pt").write_bytes((models / "m.pt").read_bytes())
    (models / "m-b.pt").write_bytes((models / "m.pt").read_bytes())
    assert_user_error(heist(*serve, env=env), "m b.pt and m-b.pt would both be served as 'm-b'")



def test_help_texts_lose_no_bracketed_words() -> None:
    """rich reads ``[privacy]`` or ``[monitor.signals]`` in a help text as markup and drops it from --help;
    such brackets must be escaped (``\\[``)."""
    import typer
    from rich.text import Text

    from heist.cli.main import app

    def walk(cmd, path: str):  # type: ignore[no-untyped-def]
        yield path, cmd.help or ""
        for p in cmd.params:
            yield f"{path} {p.name}", getattr(p, "help", None) or ""
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")

    eaten = [(where, text) for where, text in walk(typer.main.get_command(app), "heist")
             if Text.from_markup(text).plain != text.replace("\\[", "[")]
    assert not eaten, eaten


def test_every_option_has_help_and_the_reference_is_current() -> None:
    """Twenty options were in no doc and eleven printed no help (``--lr``, ``--batch-size``, every ``--seed``):
    each option needs a help text, and docs/cli.md (generated from the commands) must match them."""
    import typer

    from heist.cli.main import app
    from heist.cli.reference import _commands, render_reference

    silent = [f"heist {' '.join(path)} {p.opts[0]}" for path, cmd in _commands(typer.main.get_command(app))
              for p in cmd.params if p.param_type_name == "option" and not (p.help or "").strip()]
    assert not silent, silent
    text = render_reference()
    for row in ("## `heist attack harvest`", "| `--lr` |", "| `--crop-size` | `auto` |"):
        assert row in text
    on_disk = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    assert on_disk == text, "docs/cli.md is out of date with the commands: run `make docs`"


def test_first_problem_is_one_line_for_pydantic_and_plain_errors() -> None:
    """Six call sites formatted pydantic errors by hand (one printed pydantic's three-line text)."""
    from pydantic import BaseModel, Field, ValidationError

    from translators.errors import first_problem

    class P(BaseModel):
        radius: int = Field(ge=1, le=8)
        key_id: str

    with pytest.raises(ValidationError) as caught:
        P(radius=99)  # type: ignore[call-arg]
    line = first_problem(caught.value)
    assert line.startswith("radius: Input should be less than or equal to 8")
    assert line.endswith("(and 1 more problem(s))")
    assert "\n" not in line
    assert first_problem(ValueError("first\nsecond")) == "first"
    assert first_problem(ValueError()) == "ValueError"


def test_ctrl_c_says_it_stopped_and_how_to_resume(tmp_path: Path) -> None:
    """Typer turns Ctrl-C into a silent exit 130; the user is told what happened (it printed nothing)."""
    import signal
    import time

    # the embedded file log of a fresh data dir, whatever an earlier test left in this worker's environment
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HEIST_VICTIM_")},
           "COLUMNS": "250", "HEIST_DATA_DIR": str(tmp_path)}
    proc = subprocess.Popen([str(HEIST), "log", "tail", "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT, start_new_session=True)
    try:
        assert proc.stdout is not None
        assert "time (UTC)" in proc.stdout.readline() + proc.stdout.readline()  # the (empty) table: it is following
        time.sleep(0.5)
        err = ""
        for _ in range(12):  # Ctrl-C, again if a loaded machine has not acted on it within 5 s
            proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted: what was saved is kept; run the same command again to resume" in err
