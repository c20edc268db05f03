"""Membership inference end to end: a tiny memorising victim behind the real service, the attack through
HTTP (CLI and campaign cell), bad input refused before any query, AKD lowering the AUC, a DP-SGD step."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from attacker.errors import ConfigError
from attacker.mia import load_candidates, reconstruction_scores, run_mia
from defenses.model_level import build_model_defense
from defenses.model_level.common import ModelDefenseError, proxy_inputs
from evaluation.campaign.kinds.base import CellPaths
from evaluation.campaign.kinds.membership import MembershipSpec, run_membership_cell
from evaluation.privacy import roc_auc
from tests.mia_victims import tiny_membership_victim
from tests.servers import VictimServer, start_victim, tiny_models
from translators.checkpoint import load_model, read_card

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def victim_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_membership_victim(tmp_path_factory.mktemp("mia-victim"))


@pytest.fixture(scope="module")
def split(victim_path: Path) -> dict[str, dict[str, object]]:
    return dict(read_card(victim_path).model_extra["membership"])  # type: ignore[index]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, victim_path: Path, redis_url: str) -> Iterator[VictimServer]:
    tmp = tmp_path_factory.mktemp("mia-srv")
    sr = tiny_models(tmp / "models", names=("sr4x",))["sr4x"]
    srv = start_victim(
        tmp, models=[{"name": "mia", "source": str(victim_path)}, {"name": "sr4x", "source": str(sr)}],
        tiers={"open": {"rate": None}, "limited": {"rate": 20.0, "burst": 4},
               "counted": {"rate": None, "quota_total": 100}},
        keys={"attacker": "limited", "open": "open", "counted": "counted"},
        redis_url=redis_url, key_prefix=f"heist-test:{uuid.uuid4().hex[:12]}:", ready_timeout=300)
    yield srv
    srv.stop()


def _local_auc(path: Path, split: dict[str, dict[str, object]]) -> float:
    model = load_model(path).module
    m = load_candidates(str(split["members"]["dir"]), "members")
    n = load_candidates(str(split["non_members"]["dir"]), "non-members")
    with torch.no_grad():
        s = [reconstruction_scores(model(c.x).clamp(0, 1), c.y)["l2"] for c in m + n]
    return roc_auc(s, [1] * len(m) + [0] * len(n))


def test_mia_cli_through_the_rate_limited_api_separates_members(
    served: VictimServer, split: dict, tmp_path: Path
) -> None:
    out = tmp_path / "mia"
    cp = subprocess.run(
        [sys.executable, "-m", "heist.cli.main", "attack", "mia", "--url", served.url, "--api-key",
         served.keys["attacker"], "--model", "mia", "--members", str(split["members"]["dir"]), "--non-members",
         str(split["non_members"]["dir"]), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stderr[-2000:]
    import json

    scores = json.loads((out / "scores.json").read_text())
    assert scores["queries"] >= 16
    assert sorted(scores["labels"]) == [0] * 8 + [1] * 8
    summary = json.loads((out / "mia.json").read_text())
    assert summary["l2"]["auc"] >= 0.8, summary["l2"]
    assert (out / "roc.png").stat().st_size > 1000


def test_membership_cell_through_the_real_service(served: VictimServer, split: dict, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The cell as the campaign runs it: no feature network configured and no InceptionV3 weights on the
    machine, so NKID is computed on the offline network, named in results and in the report's table."""
    monkeypatch.delenv("HEIST_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache: no weights anywhere
    spec = MembershipSpec(id="mia.t", url=served.url, api_key=served.keys["open"], victim="mia", model="mia",
                          model_defense="none", defense="none", members_dir=str(split["members"]["dir"]),
                          non_members_dir=str(split["non_members"]["dir"]), reference=None, concurrency=2, seed=0,
                          heldout_pairs=6)
    cell = run_membership_cell(spec, CellPaths(tmp_path / "cell"))
    assert cell.status == "done"
    assert cell.queries_used == 16 + 6  # the held-out utility pairs go through the API too
    assert set(cell.scores) == {"l1", "l2"}
    assert cell.headline_scores().score == "l2"
    assert cell.scores["l2"].auc >= 0.8
    assert cell.utility is not None
    assert cell.utility.gap_psnr_db > 0  # members are reproduced better
    assert (tmp_path / "cell" / "run" / "scores.json").exists()
    u = cell.utility
    assert u.nkid_members is not None
    assert u.nkid_non_members is not None
    assert u.nkid_non_members.feature_network.name == "vgg16-random"
    assert u.nkid_non_members.kid_black.mean > 0
    assert u.generalisation_gap_nkid == pytest.approx(u.nkid_members.nkid_percent - u.nkid_non_members.nkid_percent)
    assert any("not comparable in absolute value" in n for n in u.notes)
    assert u.heldout_pairs == 6
    assert u.nkid_heldout is not None
    assert u.nkid_heldout.kid.n_a == 6
    assert u.psnr_heldout is not None
    assert 0 < u.psnr_heldout < u.psnr_members
    from evaluation.report import render_report
    from evaluation.results import Results

    md = render_report(Results(kind="campaign", name="mia", cells=[cell]), tmp_path / "report").markdown.read_text()
    row = next(line for line in md.splitlines() if line.startswith("| none | none | done"))
    assert f"{u.nkid_non_members.nkid_percent:.2f} (vgg16-random)" in row
    assert f"{u.nkid_heldout.nkid_percent:.2f} (vgg16-random) | {u.psnr_heldout:.2f}" in row
    assert "NKID 6 held-out (%)" in md
    assert "random init seed 0" in md


def _quota_left_after_one_query(srv: VictimServer, x: torch.Tensor) -> int:
    import httpx

    from translators.codecs import encode_image

    r = httpx.post(f"{srv.url}/v1/models/mia/translate", content=encode_image(x),
                   headers={**srv.headers("counted"), "Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    return int(r.headers["x-quota-remaining"])


def test_bad_candidates_fail_in_one_line_before_any_query(
    served: VictimServer, split: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    members = Path(str(split["members"]["dir"]))
    unpaired = tmp_path / "unpaired"
    shutil.copytree(members, unpaired)
    next((unpaired / "targets").glob("*.png")).unlink()
    with pytest.raises(ConfigError, match="do not pair up"):
        load_candidates(unpaired, "members")
    empty = tmp_path / "empty"
    (empty / "inputs").mkdir(parents=True)
    (empty / "targets").mkdir()
    with pytest.raises(ConfigError, match="no pairs"):
        load_candidates(empty, "members")
    with pytest.raises(ConfigError, match="needs subfolders"):
        load_candidates(tmp_path, "members")
    m = load_candidates(members, "members")
    n = load_candidates(str(split["non_members"]["dir"]), "non-members")
    with pytest.raises(ConfigError, match="not a same-size translator"):
        run_mia(served.url, served.keys["counted"], "sr4x", m, n)
    with pytest.raises(ConfigError, match="at least one member"):
        run_mia(served.url, served.keys["counted"], "mia", m, [])
    assert _quota_left_after_one_query(served, m[0].x) == 99  # the refused attacks sent nothing
    from heist.cli.main import main

    monkeypatch.setattr(sys, "argv", [
        "heist", "attack", "mia", "--url", served.url, "--api-key", "k", "--model", "mia", "--members", str(unpaired),
        "--non-members", str(split["non_members"]["dir"]), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "do not pair up" in err
    assert "Traceback" not in err


def test_akd_student_lowers_the_auc_and_its_proxy_set_is_checked(victim_path: Path, split: dict,
                                                                  tmp_path: Path) -> None:
    teacher_auc = _local_auc(victim_path, split)
    akd = build_model_defense("akd", victim_path, tmp_path / "akd.safetensors", name="mia-akd", steps=120, seed=0)
    student_auc = _local_auc(akd, split)
    assert teacher_auc >= 0.85
    assert student_auc <= teacher_auc - 0.2, (teacher_auc, student_auc)
    assert read_card(akd).training["method"] == "akd"
    assert read_card(akd).training["lambda_l1"] == 100.0
    from defenses.model_level.akd import distill

    with pytest.raises(ValueError, match="lambda_l1 must be > 0"):
        distill(victim_path, tmp_path / "bad.safetensors", name="bad", steps=1, lambda_l1=0.0)
    before = victim_path.read_bytes()
    for out in (victim_path, victim_path.with_suffix(".json")):  # the private victim is never overwritten
        with pytest.raises(ModelDefenseError, match="the victim's own checkpoint"):
            distill(victim_path, out, name="oops", adversarial=False, steps=1)
    assert victim_path.read_bytes() == before
    with pytest.raises(ModelDefenseError, match="is a folder"):
        distill(victim_path, tmp_path, name="oops", adversarial=False, steps=1)
    with pytest.raises(ModelDefenseError, match=r"written as NAME\.safetensors"):  # not student.safetensors in silence
        distill(victim_path, tmp_path / "student.bin", name="s", adversarial=False, steps=1)
    written = distill(victim_path, tmp_path / "student", name="s", adversarial=False, steps=1)
    assert written == tmp_path / "student.safetensors"  # the path actually written, for the CLI to print
    assert written.exists()
    with pytest.raises(ModelDefenseError, match="overlap the victim's private split"):
        proxy_inputs("corpus:victim", 16, 4, set(), seed=0)
    from translators.corpus import export_split

    exported = tmp_path / "export"
    export_split("corpus:victim", exported)  # the same photos as a folder were accepted
    with pytest.raises(ModelDefenseError, match=r"photo\(s\) of the victim's private split"):
        proxy_inputs(str(exported), 16, 4, set(), seed=0)
    digests = set(split["members"]["digests"])  # type: ignore[arg-type]
    from translators.corpus import image_digest
    from translators.zoo.membership import edge_pairs

    leak = {image_digest(y) for _, y in edge_pairs("corpus:attacker", 16, 4, seed=7919)}
    with pytest.raises(ModelDefenseError, match="disjoint from the private set"):
        proxy_inputs("corpus:attacker", 16, 4, digests | leak, seed=0)


def test_dpsgd_trains_with_opacus_on_cpu(victim_path: Path, tmp_path: Path) -> None:
    out = build_model_defense("dpsgd", victim_path, tmp_path / "dp.safetensors", name="mia-dp", steps=3,
                              noise_multiplier=0.5, max_grad_norm=1.0, seed=0)
    card = read_card(out)
    assert card.training["method"] == "dpsgd"
    assert card.training["noise_multiplier"] == 0.5
    before = load_model(victim_path).module.state_dict()
    after = load_model(out).module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
