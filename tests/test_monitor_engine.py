"""The monitor's pure logic: embedding invariances, signals, engine exactly-once, malformed entries, policy."""

from __future__ import annotations

import json
import typing

import numpy as np
import pytest
import torch

from attacker.benign import BenignParams
from attacker.victim_info import ModelInfo
from defenses.monitor.config import EscalationStep, MonitorConfig, SignalParams, SignalWeights
from defenses.monitor.embedding import decode_embedding, embed_for_log, source_embedding
from defenses.monitor.engine import MalformedEntryError, MonitorEngine, observation_from_entry
from defenses.monitor.scoring import ClientState, Observation
from evaluation.monitor_eval import (
    AttackerSpec,
    benign_customers_fpr,
    benign_observations,
    calibrate,
    default_attackers,
    evaluate_offline,
    long_customers_summary,
)
from translators.codecs import write_image
from translators.corpus import NamedImage, load_images
from translators.images import bicubic_resize


def test_embedding_is_stable_under_rescale_and_separates_photos() -> None:
    ims = load_images("corpus:victim")
    a, b = ims[0].image, ims[1].image
    ea = source_embedding(a)
    small = bicubic_resize(a, (a.shape[-2] // 3, a.shape[-1] // 3))
    assert float(np.linalg.norm(ea - source_embedding(small))) < 0.12  # same photo, a third of the size
    assert float(np.linalg.norm(ea - source_embedding(b))) > 0.12  # another photo
    assert float(np.linalg.norm(ea - source_embedding(torch.flip(a, dims=(-1,))))) < 0.05  # mirrored
    v = decode_embedding(embed_for_log(a))
    assert v.shape == (80,)
    assert abs(float(np.linalg.norm(v)) - 1) < 0.01
    with pytest.raises(ValueError, match="bytes"):
        decode_embedding("AAAA")


def _entry(client: str, ts: float, emb: np.ndarray | None, sha: str, status: int = 200) -> dict:
    from defenses.monitor.embedding import encode_embedding

    return {"client": client, "tier": "free", "ts": ts, "status": status, "input_sha256": sha,
            "embedding": encode_embedding(emb) if emb is not None else None}


def test_malformed_entries_raise_and_anonymous_entries_are_ignored() -> None:
    with pytest.raises(MalformedEntryError):
        observation_from_entry({"client": "a", "ts": "yesterday", "status": 200})
    with pytest.raises(MalformedEntryError):
        observation_from_entry({"client": "a", "ts": 1.0, "status": 200, "embedding": "not base64!"})
    with pytest.raises(MalformedEntryError):
        observation_from_entry({"client": "a", "status": 200})
    assert observation_from_entry({"client": None, "ts": 1.0, "status": 401}) is None


def test_engine_skips_replayed_entries_and_resends() -> None:
    eng = MonitorEngine(MonitorConfig(), {"free": 1.0})
    x = source_embedding(load_images("corpus:victim")[0].image)
    for i in range(3):
        eng.process(observation_from_entry(_entry("c", float(i), x, "same"), (100, i)))
    eng.process(observation_from_entry(_entry("c", 9.0, x, "same"), (100, 1)))  # replay of an old entry
    s = eng.clients["c"]
    assert s.queries == 3
    assert s.admitted == 3
    assert s.resends == 2
    assert len(s.embs) == 1
    back = ClientState.from_json(s.to_json())
    assert back.queries == 3
    assert back.last_seq == (100, 2)
    assert np.allclose(back.embs, s.embs, atol=1e-3)
    assert json.loads(s.to_json())["client"] == "c"


def test_re_uploads_of_one_shared_photo_do_not_link_two_customers() -> None:
    """Two customers who share one photo, one of them uploading it at three sizes: three matching queries,
    but all against one query of the other customer, so not linked (``source_linked`` asks for two distinct
    queries on each side). Two keys that share three different photos are linked."""
    ims = [im.image for im in load_images("corpus:victim")[:4]]

    def emb(im: torch.Tensor, side: int) -> np.ndarray:
        return source_embedding(bicubic_resize(im, (side, side)))

    eng = MonitorEngine(MonitorConfig())
    stream = [("a", ims[0], 128), ("a", ims[1], 128), ("b", ims[0], 96), ("b", ims[0], 64), ("b", ims[0], 150)]
    for i, (client, im, side) in enumerate(stream):
        eng.process(observation_from_entry(_entry(client, float(i), emb(im, side), f"{client}{i}"), (1, i)))
    a, b = eng.clients["a"], eng.clients["b"]
    assert a.links == {"b": 3}
    assert b.links == {"a": 3}
    assert a.distinct_shared("b") == b.distinct_shared("a") == 1
    for st in (a, b):
        assert st.signals["link"] == 0.0
        assert not st.flagged
        assert st.summary(eng.config.signals)["linked"] == []
    for i, im in enumerate(ims[1:3]):  # b also sends photos 1 and 2, a sends 2: photos 0, 1, 2 are shared
        eng.process(observation_from_entry(_entry("b", 10.0 + i, emb(im, 100), f"b1{i}"), (2, i)))
        if i:
            eng.process(observation_from_entry(_entry("a", 20.0 + i, emb(im, 120), f"a1{i}"), (3, i)))
    assert a.distinct_shared("b") == 3
    assert a.signals["link"] == b.signals["link"] == 1.0
    assert a.summary(eng.config.signals)["linked"] == ["b"]
    assert b.summary(eng.config.signals)["linked"] == ["a"]
    again = MonitorEngine(MonitorConfig())  # after a restart the persisted states keep the query numbers
    again.load([type(a).from_json(a.to_json()), type(b).from_json(b.to_json())])
    assert again.clients["a"].link_ids == a.link_ids
    assert sorted(set(again.index.qids[: again.index.n])) == sorted({*range(a.sources), *range(b.sources)})


def test_policy_levels_per_tier_and_validation() -> None:
    cfg = MonitorConfig(escalation={"default": [EscalationStep(risk=0.5, level=1)],
                                    "pro": [EscalationStep(risk=0.9, level=2)]})
    assert cfg.level_for("free", 0.6) == 1
    assert cfg.level_for("pro", 0.6) == 0
    assert cfg.level_for("pro", 0.95) == 2
    with pytest.raises(ValueError, match="default"):
        MonitorConfig(escalation={"pro": [EscalationStep(risk=0.9, level=2)]})
    with pytest.raises(ValueError, match="increasing"):
        MonitorConfig(escalation={"default": [EscalationStep(risk=0.9, level=2), EscalationStep(risk=0.5, level=1)]})
    for bad, message in [({"knn_hits": 500, "window": 4}, "the k-NN signal could never reach 1"),
                         ({"prada_min": 90, "prada_max": 10}, "PRADA would never run"),
                         ({"k": 64, "history": 64}, "must be below history")]:
        with pytest.raises(ValueError, match=message):
            SignalParams(**bad)
    SignalParams(knn_hits=32, window=32, prada_min=100, prada_max=100)  # the limits themselves are fine


def test_offline_crops_flagged_and_distinct_photos_not() -> None:
    ben = load_images("corpus:victim") + load_images("corpus:benchmark")
    att = load_images("corpus:attacker")
    info = ModelInfo(name="m", task="sr", scale=4, min_side=8)
    cal = calibrate(ben, info, seeds=3)
    assert cal["knn_values"] > 20
    assert 0 < cal["params"]["knn_threshold"] < 1
    res = evaluate_offline(ben, att, info, MonitorConfig(), [AttackerSpec(name="crops", strategy="crops"),
                                                              AttackerSpec(name="sy", strategy="tiles", keys=3)],
                           BenignParams(clients=5, photos_per_client=3), seed=0)
    assert res["benign"]["flagged"] == 0
    assert res["benign"]["linked"] == 0
    crops, sybil = res["attackers"]
    assert crops["queries_to_detection"] is not None
    assert crops["queries_to_detection"] <= 50
    assert sybil["flagged_keys"] >= 1


def _dashboard(n: int, seed: int = 0) -> list[NamedImage]:
    """A look-alike benign population: ``n`` screenshots of one dashboard (a blue line chart on white, with
    axes and a grid; only the line differs), 120x160."""
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = np.ones((3, 120, 160), np.float32)
        x[:, 108, 10:] = 0.2
        x[:, :108, 10] = 0.2
        x[:, 20:108:25, 11:] = 0.85
        walk = np.clip(np.cumsum(g.normal(0, 3, 148)) + g.uniform(20, 80), 2, 104).astype(int)
        colour = np.array([0.12, 0.35, 0.75]) + g.uniform(-0.05, 0.05, 3)
        for j, y in enumerate(walk):
            x[:, y - 1:y + 2, 11 + j] = colour[:, None]
        out.append(NamedImage(f"dash{i:02d}", torch.from_numpy(x)[None]))
    return out


def _reuse_fractions(images: list[NamedImage], info: ModelInfo, params: SignalParams) -> list[float]:
    """Share of re-used sources (the ``reuse`` signal's input) of 4 long customers sending ``images``."""
    out = []
    for c in range(4):
        eng = MonitorEngine(MonitorConfig(signals=params), {"free": 1.0})
        for o in benign_observations(images, info, BenignParams(clients=1, photos_per_client=len(images)),
                                     seed=50 + c):
            eng.process(o)
        (state,) = eng.clients.values()
        out.append(float(np.mean(state.reuse_flags)))
    return out


def test_calibration_shrinks_the_duplicate_radius_only_for_look_alike_customers() -> None:
    """Distinct screenshots of one dashboard sit closer than the default near-duplicate radius, so the
    ``reuse`` signal takes honest customers for crop thieves; calibrating ``dup_distance`` on them fixes
    that. A population of distinct photos keeps the default radius (what rescaled copies need)."""
    info = ModelInfo(name="m", task="style", scale=1, min_side=8)
    dash = _dashboard(12)
    cal = calibrate(dash, info, seeds=4)
    default = SignalParams()
    assert cal["dup_distance_lowered"]
    assert cal["params"]["dup_distance"] == cal["dmin_percentile"] < default.dup_distance
    assert cal["dmin_values"] == 4 * 11
    assert min(_reuse_fractions(dash, info, default)) > default.reuse_floor + default.reuse_span  # all flagged
    assert max(_reuse_fractions(dash, info, SignalParams(**cal["params"]))) < default.reuse_floor
    photos = calibrate(load_images("corpus:victim") + load_images("corpus:benchmark"),
                       ModelInfo(name="m", task="sr", scale=4, min_side=8), seeds=3)
    assert not photos["dup_distance_lowered"]
    assert photos["dmin_percentile"] > photos["params"]["dup_distance"] == default.dup_distance


def test_cli_calibrate_writes_a_settings_table_the_service_loads(tmp_path) -> None:
    """``heist monitor calibrate`` on a folder of look-alike images writes a ``[monitor.signals]`` TOML table
    that is a valid settings file; too few images is a one-line error and writes nothing."""
    from typer.testing import CliRunner

    from heist.cli.main import app as cli
    from victim_service.settings import Settings

    folder = tmp_path / "dash"
    folder.mkdir()
    for im in _dashboard(10):
        write_image(im.image, folder / f"{im.name}.png")
    out = tmp_path / "cal" / "monitor.toml"
    r = CliRunner().invoke(cli, ["monitor", "calibrate", "--benign-images", str(folder), "--extra-benign", "",
                                 "--task", "style", "--scale", "1", "--seeds", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "dup_distance lowered" in " ".join(r.output.split())
    sig = Settings.from_file(out).monitor.signals
    assert sig.dup_distance < SignalParams().dup_distance
    assert sig.knn_threshold < SignalParams().knn_threshold
    assert f"dup_distance = {sig.dup_distance}" in r.output
    (one := tmp_path / "one").mkdir()
    write_image(_dashboard(1)[0].image, one / "a.png")
    bad = tmp_path / "bad.toml"
    r = CliRunner().invoke(cli, ["monitor", "calibrate", "--benign-images", str(one), "--extra-benign", "",
                                 "--out", str(bad)])
    assert r.exit_code != 0
    assert "need at least 2 benign images" in str(r.exception or r.output)
    assert not bad.exists()


def test_benign_fpr_measures_what_a_chance_region_link_costs() -> None:
    """``fpr_if_region_linked`` scores the same customers with the region signal on from their first query:
    never below the plain rate; equal to it when the signal has no weight; every customer when the signal
    alone reaches ``flag_risk``; absent when region linking is off."""
    ben = load_images("corpus:victim") + load_images("corpus:benchmark")
    info = ModelInfo(name="m", task="sr", scale=4, min_side=8)
    plain = benign_customers_fpr(ben, info, MonitorConfig(), customers=3)
    assert plain["fpr_if_region_linked"] >= plain["fpr"]
    silent = benign_customers_fpr(ben, info, MonitorConfig(weights=SignalWeights(region=0.0)), customers=3)
    assert silent["fpr_if_region_linked"] == silent["fpr"] == plain["fpr"]
    loud = benign_customers_fpr(ben, info, MonitorConfig(weights=SignalWeights(region=0.5)), customers=3)
    assert loud["fpr_if_region_linked"] == 1.0
    off = benign_customers_fpr(ben, info, MonitorConfig(signals=SignalParams(region_shared=0)), customers=3)
    assert off["fpr_if_region_linked"] is None
    assert off["fpr"] == plain["fpr"]


def test_observation_without_embedding_counts_volume_only() -> None:
    eng = MonitorEngine(MonitorConfig(), {"free": 1.0})
    eng.process(Observation("r", "free", 0.0, False, None, None, (1, 0)))
    s = eng.clients["r"]
    assert s.queries == 1
    assert s.admitted == 0
    assert not s.flagged


def test_cli_offline_eval_writes_every_attacker_and_the_chance_link_cost(tmp_path) -> None:
    """``heist monitor eval`` (offline engine): one row per built-in attacker and evasion, the benign
    population, and the long customers with and without a chance shared region, in the JSON and on stdout."""
    from typer.testing import CliRunner

    from heist.cli.main import app as cli

    out = tmp_path / "eval.json"
    r = CliRunner().invoke(cli, ["monitor", "eval", "--task", "sr", "--scale", "4", "--customers", "2",
                                 "--queries", "12", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert [a["name"] for a in res["attackers"]] == [a.name for a in default_attackers()]
    assert res["benign"]["clients"] == 5
    long_run = res["benign_customers"]
    assert long_run["customers"] == 2
    assert long_run["fpr_if_region_linked"] >= long_run["fpr"]
    printed = " ".join(r.output.split())  # the console may wrap long lines
    assert long_customers_summary(long_run) in printed
    assert "if each were linked by a chance shared region" in printed
    assert "after None" not in printed
    for a in res["attackers"]:
        q = a["queries_to_detection"]
        seen = f"detected after {q} queries" if q is not None else f"not detected in {a['queries']} queries"
        assert seen in printed
    ignored = CliRunner().invoke(cli, ["monitor", "eval", "--model", "sr4x", "--out", str(tmp_path / "m.json")])
    assert ignored.exit_code != 0  # --model was ignored without --url
    assert "--model applies to a live victim: add --url" in str(ignored.exception)


@pytest.mark.parametrize("command", ["calibrate", "eval"])
def test_cli_monitor_refuses_a_bad_task_or_out_before_any_work(tmp_path, command: str) -> None:
    """A task the traffic cannot be shaped for, an --out that is a folder, sits under a file or cannot be
    written: refused at once (nothing computed, nothing written)."""
    from typer.testing import CliRunner

    from heist.cli.main import app as cli
    from heist.cli.monitor import TASKS
    from translators.zoo.recipes import Task

    assert set(TASKS) == set(typing.get_args(Task))
    (tmp_path / "file").write_text("x")
    cases = [(["--task", "bogus", "--out", str(tmp_path / "a.out")], "'bogus' is not one of sr, denoise"),
             (["--task", "sr", "--scale", "1", "--out", str(tmp_path / "a.out")], "super-resolution enlarges"),
             (["--task", "style", "--scale", "3", "--out", str(tmp_path / "a.out")], "keeps the image size"),
             (["--out", str(tmp_path)], "is a folder; name the file to write"),
             (["--out", str(tmp_path / "file" / "a.out")], "is a file, not a folder"),
             (["--out", "/proc/heist-test.out"], "cannot write there")]
    for args, message in cases:
        r = CliRunner().invoke(cli, ["monitor", command, *args])
        assert r.exit_code != 0, args
        assert message in " ".join((str(r.exception or "") + r.output).split()), (args, r.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_budget_sized_attackers_send_the_crops_the_harvest_cli_would() -> None:
    """``sized_for_budget`` sizes the crops from the attacker's query count, as ``heist attack harvest
    --budget`` does (large crops for few queries); without it the strategy's budget-free 64 px."""
    from attacker.strategies import build_strategy
    from evaluation.monitor_eval import attacker_bodies
    from translators.codecs import decode_image

    att = load_images("corpus:attacker")
    info = ModelInfo(name="m", task="style", scale=1)
    small = AttackerSpec(name="a", strategy="crops", queries=3)
    sized = AttackerSpec(name="b", strategy="crops", queries=3, sized_for_budget=True)
    assert decode_image(attacker_bodies(small, att, info, 0)[0]).shape[-1] == 64
    want = build_strategy("crops", att, info, None, 0, budget=3).crop_size
    assert want > 64
    assert decode_image(attacker_bodies(sized, att, info, 0)[0]).shape[-1] == want
    assert {"crops-budget", "sybil4-crops-budget"} <= {a.name for a in default_attackers()}


def test_calibration_on_too_few_benign_values_is_flagged() -> None:
    """A 0.5 percentile of 150 values is their minimum: ``heist monitor calibrate`` warns instead of silently
    writing thresholds that one customer's luck set."""
    from heist.cli.monitor import small_sample_note

    enough = {"percentile": 0.5, "knn_values": 250, "w_values": 0, "dmin_values": 300}
    assert small_sample_note(enough) is None  # 0 values: that threshold was not calibrated at all
    note = small_sample_note({**enough, "knn_values": 150})
    assert note is not None
    assert "needs at least 200 benign values, this calibration had 150 k-NN distances" in note
    assert small_sample_note({**enough, "knn_values": 150, "percentile": 1.0}) is None
