"""The ``watermark`` cell kind: a tiny campaign end to end through the real service, and its config checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.campaign.config import CampaignConfigError, parse_campaign
from evaluation.report.watermark import verdict
from evaluation.results import read_results

TINY = """[campaign]
name = "wm-tiny"
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
label = "both"
pipeline = [{ name = "ownership_watermark" }, { name = "trace_watermark" }]

[[cells]]
kind = "watermark"
budget = 6
strategy_params = { crop_size = 64 }
queries = 4
probe_side = 64

[evaluation]
max_side = 48
samples = 0
"""


def _error(text: str) -> str:
    with pytest.raises(CampaignConfigError) as err:
        parse_campaign(text, "c.toml")
    return str(err.value)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wmcampaign")
    config = root / "wm.toml"
    config.write_text(TINY)
    out = root / "out"
    res = subprocess.run([sys.executable, "-m", "heist.cli.main", "campaign", "run", str(config), "--out", str(out)],
                         capture_output=True, text=True, timeout=540, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.slow
def test_watermark_campaign_records_trace_rate_and_p_values_and_reports_them(finished: Path) -> None:
    results = read_results(finished / "results.json")
    cells = {c.defense: c for c in results.watermark_cells}
    assert set(cells) == {"none", "both"}
    assert {c.status for c in cells.values()} == {"done"}, [c.error for c in cells.values()]
    none, both = cells["none"], cells["both"]
    for c in (none, both):
        assert c.queries_used == 6
        assert c.fidelity is not None
        assert c.fidelity.metrics["psnr"].summary.mean > 10
        assert c.ownership is not None
        assert 0.0 <= c.ownership.p_value <= 1.0
        assert c.ownership.probes == 4
        assert c.trace is not None
        assert c.trace.images == 6
        assert c.calibration_p_value == none.ownership.p_value  # type: ignore[union-attr]
    # Every output the marked tier served names the harvesting key; the clean tier's name nobody.
    assert both.trace_marked
    assert both.ownership_marked
    assert not none.trace_marked
    assert both.trace.harvester == f"atk-{both.id}"  # type: ignore[union-attr]
    assert both.trace.rate == 1.0  # type: ignore[union-attr]
    assert none.trace.identified == 0
    assert none.trace.misattributed == 0
    # Honest-user cost of the stacked watermarks, measured through the honest tier.
    util = {u.defense: u for u in results.utility}
    assert util["none"].defended_vs_clean.metrics["psnr"].summary.mean == pytest.approx(80.0)
    assert 35.0 < util["both"].defended_vs_clean.metrics["psnr"].summary.mean < 60.0
    md = (finished / "report.md").read_text()
    html = (finished / "report.html").read_text()
    for c in (none, both):
        row = next(line for line in md.splitlines() if line.startswith(f"| denoise25 | {c.defense} | none |"))
        assert verdict(c.ownership.p_value) in row  # type: ignore[union-attr]
        assert c.training is not None
        assert c.training.steps >= 1
        assert f"{c.surrogate_kind}, {c.training.steps} steps" in row
        assert f"{c.trace.identified}/{c.trace.images}" in row  # type: ignore[union-attr]
    assert "theft provable" in md
    assert "theft provable" in html
    assert "surrogate kind x thief counter-measure" in md


def test_watermark_config_rejects_bad_values() -> None:
    bad_label = TINY.replace("budget = 6", 'budget = 6\ndefenses = ["none", "jpeg"]')
    assert "unknown defense labels ['jpeg']" in _error(bad_label)
    assert 'must include "none"' in _error(TINY.replace('budget = 6', 'budget = 6\ndefenses = ["both"]'))
    assert "unknown victims" in _error(TINY.replace('budget = 6', 'budget = 6\nvictims = ["sr9x"]'))
    assert "bad counter-measure 'blur'" in _error(TINY.replace('budget = 6', 'budget = 6\ncounters = ["blur"]'))
    msg = _error(TINY.replace('budget = 6', 'budget = 6\ncounters = ["jpeg:quality=75", "jpeg:quality=75"]'))
    assert "counters must not repeat" in msg
    assert "nothing to score" in _error(TINY.replace('pipeline = [{ name = "ownership_watermark" }, '
                                                     '{ name = "trace_watermark" }]',
                                                     'pipeline = [{ name = "jpeg", quality = 75 }]'))
    assert "unknown defense" in _error(TINY.replace('name = "trace_watermark"', 'name = "trace_watermrk"'))
    assert "exceeds the tier's quota_total" in _error(TINY.replace("burst = 20", "burst = 20\nquota_total = 4"))
    assert "give secret_file" in _error(TINY.replace("[limits]", '[victim_service]\nurl = "http://127.0.0.1:9"\n\n'
                                                                   "[limits]").replace(
        'label = "none"', 'label = "none"\napi_key = "k1"').replace('label = "both"', 'label = "both"\napi_key = "k2"'))
    text = TINY.replace("probe_side = 64", "probe_side = 8")
    line = next(i for i, t in enumerate(text.splitlines(), start=1) if t.startswith("probe_side = 8"))
    msg = _error(text)
    assert msg.startswith(f"c.toml:{line}: cells.0.probe_side:"), msg
    two_keys = TINY.replace('label = "both"', 'label = "own2"\npipeline = [{ name = "ownership_watermark", '
                            'key_id = "k2" }]\n\n[[defenses]]\nlabel = "both"')
    assert "several ownership keys" in _error(two_keys)
    assert "unknown surrogate" in _error(TINY.replace("budget = 6", 'budget = 6\nsurrogates = ["unet-l3"]'))
    cfg = parse_campaign(TINY.replace("budget = 6", 'budget = 6\ncounters = ["none", "jpeg:quality=75"]'))
    from evaluation.campaign.kinds import CELL_KINDS

    ids = [p.id for p in CELL_KINDS["watermark"].plan(cfg, cfg.entries()[0])]
    assert ids == ["wm.denoise25.none.none", "wm.denoise25.none.jpeg-quality75", "wm.denoise25.both.none",
                   "wm.denoise25.both.jpeg-quality75"]
    cfg = parse_campaign(TINY.replace("budget = 6", 'budget = 6\nsurrogates = ["unet-l2", "pix2pix"]'))
    ids = [p.id for p in CELL_KINDS["watermark"].plan(cfg, cfg.entries()[0])]
    assert ids == ["wm.denoise25.none.none.unet-l2", "wm.denoise25.both.none.unet-l2",
                   "wm.denoise25.none.none.pix2pix", "wm.denoise25.both.none.pix2pix"]
