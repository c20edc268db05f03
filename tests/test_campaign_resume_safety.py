"""A resumed campaign never reuses work done with other settings, validates what would fail later, stops its
victim on SIGTERM, and adds up the times of every run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from evaluation.campaign.config import CampaignConfigError, parse_campaign
from evaluation.campaign.fingerprint import (
    changed_keys,
    fingerprint,
    judge,
    reusable_artefact,
    stamp_beside,
    write_stamp,
)
from evaluation.campaign.kinds import CELL_KINDS
from evaluation.campaign.ledger import Ledger, campaign_times
from evaluation.results import read_results

SMALL = """[campaign]
name = "resume"
zoo_profile = "tiny"

[limits]
rate = 100.0
burst = 20

[[victims]]
name = "denoise25"
surrogate = "unet-l2"
surrogate_profile = "tiny"
train_steps = 10

[[defenses]]
label = "none"

[[defenses]]
label = "jpeg"
pipeline = [{ name = "jpeg", quality = 50 }]

[attack]
budgets = [2]
strategies = ["crops"]
strategy_params = { crop_size = 64 }

[evaluation]
max_side = 48
samples = 0
"""

MEMBERSHIP = """[campaign]
name = "mia"

[[victims]]
name = "mia-edges"

[[defenses]]
label = "none"

[[cells]]
kind = "membership"
victim = "mia-edges"
reference_steps = 5
model_defenses = [{ label = "dp", method = "dpsgd", noise_multiplier = 0.5, steps = 3 }]
"""

WATERMARK = """[campaign]
name = "wm"

[[victims]]
name = "denoise25"

[[defenses]]
label = "none"

[[defenses]]
label = "both"
pipeline = [{ name = "ownership_watermark" }, { name = "trace_watermark" }]

[[cells]]
kind = "watermark"
budget = 6
secret_file = "secret.txt"
"""


def _error(text: str) -> str:
    with pytest.raises(CampaignConfigError) as err:
        parse_campaign(text, "c.toml")
    return str(err.value)


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if needle in line)


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "heist.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "250"})


def _settings(text: str, kind: str = "extraction") -> dict[str, dict[str, Any]]:
    cfg = parse_campaign(text)
    entry = next(e for e in cfg.entries() if e.kind == kind)
    k = CELL_KINDS[kind]
    return {p.id: k.settings(cfg, entry, p) for p in k.plan(cfg, entry)}


# --- fingerprints ---------------------------------------------------------------------------------------


def test_cell_fingerprints_follow_the_settings_that_decide_the_cell() -> None:
    base = _settings(SMALL)
    assert _settings(SMALL) == base  # deterministic: an unchanged file skips every cell
    q95 = _settings(SMALL.replace("quality = 50", "quality = 95"))
    assert fingerprint(q95["denoise25.jpeg.crops.b2"]) != fingerprint(base["denoise25.jpeg.crops.b2"])
    assert q95["denoise25.none.crops.b2"] == base["denoise25.none.crops.b2"]  # the other defense's cell is not stale
    assert changed_keys(base["denoise25.jpeg.crops.b2"], q95["denoise25.jpeg.crops.b2"]) == ["defense.pipeline"]
    for old, new in [("train_steps = 10", "train_steps = 11"), ("max_side = 48", "max_side = 64"),
                     ("crop_size = 64", "crop_size = 32"), ('name = "resume"', 'name = "resume"\nseed = 3'),
                     ("rate = 100.0", "rate = 50.0")]:
        changed = _settings(SMALL.replace(old, new))
        assert all(fingerprint(changed[c]) != fingerprint(s) for c, s in base.items()), new
    # a new budget adds cells and leaves the saved ones alone; the service's speed settings are not results
    more = _settings(SMALL.replace("budgets = [2]", "budgets = [2, 4]").replace(
        "[limits]", "[victim_service]\nworkers = 2\n\n[limits]"))
    assert {c: more[c] for c in base} == base


def test_a_model_file_replaced_at_the_same_path_makes_its_cells_stale(tmp_path: Path) -> None:
    """A victim served from a model file: the file's content, not only its path, decides the cells."""
    model = tmp_path / "victim.safetensors"
    model.write_bytes(b"first model")
    text = SMALL.replace('name = "denoise25"', f'name = "denoise25"\nsource = "{model}"')
    before = _settings(text)
    assert _settings(text) == before
    model.write_bytes(b"second model, same path")
    after = _settings(text)
    assert all(fingerprint(after[c]) != fingerprint(s) for c, s in before.items())
    assert changed_keys(before["denoise25.none.crops.b2"], after["denoise25.none.crops.b2"]) == [
        "victim.source_content"]
    # zoo victims carry no file digest, so their saved cells keep their fingerprints
    assert "source_content" not in json.dumps(_settings(SMALL))


