"""Campaign cell kinds: mixed files validate, mistakes are reported at their line, old results still read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.campaign.config import CampaignConfigError, parse_campaign
from evaluation.campaign.kinds import CELL_KINDS
from evaluation.results import SCHEMA_VERSION, CampaignCell, MembershipCell, read_results, write_results

MIXED = """[campaign]
name = "mixed"

[[victims]]
name = "denoise25"

[[victims]]
name = "mia-edges"

[[defenses]]
label = "none"

[[defenses]]
label = "gauss"
pipeline = [{ name = "noise", sigma = 0.02 }]

[attack]
budgets = [4]

[[cells]]
kind = "membership"
victim = "mia-edges"
defenses = ["none", "gauss"]
model_defenses = [{ label = "akd", method = "akd" }]
"""


def _error(text: str) -> str:
    with pytest.raises(CampaignConfigError) as err:
        parse_campaign(text, "c.toml")
    return str(err.value)


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if needle in line)


def test_a_file_mixing_kinds_validates_and_plans_cells_of_each_kind() -> None:
    cfg = parse_campaign(MIXED)
    entries = cfg.entries()
    assert [e.kind for e in entries] == ["extraction", "membership"]
    plans = {e.kind: CELL_KINDS[e.kind].plan(cfg, e) for e in entries}
    assert len(plans["extraction"]) == 2 * 2  # 2 victims x 2 defenses x 1 strategy x 1 budget
    assert [p.id for p in plans["membership"]] == [
        "mia.mia-edges.none.none", "mia.mia-edges.none.gauss", "mia.mia-edges.akd.none", "mia.mia-edges.akd.gauss"]


def test_unknown_kind_is_reported_at_its_line() -> None:
    text = MIXED.replace('kind = "membership"', 'kind = "watermrk"')
    msg = _error(text)
    assert msg.startswith(f"c.toml:{_line_of(text, 'watermrk')}:"), msg
    assert "unknown cell kind 'watermrk'" in msg
    assert "membership" in msg


def test_a_key_of_another_kind_is_reported_at_its_line_with_its_owner() -> None:
    text = MIXED.replace('defenses = ["none", "gauss"]', 'defenses = ["none", "gauss"]\nbudgets = [4, 8]')
    msg = _error(text)
    assert msg.startswith(f"c.toml:{_line_of(text, 'budgets = [4, 8]')}: cells.0.budgets:"), msg
    assert "belongs to extraction cells" in msg


def test_membership_cross_checks() -> None:
    assert "unknown defense labels ['jpeg']" in _error(MIXED.replace('defenses = ["none", "gauss"]',
                                                                     'defenses = ["none", "jpeg"]'))
    assert "not a membership recipe" in _error(MIXED.replace('victim = "mia-edges"', 'victim = "denoise25"'))
    assert "dpsgd needs noise_multiplier" in _error(MIXED.replace('method = "akd"', 'method = "dpsgd"'))
    dp_proxy = MIXED.replace('method = "akd" }', 'method = "dpsgd", noise_multiplier = 0.5, proxy_pairs = 8 }')
    assert "proxy_pairs is for akd/dmp students" in _error(dp_proxy)
    assert "proxy_pairs is for" not in _error(dp_proxy.replace("dpsgd", "akd").replace("victim = \"mia-edges\"",
                                                                                      "victim = \"denoise25\""))
    held = MIXED.replace('defenses = ["none", "gauss"]', 'defenses = ["none", "gauss"]\nheldout_pairs = 8\n'
                         'heldout_images = "corpus:victim"')
    msg = _error(held)
    assert msg.startswith(f"c.toml:{_line_of(held, 'heldout_images')}:"), msg
    assert "heldout_images 'corpus:victim' overlap the victim's private split" in msg
    msg = _error(MIXED.replace('method = "akd"', 'method = "magic"'))
    assert msg.startswith(f"c.toml:{_line_of(MIXED, 'model_defenses')}:"), msg


def test_two_extraction_entries_are_rejected() -> None:
    text = MIXED + '\n[[cells]]\nkind = "extraction"\nbudgets = [2]\n'
    assert "one extraction entry at most" in _error(text)


def test_version_1_results_are_upgraded_on_read(tmp_path: Path) -> None:
    """A results.json written before cell kinds (schema 1: cells without ``kind``) still loads."""
    old = {"schema_version": 1, "kind": "campaign", "name": "old",
           "cells": [{"id": "v.none.crops.b4", "victim": "v", "defense": "none", "budget": 4, "strategy": "crops",
                      "status": "done", "queries_used": 4}]}
    p = tmp_path / "results.json"
    p.write_text(json.dumps(old))
    r = read_results(p)
    assert r.schema_version == SCHEMA_VERSION == 2
    assert isinstance(r.cells[0], CampaignCell)
    assert r.cells[0].kind == "extraction"
    assert r.extraction_cells[0].queries_used == 4
    assert r.membership_cells == []
    r.cells.append(MembershipCell(id="m", victim="v", model="v", status="failed", error="x"))
    write_results(r, p)
    again = read_results(p)
    assert [c.kind for c in again.cells] == ["extraction", "membership"]
