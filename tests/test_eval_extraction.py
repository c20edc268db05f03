"""The A/B/C extraction table: library on zoo-recipe pairs and paired folders, and `heist eval extraction`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from evaluation.errors import EvaluationError
from evaluation.extraction import (
    as_translator,
    evaluate_extraction,
    folder_pairs,
    parse_image_set,
    recipe_pairs,
)
from evaluation.features import build_inception, load_feature_network
from evaluation.metrics import MetricSettings, psnr, ssim
from evaluation.results import ModelRef, read_results
from evaluation.stats import tost_equivalence, welch_ttest
from translators.archs import build_arch
from translators.checkpoint import ModelCard, save_checkpoint
from translators.codecs import write_image
from translators.corpus import load_images
from translators.errors import CorpusError
from translators.zoo import get_recipe

HEIST = str(Path(sys.executable).with_name("heist"))
KW = {"scale": 4, "channels": 8, "n_blocks": 1}


def _sr_model(seed: int, base: torch.nn.Module | None = None, noise: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build_arch("srresnet", KW).eval()
    if base is not None:
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(noise * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    victim = _sr_model(0)
    return victim, _sr_model(1, base=victim, noise=0.05)


def _bench(max_side: int = 96):
    recipe = get_recipe("sr4x")
    return recipe, recipe_pairs("benchmark", "corpus:benchmark", recipe.make_pair, recipe.scale, 1, seed=0,
                                max_side=max_side)


def test_abc_cells_match_direct_computation(models, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    victim, surrogate = models
    recipe, ps = _bench()
    table, grids = evaluate_extraction(
        as_translator(victim), as_translator(surrogate), [ps], ModelRef(name="v"), ModelRef(name="s"), "sr4x",
        settings=MetricSettings(crop_border=4), sample_dir=tmp_path / "samples", results_dir=tmp_path, n_samples=2,
    )
    ts = table.test_sets[0]
    clean = load_images("corpus:benchmark", max_side=96)
    assert ts.n_images == len(clean) == len(ts.image_names) >= 3
    expected: dict[str, dict[str, list[float]]] = {c: {"psnr": [], "ssim": []} for c in "ABC"}
    with torch.no_grad():
        for i, im in enumerate(clean):
            c = im.image[..., : im.image.shape[-2] // 4 * 4, : im.image.shape[-1] // 4 * 4]
            inp, gt = recipe.make_pair(c, i)
            v, s = victim(inp).clamp(0, 1), surrogate(inp).clamp(0, 1)
            for cell, (out, ref) in {"A": (v, gt), "B": (s, v), "C": (s, gt)}.items():
                expected[cell]["psnr"].append(float(psnr(out, ref, crop_border=4)))
                expected[cell]["ssim"].append(float(ssim(out, ref, crop_border=4)))
    for cell in "ABC":
        comp = ts.cells[cell]
        for metric in ("psnr", "ssim"):
            got = list(comp.metrics[metric].per_image.values())
            assert got == pytest.approx(expected[cell][metric], abs=1e-5)
            assert comp.metrics[metric].summary.mean == pytest.approx(
                sum(expected[cell][metric]) / ts.n_images, abs=1e-5)
        # images of 96 px cannot carry 5 MS-SSIM scales: dropped with a reason, FID/KID without a network
        assert "ms_ssim" not in comp.metrics
        assert any("MS-SSIM not computed" in n for n in comp.notes)
        assert any("no feature network" in n for n in comp.notes)
    assert (ts.cells["A"].output, ts.cells["A"].reference) == ("victim", "ground_truth")
    assert (ts.cells["B"].output, ts.cells["B"].reference) == ("surrogate", "victim")
    # the surrogate is a perturbed copy: it resembles the victim more than either resembles ground truth
    assert ts.cells["B"].metrics["psnr"].summary.mean > ts.cells["C"].metrics["psnr"].summary.mean
    welch = welch_ttest(expected["A"]["psnr"], expected["C"]["psnr"])
    tost = tost_equivalence(expected["A"]["psnr"], expected["C"]["psnr"], 0.3)
    assert ts.tests["psnr"].welch.p_value == pytest.approx(welch.p_value, rel=1e-4)
    assert ts.tests["psnr"].tost.p_value == pytest.approx(tost.p_value, rel=1e-4)
    assert table.d_bound == 0.3
    assert len(grids) == 1
    assert len(grids[0].rows) == 2
    for col in ("input", "victim", "surrogate", "ground truth"):
        assert (tmp_path / grids[0].rows[0].images[col]).is_file()


def test_identical_surrogate_and_feature_network(models, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    victim, _ = models
    torch.manual_seed(2)
    net = build_inception("fid")
    weights = tmp_path / "fid.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    fnet = load_feature_network("inception-v3", weights)
    _, ps = _bench(max_side=64)
    v = as_translator(victim)
    table, _ = evaluate_extraction(v, v, [ps], ModelRef(name="v"), ModelRef(name="v"), "sr4x",
                                   feature_network=fnet, metrics=("psnr", "ssim"))
    ts = table.test_sets[0]
    assert all(x == pytest.approx(80.0) for x in ts.cells["B"].metrics["psnr"].per_image.values())
    assert ts.cells["A"].metrics["psnr"].per_image == ts.cells["C"].metrics["psnr"].per_image
    assert ts.tests["psnr"].welch.diff == 0
    assert ts.tests["psnr"].tost.cohens_d == 0
    assert ts.cells["B"].fid is not None
    assert ts.cells["B"].fid.value == pytest.approx(0.0, abs=1e-6)
    assert ts.cells["A"].fid.feature_network.name == "inception-v3-fid"
    assert ts.cells["A"].fid.value == pytest.approx(ts.cells["C"].fid.value)
    assert ts.cells["A"].kid.subset_size == ts.n_images


def test_paired_folder_source(tmp_path: Path) -> None:
    root = tmp_path / "pairs"
    g = torch.Generator().manual_seed(0)
    (root / "inputs").mkdir(parents=True)
    (root / "targets").mkdir(parents=True)
    for i in range(3):
        write_image(torch.rand(1, 3, 10, 12, generator=g), root / "inputs" / f"im{i}.png")
        write_image(torch.rand(1, 3, 40, 48, generator=g), root / "targets" / f"im{i}.png")
    ps = folder_pairs("mine", root)
    pairs = list(ps.pairs())
    assert [p.name for p in pairs] == ["im0", "im1", "im2"]
    assert pairs[0].input.shape == (1, 3, 10, 12)
    assert pairs[0].target.shape == (1, 3, 40, 48)
    assert ps.spec == f"paired:{root}"
    write_image(torch.rand(1, 3, 40, 48, generator=g), root / "targets" / "extra.png")
    with pytest.raises(CorpusError, match="lack a partner"):
        folder_pairs("mine", root)
    (root / "targets" / "extra.png").unlink()
    write_image(torch.rand(1, 3, 30, 48, generator=g), root / "targets" / "im1.png")
    with pytest.raises(CorpusError, match="not an integer scaling"):
        list(folder_pairs("mine", root).pairs())
    with pytest.raises(CorpusError, match="needs 'inputs/' and 'targets/'"):
        folder_pairs("x", tmp_path / "nowhere")
    write_image(torch.rand(1, 3, 40, 48, generator=g), root / "targets" / "im1.png")
    (root / "inputs" / ".im9.png").write_bytes(b"")  # hidden (editor or macOS junk): not an image to pair
    assert [p.name for p in folder_pairs("mine", root).pairs()] == ["im0", "im1", "im2"]
    write_image(torch.rand(1, 3, 10, 12, generator=g), root / "inputs" / "im0.jpg")
    with pytest.raises(CorpusError, match=r"im0\.(jpg|png) and im0\.(jpg|png) are the same image name"):
        folder_pairs("mine", root)


def test_parse_image_set() -> None:
    assert parse_image_set("corpus:benchmark") == ("benchmark", "corpus:benchmark")
    assert parse_image_set("vt=corpus:victim") == ("vt", "corpus:victim")
    assert parse_image_set("paired:/data/div2k") == ("div2k", "paired:/data/div2k")
    assert parse_image_set("/data/photos") == ("photos", "/data/photos")
    with pytest.raises(EvaluationError, match="LABEL=SPEC"):
        parse_image_set("=corpus:victim")


def test_output_shape_mismatch_is_a_clear_error(models) -> None:
    victim, _ = models
    recipe = get_recipe("denoise25")
    ps = recipe_pairs("b", "corpus:benchmark", recipe.make_pair, 1, 1, max_side=48)
    with pytest.raises(EvaluationError, match="does not match the ground truth"):
        evaluate_extraction(as_translator(victim), as_translator(victim), [ps], ModelRef(name="v"),
                            ModelRef(name="v"), "denoise25")


def test_a_failed_run_leaves_the_previous_samples_alone(models, tmp_path: Path) -> None:
    """The samples of a run that failed half-way replaced those of the good run that results.json shows."""
    victim, surrogate = models
    _, ps = _bench(max_side=64)
    run = {"sample_dir": tmp_path / "samples", "results_dir": tmp_path, "n_samples": 2}
    evaluate_extraction(as_translator(victim), as_translator(surrogate), [ps], ModelRef(name="v"),
                        ModelRef(name="s"), "sr4x", **run)
    before = {p: p.read_bytes() for p in sorted((tmp_path / "samples").rglob("*.png"))}
    assert len(before) == 8
    bad = recipe_pairs("bad", "corpus:benchmark", get_recipe("denoise25").make_pair, 1, 1, max_side=64)  # x1 pairs
    with pytest.raises(EvaluationError, match="does not match the ground truth"):
        evaluate_extraction(as_translator(surrogate), as_translator(surrogate), [ps, bad], ModelRef(name="v"),
                            ModelRef(name="s"), "sr4x", **run)
    assert {p: p.read_bytes() for p in sorted((tmp_path / "samples").rglob("*.png"))} == before


def test_a_run_that_can_compute_no_metric_is_an_error(tmp_path: Path) -> None:
    """A border crop larger than the images wrote a report with no number in it and exited 0."""
    recipe = get_recipe("denoise25")
    ps = recipe_pairs("b", "corpus:benchmark", recipe.make_pair, 1, 1, max_side=48)
    same = as_translator(torch.nn.Identity())
    with pytest.raises(EvaluationError, match=r"no metric could be computed on any image \(PSNR not computed"):
        evaluate_extraction(same, same, [ps], ModelRef(name="v"), ModelRef(name="s"), "denoise25",
                            settings=MetricSettings(crop_border=30), metrics=["psnr"],
                            sample_dir=tmp_path / "samples", results_dir=tmp_path)
    assert not (tmp_path / "samples").exists()


def test_cli_refuses_settings_its_images_cannot_have(tmp_path: Path) -> None:
    """--data-range 255 scored photos read as [0, 1] at 73 dB instead of 26 dB, and recorded it as valid."""
    r = _run("eval", "extraction", "--victim", str(tmp_path / "v.safetensors"), "--surrogate",
             str(tmp_path / "v.safetensors"), "--task", "sr4x", "--data-range", "255", "--out", str(tmp_path / "o"),
             env_dir=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "--data-range 255: heist eval reads every image as floats in [0, 1]" in " ".join(r.stderr.split())
    pairs = tmp_path / "pairs"
    for sub, side in (("inputs", 8), ("targets", 32)):
        (pairs / sub).mkdir(parents=True)
        for i in range(2):
            write_image(torch.rand(1, 3, side, side), pairs / sub / f"im{i}.png")
    v = _save(_sr_model(0), tmp_path / "v.safetensors", "v")
    r = _run("eval", "extraction", "--victim", str(v), "--surrogate", str(v), "--images", f"paired:{pairs}",
             "--max-side", "16", "--out", str(tmp_path / "o"), env_dir=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "--max-side 16: paired: sets are scored at the size of their files" in " ".join(r.stderr.split())


def _save(model: torch.nn.Module, path: Path, name: str) -> Path:
    return save_checkpoint(model, path, ModelCard(name=name, arch="srresnet", kwargs=KW, task="sr", scale=4))


def _run(*args: str, env_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HEIST_DATA_DIR": str(env_dir), "TORCH_HOME": str(env_dir / "torch"),
           "OMP_NUM_THREADS": "1"}
    env.pop("HEIST_INCEPTION_WEIGHTS", None)
    return subprocess.run([HEIST, *args], capture_output=True, text=True, env=env, timeout=600)


def test_cli_extraction_writes_json_then_report(models, tmp_path: Path) -> None:
    victim, surrogate = models
    v, s = _save(victim, tmp_path / "victim.safetensors", "victim"), _save(surrogate, tmp_path / "sur.safetensors",
                                                                          "stolen")
    out = tmp_path / "out"
    r = _run("eval", "extraction", "--victim", str(v), "--surrogate", str(s), "--task", "sr4x",
             "--images", "benchmark=corpus:benchmark", "--images", "vt=corpus:victim", "--max-side", "80",
             "--metrics", "psnr,ssim", "--crop-border", "4", "--color-space", "y", "--out", str(out),
             env_dir=tmp_path)
    assert r.returncode == 0, r.stderr
    res = read_results(out / "results.json")
    assert res.kind == "extraction"
    assert res.metric_settings.color_space == "y"
    assert res.metric_settings.crop_border == 4
    assert [t.name for t in res.extraction[0].test_sets] == ["benchmark", "vt"]
    assert res.feature_network is None
    assert "pytorch-fid" in (res.feature_network_note or "")
    md = (out / "report.md").read_text()
    a = res.extraction[0].test_sets[0].cells["A"].metrics["psnr"].summary
    assert f"| A | victim | ground truth | {res.extraction[0].test_sets[0].n_images} | {a.mean:.2f} [" in md
    assert "Y (BT.601 luma)" in md
    assert "border crop 4 px" in md
    html = (out / "report.html").read_text()
    assert f"{a.mean:.2f} [{a.ci_low:.2f}, {a.ci_high:.2f}]" in html
    assert json.loads((out / "results.json").read_text())["extraction"][0]["surrogate"]["name"] == "stolen"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task", "sr9x"], "unknown zoo model 'sr9x'"),
        (["--task", "denoise25"], "has scale x4 but task denoise25 has x1"),
        ([], "give --task"),
        (["--task", "sr4x", "--color-space", "lab"], "color_space"),
        (["--task", "sr4x", "--metrics", "psnr,lpips"], "unknown metric 'lpips'"),
        (["--task", "sr4x", "--images", "corpus:nope"], "unknown corpus split"),
        (["--task", "sr4x", "--alpha", "0.7"], "--alpha 0.7: give a significance level in (0, 0.5)"),
        (["--task", "sr4x", "--d-bound", "0"], "--d-bound 0: give an equivalence bound > 0"),
        (["--task", "sr4x", "--kid-subset-size", "1"], "--kid-subset-size"),
        (["--task", "sr4x", "--samples", "-2"], "--samples"),
        (["--task", "sr4x", "--fid", "maybe"], "'maybe' is not one of auto, on, off"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(models, tmp_path: Path, extra: list[str], message: str) -> None:
    victim, _ = models
    v = _save(victim, tmp_path / "victim.safetensors", "victim")
    out = tmp_path / "out"
    r = _run("eval", "extraction", "--victim", str(v), "--surrogate", str(v), "--out", str(out), *extra,
             env_dir=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in " ".join(r.stderr.split())  # rich wraps long lines on narrow consoles
    assert "Traceback" not in r.stderr
    assert not out.exists()  # checked before anything is written, --out included


def test_cli_missing_checkpoint(tmp_path: Path) -> None:
    r = _run("eval", "extraction", "--victim", str(tmp_path / "nope.safetensors"), "--surrogate",
             str(tmp_path / "nope.safetensors"), "--task", "sr4x", "--out", str(tmp_path / "o"), env_dir=tmp_path)
    assert r.returncode == 2
    assert "no such file" in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr
