"""The ``monitor`` campaign kind: a tiny campaign end to end through the real service and Redis (benign
customers, attackers, escalation on and off, cost to target PSNR, report), and its config validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.campaign.config import CampaignConfigError, load_campaign, parse_campaign
from evaluation.campaign.runner import run_campaign
from evaluation.results import MonitorCell, read_results
from tests.servers import tiny_models

BASE = """[campaign]
name = "montest"
seed = 0

[limits]
rate = 50.0
burst = 10
{limits}

[[victims]]
name = "dn"
source = "{source}"
recipe = "denoise25"
surrogate = "unet-l2"
surrogate_profile = "tiny"
train_steps = 8

[[defenses]]
label = "none"

[[defenses]]
label = "escalate"
levels = [[{{ name = "noise", sigma = 0.3 }}]]

[[cells]]
kind = "monitor"
victim = "dn"
defenses = ["none", "escalate"]
benign_clients = 3
photos_per_client = 2
time_scale = 0.01
timeline_queries = 45
cost_budgets = [6]
attackers = [
    {{ name = "crops", strategy = "crops", queries = 60 }},
    {{ name = "random", strategy = "random", queries = 8 }},
]
{extra}

[evaluation]
max_side = 32
samples = 0
target_psnr = 8.0
"""


def _toml(source: str = "x.safetensors", extra: str = "", limits: str = "") -> str:
    return BASE.format(source=source, extra=extra, limits=limits)


@pytest.mark.slow
def test_monitor_campaign_end_to_end(tmp_path: Path, redis_url: str) -> None:
    model = tiny_models(tmp_path / "models", ("denoise",))["denoise"]
    cfg = tmp_path / "monitor.toml"
    cfg.write_text(_toml(str(model), extra="settle_s = 20.0") + f'\n[victim_service]\nredis_url = "{redis_url}"\n')
    path = run_campaign(cfg, out_dir=tmp_path / "out")
    res = read_results(path)
    cells = {c.defense: c for c in res.cells}
    assert set(cells) == {"none", "escalate"}
    for c in cells.values():
        assert isinstance(c, MonitorCell)
        assert c.status == "done", c.error
    off, on = cells["none"], cells["escalate"]
    assert not off.escalation
    assert on.escalation
    for c in (off, on):
        assert c.caught_up
        crops = next(a for a in c.attackers if a["strategy"] == "crops")
        assert crops["queries_to_detection"] is not None
        assert 8 <= crops["queries_to_detection"] <= 60  # crops spread over the photos: ~33 (area-weighted: ~16)
        assert c.benign["clients"] == 3
        assert 0.0 <= c.benign["fpr"] <= 1.0
        assert c.benign["fpr"] == pytest.approx(c.benign["flagged"] / 3, abs=1e-3)
        assert c.roc is not None
        assert c.roc.fpr[0] == 0.0
        assert c.roc.tpr[-1] == 1.0
        assert c.roc_auc is not None
        assert 0.0 <= c.roc_auc <= 1.0
        assert [p.query for p in c.timeline] == list(range(1, 46))
        first = next(p.query for p in c.timeline if p.flagged)  # the timeline's crops attacker gets flagged
        assert all(p.level >= 1 for p in c.timeline if p.query >= first + 2)
        assert [p.budget for p in c.cost] == [6]
        assert all(p.psnr is not None and p.psnr > 0 for p in c.cost)
        assert all(p.training is not None and p.training.steps > 0 for p in c.cost)
        assert c.queries_used is not None
        assert c.queries_used >= 60 + 8 + 45 + 6
    # the target (8 dB) is reached without escalation; the ratio compares the two tiers' queries to target
    assert off.queries_to_target is not None
    assert on.escalation_ratio is not None
    assert on.escalation_ratio > 0
    if on.queries_to_target is not None:
        assert on.escalation_ratio == pytest.approx(on.queries_to_target / off.queries_to_target, rel=0.01)
    else:
        assert on.ratio_lower_bound
    md = (path.parent / "report.md").read_text()
    for heading in ("Query monitor", "queries to detection", "Escalation cost ratio", "Benign clients escalated",
                    "Surrogate training", f"{off.cost[0].training.steps} steps"):
        assert heading in md
    assert (path.parent / "figures" / "monitor_roc.png").stat().st_size > 1000


def test_default_config_and_full_profile_validate() -> None:
    cfg, _ = load_campaign("configs/campaigns/monitor.toml")
    entry = cfg.cells[0]
    assert entry.kind == "monitor"
    assert len(entry.attackers) >= 10
    assert any(d.levels for d in cfg.defenses)
    assert any(not d.levels for d in cfg.defenses)
    full, _ = load_campaign("configs/campaigns/monitor.toml", profile="full")
    assert full.campaign.zoo_profile == "default"
    assert full.cells[0].cost_budgets[-1] > entry.cost_budgets[-1]


@pytest.mark.parametrize(("extra", "limits", "message"), [
    ('cost_strategy = "nope"', "", "unknown strategy 'nope'"),
    ("cost_budgets = [12, 4]", "", "strictly increasing"),
    ('defenses = ["none", "ghost"]', "", "unknown defense labels"),
    ("", "quota_total = 20", "exceed the tier's quota_total"),
    ("reference_steps = 3", "", "belongs to membership cells"),
])
def test_bad_monitor_entries_are_reported_at_their_line(extra: str, limits: str, message: str) -> None:
    text = _toml(extra=extra, limits=limits)
    key = extra.split(" = ")[0]
    if key:  # the entry's own value of the key goes, the one under test stays
        lines = text.splitlines()
        first = next(i for i, line in enumerate(lines) if line.startswith(f"{key} = "))
        if lines[first] != extra:
            text = "\n".join(lines[:first] + lines[first + 1:])
    with pytest.raises(CampaignConfigError, match=r"campaign>:\d+:") as err:
        parse_campaign(text)
    assert message in str(err.value)


def test_bad_levels_and_remote_victim_are_refused() -> None:
    bad = _toml().replace('levels = [[{ name = "noise", sigma = 0.3 }]]', 'levels = [[{ name = "blur" }]]')
    with pytest.raises(CampaignConfigError, match="escalation level 1"):
        parse_campaign(bad)
    remote = _toml() + '\n[victim_service]\nurl = "http://127.0.0.1:1"\n'
    remote = remote.replace('label = "none"\n', 'label = "none"\napi_key = "k" \n').replace(
        'label = "escalate"\n', 'label = "escalate"\napi_key = "k"\n')
    with pytest.raises(CampaignConfigError, match="self-started victim"):
        parse_campaign(remote)


def test_torn_monitor_cell_files_are_redone_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A kill that tears ``monitor.json`` or a budget's record makes that budget run again on the resume,
    instead of failing the cell on every resume with a JSON error."""
    from evaluation.campaign.kinds.monitor import _saved
    from evaluation.results import CampaignCell

    torn = tmp_path / "monitor.json"
    torn.write_text('{"flagged_at_query": 1')
    assert _saved(torn, json.loads) is None
    assert "unreadable" in caplog.text
    assert _saved(tmp_path / "missing.json", json.loads) is None
    record = tmp_path / "cell.json"
    record.write_text('{"id": "x", "status": "do')
    assert _saved(record, CampaignCell.model_validate_json) is None
    torn.write_text('{"flagged_at_query": 7, "level": 2}')
    assert _saved(torn, json.loads) == {"flagged_at_query": 7, "level": 2}
