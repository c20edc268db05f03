"""Campaign files: invalid ones are rejected before anything runs, with the line of the mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.campaign.config import CampaignConfigError, load_campaign, parse_campaign

GOOD = """[campaign]
name = "t"

[limits]
rate = 10.0
quota_total = 100

[[victims]]
name = "denoise25"

[[defenses]]
label = "none"

[[defenses]]
label = "jpeg"
pipeline = [{ name = "jpeg", quality = 75 }]

[attack]
budgets = [4, 16]
strategies = ["crops"]
"""


def _error(text: str) -> str:
    with pytest.raises(CampaignConfigError) as err:
        parse_campaign(text, "c.toml")
    return str(err.value)


def test_shipped_campaigns_validate() -> None:
    for path in sorted(Path("configs/campaigns").glob("*.toml")):
        cfg, text = load_campaign(path)
        assert cfg.campaign.name
        assert text.startswith("#")


def test_good_file_parses() -> None:
    cfg = parse_campaign(GOOD)
    assert cfg.attack.budgets == [4, 16]
    assert [d.label for d in cfg.defenses] == ["none", "jpeg"]


def test_unknown_key_is_reported_at_its_line() -> None:
    msg = _error(GOOD.replace('name = "denoise25"', 'name = "denoise25"\nsurogate = "x"'))
    assert msg.startswith("c.toml:10: victims.0.surogate: unknown key")


def test_bad_defense_parameter_is_reported_at_its_line() -> None:
    msg = _error(GOOD.replace("quality = 75", "quality = 500"))
    assert msg.startswith("c.toml:16: defenses.1.pipeline")
    assert "quality" in msg


def test_unknown_defense_and_strategy() -> None:
    assert "unknown defense 'blur'" in _error(GOOD.replace('name = "jpeg"', 'name = "blur"'))
    msg = _error(GOOD.replace('strategies = ["crops"]', 'strategies = ["bogus"]'))
    assert msg.startswith("c.toml:20: attack.strategies")
    assert "unknown strategy 'bogus'" in msg


def test_unknown_model_and_impossible_budget() -> None:
    msg = _error(GOOD.replace('name = "denoise25"', 'name = "nope"'))
    assert msg.startswith("c.toml:8: victims.0: victim 'nope': no zoo recipe 'nope'")  # the victim's table
    assert "exceeds the tier's quota_total" in _error(GOOD.replace("budgets = [4, 16]", "budgets = [4, 160]"))
    assert "strictly increasing" in _error(GOOD.replace("budgets = [4, 16]", "budgets = [16, 4]"))
    msg = _error(GOOD.replace('label = "none"', 'label = "clean"'))
    assert 'label = "none"' in msg


def test_toml_syntax_error_names_the_file() -> None:
    assert _error(GOOD + "\n[broken").startswith("c.toml: invalid TOML")


def test_cli_rejects_a_bad_file_before_running(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("budgets = [4, 16]", "budgets = [0, 16]"))
    res = subprocess.run([sys.executable, "-m", "heist.cli.main", "campaign", "run", str(bad), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert f"{bad}:19: attack.budgets" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_feature_network_is_reported_at_its_line() -> None:
    text = GOOD + '\n[evaluation]\nfeature_network = "vgg-random"\n'
    msg = _error(text)
    assert msg.startswith(f"c.toml:{len(text.splitlines())}: evaluation.feature_network"), msg
    assert "vgg16-random" in msg  # the known names are listed
    for ok in ("vgg16-random", "none", "inception-v3"):
        assert parse_campaign(text.replace("vgg-random", ok)).evaluation.feature_network == ok


def test_victim_settings_hold_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a relative --out (the default runs/NAME) the served model's path was read relative to the
    settings file's folder, doubled, and the membership campaign stopped: "no such file"."""
    from evaluation.campaign.victim import VictimKeys, victim_settings
    from victim_service.settings import Settings

    monkeypatch.chdir(tmp_path)
    model = Path("runs/c/models/m.safetensors")
    data = victim_settings(parse_campaign(GOOD), {"m": str(model), "z": "zoo:denoise25"}, VictimKeys(admin="a" * 20),
                           {}, Path("runs/c/victim/data"))
    written = tmp_path / "runs" / "c" / "victim" / "settings.json"
    written.parent.mkdir(parents=True)
    Settings.from_mapping(data).to_json_file(written)
    served = Settings.from_file(written)
    assert [m.source for m in served.models] == [str(tmp_path / model), "zoo:denoise25"]
    assert served.data_dir == tmp_path / "runs" / "c" / "victim" / "data"