def test_membership_fingerprints_follow_model_defense_settings() -> None:
    base = _settings(MEMBERSHIP, "membership")
    louder = _settings(MEMBERSHIP.replace("noise_multiplier = 0.5", "noise_multiplier = 5.0"), "membership")
    assert louder["mia.mia-edges.dp.none"] != base["mia.mia-edges.dp.none"]
    assert louder["mia.mia-edges.none.none"] == base["mia.mia-edges.none.none"]
    ref = _settings(MEMBERSHIP.replace("reference_steps = 5", "reference_steps = 6"), "membership")
    assert all(ref[c] != s for c, s in base.items())  # every cell is scored with the reference model


def test_judge_same_changed_and_unstamped(tmp_path: Path) -> None:
    stamp = tmp_path / "fingerprint.json"
    settings = {"defense": {"pipeline": [{"name": "jpeg", "quality": 50}]}, "seed": 0}
    assert judge(stamp, settings, lambda: None).state == "unknown"  # no stamp, nothing to tell: stale
    assert judge(stamp, settings, lambda: dict(settings)).state == "adopted"
    assert judge(stamp, settings, lambda: {**settings, "seed": 1}).keys == ("seed",)
    write_stamp(stamp, settings)
    assert judge(stamp, settings, lambda: None).reusable
    other = {**settings, "defense": {"pipeline": [{"name": "jpeg", "quality": 95}]}}
    verdict = judge(stamp, other, lambda: None)
    assert verdict.state == "changed"
    assert "defense.pipeline" in verdict.why()


