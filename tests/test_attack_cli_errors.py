"""``heist attack`` mistakes through the real CLI against a real victim server: each is one ``error:`` line,
exit code 2, and (for commands that spend queries) no query sent; plus imitate's recorded size and warning.

Queries are counted in the server's query log (``GET /v1/admin/log``), which records every translate
request, refused keys included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from attacker.strategies import STRATEGY_REGISTRY
from tests.conftest import free_port
from tests.servers import VictimServer, image_bytes, start_victim, tiny_models
from translators.archs.registry import build_arch
from translators.checkpoint import ModelCard, save_checkpoint

TIERS = {"open": {"rate": None}, "one": {"rate": None, "quota_total": 1}}
CLIENTS = {"open": "open", "drained": "one"}


def _identity_victim(folder: Path) -> Path:
    """A DnCNN whose weights are all zero: ``x - body(x)`` is exactly ``x``, so nothing beats the identity."""
    path = folder / "identity.safetensors"
    kwargs = {"channels": 8, "depth": 3}
    module = build_arch("dncnn", kwargs).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    save_checkpoint(module, path, ModelCard(name="identity", arch="dncnn", kwargs=kwargs, task="denoise",
                                            min_side=8, description="identity test victim"))
    return path


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictimServer]:
    tmp = tmp_path_factory.mktemp("cli-errors")
    tm = tiny_models(tmp / "models", ("sr4x", "denoise"))
    srv = start_victim(tmp, models=[
        {"name": "denoise", "source": str(tm["denoise"]), "max_batch": 4},
        {"name": "sr4x", "source": str(tm["sr4x"]), "max_batch": 4},
        {"name": "identity-small", "source": str(_identity_victim(tmp / "models")), "max_batch": 4,
         "max_pixels": 4096},
    ], tiers=TIERS, keys=CLIENTS)
    # use up the one query of `drained`'s quota
    r = httpx.post(f"{srv.url}/v1/models/denoise/translate", content=image_bytes(16, 16),
                   headers={**srv.headers("drained"), "Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def models(victim: VictimServer) -> dict[str, Path]:
    return tiny_models(victim.settings_path.parent.parent / "models", ("sr4x",))


def _png(path: Path, w: int, h: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(h, w, seed=seed))
    return path


@pytest.fixture(scope="module")
def candidates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Member and non-member folders of 24x24 pairs (3 each)."""
    root = tmp_path_factory.mktemp("candidates")
    for group, offset in (("members", 0), ("non_members", 10)):
        for i in range(3):
            for sub in ("inputs", "targets"):
                _png(root / group / sub / f"{group[:3]}{i}.png", 24, 24, seed=offset + i)
    return root / "members", root / "non_members"