def test_model_defense_checkpoints_are_rebuilt_when_their_settings_change(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``noise_multiplier`` 0.5 -> 5.0 used to keep serving the 0.5 checkpoint (cached by "file exists")."""
    import defenses.model_level as model_level

    built: list[float | None] = []

    def fake_build(method: str, victim: str, out: Path, **kw: Any) -> Path:  # caches by existence, as the real one
        if out.exists() and out.with_suffix(".json").exists():
            return out
        built.append(kw["noise_multiplier"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"sigma={kw['noise_multiplier']}")
        out.with_suffix(".json").write_text("{}")
        return out

    monkeypatch.setattr(model_level, "build_model_defense", fake_build)
    kind = CELL_KINDS["membership"]

    def serve(text: str) -> dict[str, str]:
        cfg = parse_campaign(text)
        return kind.models(cfg, cfg.cells[0], tmp_path, {"mia-edges": "zoo:mia-edges"})

    served = serve(MEMBERSHIP)
    assert built == [0.5]
    assert serve(MEMBERSHIP) == served
    assert built == [0.5]  # unchanged: reused
    serve(MEMBERSHIP.replace("noise_multiplier = 0.5", "noise_multiplier = 5.0"))
    assert built == [0.5, 5.0]
    assert Path(served["mia-edges-dp"]).read_text() == "sigma=5.0"


def test_cached_files_without_or_with_other_stamps_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "models" / "m.safetensors"
    card = path.with_suffix(".json")
    path.parent.mkdir()
    path.write_text("old")
    card.write_text("{}")
    assert not reusable_artefact(path, {"steps": 3}, lambda: None, "model")  # no stamp, cannot tell
    assert not path.exists()
    assert stamp_beside(path).exists()
    path.write_text("new")
    card.write_text("{}")
    assert reusable_artefact(path, {"steps": 3}, lambda: None, "model")
    assert not reusable_artefact(path, {"steps": 4}, lambda: None, "model", also=(card,))
    assert not path.exists()
    assert not card.exists()


# --- validation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("old", "new", "needle", "message"), [
    ("crop_size = 64", "cropsize = 64", "strategy_params", "cropsize"),
    ("crop_size = 64", "crop_size = -5", "strategy_params", "crop_size: must be >= 1"),
    ("train_steps = 10", "train_steps = 10\nsurrogate_kwargs = { levelz = 0 }", "surrogate_kwargs", "levelz"),
    ('surrogate_profile = "tiny"', 'surrogate_profile = "tyni"', "surrogate_profile", "unknown profile 'tyni'"),
    ('strategies = ["crops"]', 'strategies = ["crops"]\nimages = "/nonexistent"', "images =",
     "/nonexistent: not a folder"),
    ("max_side = 48", 'max_side = 48\nimage_sets = { benchmark = "/nonexistent/dir" }', "image_sets",
     "benchmark: /nonexistent/dir: not a folder"),
    ('zoo_profile = "tiny"', 'zoo_profile = "tiny"\ndevice = "tpu"', "device", "device 'tpu'"),
    ("[limits]", '[victim_service]\nredis_url = "http://nope"\n\n[limits]', "redis_url", "must start with redis://"),
    ("max_side = 48", "max_side = 48\ntarget_psnr = -5", "target_psnr", "greater than 0"),
    ("max_side = 48", "max_side = 48\ntarget_psnr = inf", "target_psnr", "finite"),
])
def test_mistakes_that_failed_later_are_refused_at_their_line(old: str, new: str, needle: str, message: str) -> None:
    text = SMALL.replace(old, new)
    msg = _error(text)
    assert msg.startswith(f"c.toml:{_line_of(text, needle)}:"), msg
    assert message in msg, msg


def test_valid_values_still_pass() -> None:
    parse_campaign(SMALL.replace('zoo_profile = "tiny"', 'zoo_profile = "tiny"\ndevice = "cuda"'))  # a GPU machine's
    parse_campaign(SMALL.replace("[limits]", '[victim_service]\nredis_url = "redis://127.0.0.1:6379/0"\n\n[limits]'))
    parse_campaign(SMALL.replace("train_steps = 10", "train_steps = 10\nsurrogate_kwargs = { depth = 3 }"))
    parse_campaign(SMALL.replace('surrogate = "unet-l2"', 'surrogate = "auto"').replace(
        "train_steps = 10", "train_steps = 10\nsurrogate_kwargs = { levels = 0 }"))  # fits auto's resunet


@pytest.mark.parametrize("count", [1, 2])
def test_a_misspelt_array_of_tables_is_reported_at_its_line(count: int) -> None:
    text = SMALL.replace("[[defenses]]", "[[defense]]", count)
    msg = _error(text)
    assert msg == f"c.toml:{_line_of(text, '[[defense]]')}: defense: unknown key (did you mean 'defenses'?)"


def test_secret_file_without_a_victim_url_is_refused_at_its_line() -> None:
    """The self-started victim's secret is its own: scoring with the file's silently found no watermark."""
    msg = _error(WATERMARK)
    assert msg.startswith(f"c.toml:{_line_of(WATERMARK, 'secret_file')}: cells.0.secret_file:"), msg
    assert "only for a victim at [victim_service].url" in msg
    remote = WATERMARK.replace('label = "none"', 'label = "none"\napi_key = "k1"').replace(
        'label = "both"', 'label = "both"\napi_key = "k2"')
    assert parse_campaign(remote, victim_url="http://127.0.0.1:9").cells[0].secret_file == Path("secret.txt")


def test_a_victim_url_without_api_keys_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text(SMALL)
    with pytest.raises(CampaignConfigError) as err:
        parse_campaign(SMALL, "c.toml", victim_url="http://127.0.0.1:9")
    msg = str(err.value)
    assert msg.startswith(f"c.toml:{_line_of(SMALL, '[[defenses]]')}: defenses.0:"), msg
    assert "missing: none, jpeg" in msg
    res = _cli("campaign", "run", str(config), "--victim-url", "http://127.0.0.1:9", "--out", str(tmp_path / "o"),
               timeout=120)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "every defense needs the api_key" in res.stderr
    assert not (tmp_path / "o").exists()


def test_a_folder_of_another_campaign_or_a_file_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(SMALL)
    theirs, old, afile = tmp_path / "theirs", tmp_path / "old", tmp_path / "afile"
    cell = theirs / "cells" / "x" / "cell.json"
    cell.parent.mkdir(parents=True)
    cell.write_text("{}")
    (theirs / "invocations.json").write_text(json.dumps({"created_at": "2026-01-01T10:00:00+00:00",
                                                         "campaign": "other", "invocations": []}))
    old.mkdir()  # written by a Heist whose ledger had no name: results.json names the campaign
    (old / "results.json").write_text(json.dumps({"kind": "campaign", "name": "older"}))
    afile.write_text("not a folder")
    for out, needle in ((theirs, "holds campaign 'other', not 'resume'"), (old, "holds campaign 'older'"),
                        (afile, "is a file, not a folder")):
        res = _cli("campaign", "run", str(config), "--out", str(out), timeout=120)
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr
        errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, res.stderr
        assert needle in errors[0]
    assert cell.read_text() == "{}"
    assert json.loads((theirs / "invocations.json").read_text())["invocations"] == []
    assert afile.read_text() == "not a folder"
    assert sorted(p.name for p in old.iterdir()) == ["results.json"]


# --- times ---------------------------------------------------------------------------------------------


def test_campaign_times_add_every_invocation_and_every_cell(tmp_path: Path) -> None:
    from evaluation.results import CampaignCell

    (tmp_path / "results.json").write_text(json.dumps({  # written by a Heist without the ledger
        "created_at": "2026-01-01T10:00:00+00:00", "wall_times": {"zoo": 12.0, "harvest": 5.0, "total": 30.0}}))
    ledger = Ledger.open(tmp_path, "first", "c")
    assert ledger.created_at == "2026-01-01T10:00:00+00:00"
    ledger.record({"zoo": 0.5, "total": 4.0})
    ledger = Ledger.open(tmp_path, "again", "c")
    ledger.record({"service": 2.0, "total": 6.0})
    cells = [CampaignCell(id=f"c{i}", victim="v", defense="none", budget=2, strategy="crops", seed=0, status="done",
                          wall_times={"harvest": 1.0 + i, "training": 2.0, "total": 9.0}) for i in range(2)]
    times = campaign_times(ledger, cells)
    assert times == {"zoo": 12.5, "total": 40.0, "service": 2.0, "harvest": 3.0, "training": 4.0}
    assert len(json.loads((tmp_path / "invocations.json").read_text())["invocations"]) == 3


# --- whole campaigns -------------------------------------------------------------------------------------


def _mtimes(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*/cell.json")}


def _psnr(out: Path) -> tuple[dict[str, float], dict[str, float]]:
    res = read_results(out / "results.json")
    cells = {c.id: c.fidelity.mean("psnr") for c in res.extraction_cells}  # type: ignore[union-attr]
    util = {u.defense: u.defended_vs_clean.metrics["psnr"].summary.mean for u in res.utility}
    return cells, util  # type: ignore[return-value]


@pytest.mark.slow
def test_a_changed_file_reruns_exactly_the_stale_cells_and_times_add_up(tmp_path: Path) -> None:
    config, out = tmp_path / "c.toml", tmp_path / "out"
    config.write_text(SMALL)
    run = ("campaign", "run", str(config), "--out", str(out))
    assert _cli(*run).returncode == 0
    first = read_results(out / "results.json")
    first_cells, first_util = _psnr(out)
    saved = _mtimes(out)

    again = _cli(*run)  # unchanged: every cell skipped
    assert again.returncode == 0, again.stderr[-3000:]
    assert _mtimes(out) == saved
    assert "runs again" not in again.stderr
    assert _psnr(out) == (first_cells, first_util)

    config.write_text(SMALL.replace("quality = 50", "quality = 95"))
    changed = _cli(*run)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "cell denoise25.jpeg.crops.b2 runs again: its settings changed since it was saved (defense.pipeline)" \
        in changed.stderr
    now = _mtimes(out)
    assert now["denoise25.none.crops.b2"] == saved["denoise25.none.crops.b2"]
    assert now["denoise25.jpeg.crops.b2"] != saved["denoise25.jpeg.crops.b2"]
    cells, util = _psnr(out)
    assert util["jpeg"] > first_util["jpeg"] + 1.0  # quality 95 costs honest users less than 50
    assert cells["denoise25.none.crops.b2"] == first_cells["denoise25.none.crops.b2"]

    # every run's times are in the campaign's: the first start, every invocation, every cell's own phases
    res = read_results(out / "results.json")
    assert res.created_at == first.created_at
    ledger = json.loads((out / "invocations.json").read_text())
    assert len(ledger["invocations"]) == 3
    assert res.wall_times["zoo"] == pytest.approx(sum(i["wall_times"].get("zoo", 0) for i in ledger["invocations"]),
                                                  abs=0.02)
    assert res.wall_times["zoo"] >= first.wall_times["zoo"]
    assert res.wall_times["total"] > first.wall_times["total"]
    for phase in ("harvest", "training"):
        assert res.wall_times[phase] == pytest.approx(sum(c.wall_times[phase] for c in res.cells), abs=0.02)

    # cells saved by a Heist that wrote no fingerprint: kept when results.json shows the run that made them used
    # the same settings, run again when it cannot tell (that run only skipped them)
    for stamp in (out / "cells").glob("*/fingerprint.json"):
        stamp.unlink()
    old = time.time() - 10 * 86400
    os.utime(out / "cells" / "denoise25.none.crops.b2" / "attempts", (old, old))
    legacy = _cli(*run)
    assert legacy.returncode == 0, legacy.stderr[-3000:]
    assert "cell denoise25.none.crops.b2 runs again: it was saved by an older Heist" in legacy.stderr
    assert "denoise25.jpeg.crops.b2 runs again" not in legacy.stderr
    assert _mtimes(out)["denoise25.jpeg.crops.b2"] == now["denoise25.jpeg.crops.b2"]


_SLOW_LIMITS = SMALL.replace("rate = 100.0\nburst = 20", "rate = 1.0\nburst = 1").replace(
    "budgets = [2]", "budgets = [20]")


@pytest.mark.slow
def test_sigterm_stops_the_campaigns_victim_server(tmp_path: Path) -> None:
    config, out = tmp_path / "c.toml", tmp_path / "out"
    config.write_text(_SLOW_LIMITS)
    proc = subprocess.Popen([sys.executable, "-m", "heist.cli.main", "campaign", "run", str(config), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    pid_file = out / "victim" / "server.pid"
    server = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not pid_file.exists():
            assert proc.poll() is None, "the campaign ended before its victim started"
            time.sleep(0.1)
        server = int(pid_file.read_text())
        assert Path(f"/proc/{server}").exists()
        proc.send_signal(signal.SIGTERM)  # what `timeout`, `docker stop` and a CI cancel send
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 143, stderr[-3000:]
        assert "terminated" in stderr
        gone = time.monotonic() + 5
        while time.monotonic() < gone and Path(f"/proc/{server}").exists():
            time.sleep(0.1)
        assert not Path(f"/proc/{server}").exists(), "the victim server outlived the campaign"
        assert not pid_file.exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if server is not None and Path(f"/proc/{server}").exists():
            os.killpg(server, signal.SIGKILL)