@pytest.fixture(scope="module")
def harvested(victim: VictimServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder holding two harvested pairs (for `attack train`)."""
    from attacker.harvest import harvest

    run = tmp_path_factory.mktemp("harvested") / "run"
    r = harvest(victim.url, victim.keys["open"], "denoise", run, budget=2, strategy_params={"crop_size": 32})
    assert r.pairs == 2
    return run


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from heist.cli.main import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def _queries(srv: VictimServer) -> int:
    """Translate requests the victim has logged so far (any key, refused ones included)."""
    r = httpx.get(f"{srv.url}/v1/admin/log", params={"limit": 10_000}, headers=srv.admin_headers, timeout=30)
    assert r.status_code == 200, r.text
    return len(r.json())


def _one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The single ``error:`` line of a failed command (exit 2, nothing else on stderr, no traceback)."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _mia_args(victim: VictimServer, candidates: tuple[Path, Path], out: Path, key: str = "open") -> list[str]:
    return ["attack", "mia", "--url", victim.url, "--api-key", victim.keys.get(key, key), "--model", "denoise",
            "--members", str(candidates[0]), "--non-members", str(candidates[1]), "--out", str(out)]


# --- 1: a reference model that does not fit the candidates -------------------------------------------------
def test_mia_with_an_sr_reference_fails_before_any_query(victim: VictimServer, models: dict[str, Path],
                                                         candidates: tuple[Path, Path], tmp_path: Path) -> None:
    before = _queries(victim)
    res = _cli(*_mia_args(victim, candidates, tmp_path / "mia"), "--reference", str(models["sr4x"]))
    _one_line_error(res, "--reference", "x4", "same-size")
    assert _queries(victim) == before
    assert not (tmp_path / "mia").exists()


def test_mia_with_a_reference_whose_size_rules_do_not_fit_fails_before_any_query(
        victim: VictimServer, candidates: tuple[Path, Path], tmp_path: Path) -> None:
    imgs = tmp_path / "public"
    for i in range(2):
        _png(imgs / f"p{i}.png", 64, 64, seed=i)
    # another suffix is refused (as heist defend akd/dmp do), not silently replaced
    res = _cli("attack", "mia-reference", "--out", str(tmp_path / "ref.bin"), "--images", str(imgs),
               "--side", "16", "--steps", "2")
    _one_line_error(res, "--out", "ref.bin", "NAME.safetensors")
    # the lab's private split is refused as reference data
    res = _cli("attack", "mia-reference", "--out", str(tmp_path / "ref"), "--images", "corpus:victim",
               "--side", "16", "--steps", "2")
    _one_line_error(res, "--images corpus:victim", "private", "corpus:attacker")
    assert not list(tmp_path.glob("ref*"))
    res = _cli("attack", "mia-reference", "--out", str(tmp_path / "ref"), "--images", str(imgs),
               "--side", "16", "--steps", "2")
    assert res.returncode == 0, res.stderr
    written = tmp_path / "ref.safetensors"
    # 3: the path printed is the one written (save_checkpoint adds .safetensors), and it loads
    assert f"reference model: {written}" in " ".join(res.stdout.split())
    assert written.exists()
    assert written.with_suffix(".json").exists()
    before = _queries(victim)
    res = _cli(*_mia_args(victim, candidates, tmp_path / "mia"), "--reference", str(written))
    _one_line_error(res, "24x24", "multiples of 16")  # loaded fine; its depth-4 U-Net needs multiples of 16
    assert _queries(victim) == before


# --- 4: mia-reference --side the U-Net cannot take ----------------------------------------------------------
def test_mia_reference_side_not_a_multiple_of_16_is_a_one_line_error(tmp_path: Path) -> None:
    res = _cli("attack", "mia-reference", "--out", str(tmp_path / "ref"), "--side", "20", "--steps", "1")
    _one_line_error(res, "--side 20", "multiple of 16")
    assert not list(tmp_path.iterdir())


# --- 2: --out naming an existing file ------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["harvest", "imitate", "mia", "train", "status", "harvest-below-a-file"])
def test_out_naming_a_file_is_a_one_line_error_before_any_query(
        command: str, victim: VictimServer, candidates: tuple[Path, Path], harvested: Path, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    image = _png(tmp_path / "x.png", 48, 48)
    common = ["--url", victim.url, "--api-key", victim.keys["open"], "--model", "denoise"]
    args = {
        "harvest": ["attack", "harvest", *common, "--out", str(afile), "--budget", "2"],
        "harvest-below-a-file": ["attack", "harvest", *common, "--out", str(afile / "run"), "--budget", "2"],
        "imitate": ["attack", "imitate", *common, "--image", str(image), "--out", str(afile), "--profile", "tiny"],
        "mia": _mia_args(victim, candidates, afile),
        "train": ["attack", "train", "--pairs", str(harvested), "--out", str(afile), "--steps", "1"],
        "status": ["attack", "status", str(afile)],
    }[command]
    before = _queries(victim)
    _one_line_error(_cli(*args), str(afile), "not a folder")
    assert _queries(victim) == before
    assert afile.read_text() == "not a folder\n"


# --- 5: imitate with an image too small for the model or the surrogate ---------------------------------------
@pytest.mark.parametrize(("side", "needles"), [
    (24, ("24x24", "at least 32 px a side", "small unet-l2 surrogate", "--profile tiny accepts 16")),
    (4, ("4x4", "'denoise' takes at least 8 px a side")),
])
def test_imitate_refuses_an_image_too_small_before_its_one_query(
        side: int, needles: tuple[str, ...], victim: VictimServer, tmp_path: Path) -> None:
    image = _png(tmp_path / "small.png", side, side)
    before = _queries(victim)
    res = _cli("attack", "imitate", "--url", victim.url, "--api-key", victim.keys["open"], "--model", "denoise",
               "--image", str(image), "--out", str(tmp_path / "run"))
    _one_line_error(res, str(image), *needles)
    assert _queries(victim) == before
    assert not (tmp_path / "run").exists()


# --- 6 + 7: imitate records the size it sent and warns below the baseline ------------------------------------
def test_imitate_records_the_downscaled_size_and_warns_below_the_baseline(victim: VictimServer,
                                                                          tmp_path: Path) -> None:
    image = _png(tmp_path / "big.png", 100, 90)  # 9000 px > the model's max_pixels 4096
    before = _queries(victim)
    res = _cli("attack", "imitate", "--url", victim.url, "--api-key", victim.keys["open"], "--model",
               "identity-small", "--image", str(image), "--out", str(tmp_path / "run"), "--profile", "tiny",
               "--steps", "1", "--threads", "1")
    assert res.returncode == 0, res.stderr
    assert _queries(victim) == before + 1
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    h, w = run["imitate"]["size"]
    assert (h, w) != (90, 100)
    assert h * w <= 4096
    assert run["imitate"]["original_size"] == [90, 100]
    manifest = [json.loads(ln) for ln in (tmp_path / "run" / "pairs" / "manifest.jsonl").read_text().splitlines()]
    assert [r["in_hw"] for r in manifest if r.get("status", "ok") == "ok"] == [[h, w]]  # what was really sent
    err = " ".join(res.stderr.split())
    assert f"sending it as {w}x{h}" in err
    assert "max_pixels 4096" in err
    # the victim is the identity: one training step cannot match the identity baseline
    assert run["imitate"]["warning"]
    assert "NOT better" in run["imitate"]["warning"]
    assert "WARNING: the surrogate is NOT better" in err
    from attacker.train import scored_on

    where = scored_on(run["imitate"]["held_out"])  # "held-out ..." only when something was held out
    assert f"{where} vs victim" in " ".join(res.stdout.split())
    assert f"baseline on {where}" in run["imitate"]["warning"]
    assert scored_on("none") == "the training pairs (nothing held out)"
    assert "--time-budget" in err
    assert "harvest more" not in err
    assert "--time-budget" in _cli("attack", "imitate", "--help").stdout


# --- 8: a URL that is not a Heist victim, a malformed URL ----------------------------------------------------
def test_a_non_heist_url_and_a_malformed_url_are_one_line_errors(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "index.html").write_text("hello\n")
    web = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.1)
        line = _one_line_error(_cli("attack", "models", "--url", f"http://127.0.0.1:{port}"), "404",
                               "Heist victim API")
        assert len(line) < 400  # the HTML page is flattened and cut, not dumped
    finally:
        web.terminate()
        web.wait(10)
    _one_line_error(_cli("attack", "models", "--url", "http://[::1"), "--url", "not a valid URL")


# --- 9: a refused key and a used-up quota in mia --------------------------------------------------------------
@pytest.mark.parametrize(("key", "needles"), [
    ("hk_test_wrong_0123456789abcdef", ("refused API key", "401")),
    ("drained", ("no quota left", "quota_exhausted")),
])
def test_mia_with_a_refused_key_names_the_key_problem_and_leaks_nothing(
        key: str, needles: tuple[str, ...], victim: VictimServer, candidates: tuple[Path, Path],
        tmp_path: Path) -> None:
    res = _cli(*_mia_args(victim, candidates, tmp_path / "mia", key=key))
    _one_line_error(res, *needles)  # also: no "coroutine ... was never awaited" RuntimeWarning on stderr
    assert not (tmp_path / "mia" / "scores.json").exists()


# --- 10: --strategy help lists every registered strategy -----------------------------------------------------
def test_harvest_strategy_help_lists_every_registered_strategy() -> None:
    res = _cli("attack", "harvest", "--help")
    assert res.returncode == 0, res.stderr
    text = " ".join(ln.strip("│ ") for ln in res.stdout.splitlines())
    names = STRATEGY_REGISTRY.names()
    assert {"interleave", "novel", "random", "crops"} <= set(names)
    for name in names:
        assert name in text.split("Query strategy:")[1].split("[default")[0], name



# --- imitate with a used-up quota: the quota is named, not an empty manifest ------------------------------------
def test_imitate_with_a_used_up_quota_says_so(victim: VictimServer, tmp_path: Path) -> None:
    image = _png(tmp_path / "x.png", 48, 48)
    res = _cli("attack", "imitate", "--url", victim.url, "--api-key", victim.keys["drained"], "--model", "denoise",
               "--image", str(image), "--steps", "2", "--out", str(tmp_path / "im"))
    assert res.returncode == 2, (res.returncode, res.stderr)
    last = [ln for ln in res.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("error: the one query was refused: the API key has no quota left"), res.stderr
    assert "manifest" not in res.stderr
    assert "Traceback" not in res.stderr
