"""Reports rendered from a results.json that real small computations produced: numbers must match the file."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from evaluation.defense_scoring import derive, surrogate_scores, utility_cost
from evaluation.extraction import as_translator, evaluate_extraction, recipe_pairs
from evaluation.report import render_report
from evaluation.results import (
    CampaignCell,
    DefenseEntry,
    Environment,
    GridRow,
    ImageGrid,
    ModelRef,
    Results,
    VictimEntry,
    read_results,
    write_results,
)
from translators.archs import build_arch
from translators.codecs import write_image
from translators.corpus import PatchSampler, load_images
from translators.zoo import get_recipe

HEIST = str(Path(sys.executable).with_name("heist"))
KW = {"scale": 4, "channels": 8, "n_blocks": 1}
CONFIG_TEXT = """name = "tiny-report"
victims = ["sr4x-tiny"]
budgets = [8, 32]
strategies = ["random"]

[[defenses]]
name = "none"

[[defenses]]
name = "noise"
sigma = 0.04

[[defenses]]
name = "blur"
"""


def _defense(name: str, clean):
    if name == "none":
        return clean

    def defended(x: torch.Tensor) -> torch.Tensor:
        y = clean(x)
        if name == "noise":
            g = torch.Generator().manual_seed(int(x.sum() * 1000) % 2**31)
            return (y + 0.04 * torch.randn(y.shape, generator=g)).clamp(0, 1)
        return F.avg_pool2d(y, 3, stride=1, padding=1, count_include_pad=False)

    return defended


def _train_surrogate(defended, budget: int, seed: int) -> torch.nn.Module:
    """Harvest ``budget`` 8x8 queries from the attacker split through ``defended`` and fit a tiny SRResNet."""
    sampler = PatchSampler([im.image for im in load_images("corpus:attacker", max_side=64)], 8, seed=seed)
    inputs = sampler.sample(budget)
    outputs = torch.cat([defended(inputs[i : i + 1]) for i in range(budget)])
    torch.manual_seed(seed)
    model = build_arch("srresnet", KW)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(15):
        loss = F.l1_loss(model(inputs), outputs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def campaign_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A campaign results.json (1 victim x 3 defenses x 2 budgets, one failed cell) from real computations."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("campaign")
    t0 = time.perf_counter()
    recipe = get_recipe("sr4x")
    bench = recipe_pairs("benchmark", "corpus:benchmark", recipe.make_pair, 4, 1, seed=0, max_side=64)
    torch.manual_seed(0)
    victim_net = build_arch("srresnet", KW).eval()
    clean = as_translator(victim_net)
    victim = "sr4x-tiny"
    labels = ["none", "noise", "blur"]
    utility = [utility_cost(clean, _defense(d, clean), bench, victim, d) for d in labels]
    t_util = time.perf_counter()
    cells = []
    for d in labels:
        for b in (8, 32):
            cid = f"{victim}/{d}/{b}/random"
            if d == "blur" and b == 32:
                cells.append(CampaignCell(id=cid, victim=victim, defense=d, budget=b, strategy="random", seed=3,
                                          status="failed", error="victim died: connection refused after 17 queries",
                                          queries_used=17))
                continue
            ts = time.perf_counter()
            sur = _train_surrogate(_defense(d, clean), b, seed=b)
            tt = time.perf_counter()
            fidelity, quality = surrogate_scores(as_translator(sur), clean, bench, metrics=("psnr", "ssim"))
            cells.append(CampaignCell(
                id=cid, victim=victim, defense=d, budget=b, strategy="random", seed=b, status="done",
                queries_used=b, queries_refused=0, fidelity=fidelity, quality=quality,
                wall_times={"harvest+training": round(tt - ts, 3), "evaluation": round(time.perf_counter() - tt, 3)},
                surrogate=ModelRef(name=f"surrogate-{d}-{b}", task="sr", scale=4, arch="srresnet"),
            ))
            if d == "noise" and b == 32:
                rows = []
                for pair in list(bench.pairs())[:2]:
                    imgs = {"input": pair.input, "victim": clean(pair.input),
                            "defended": _defense(d, clean)(pair.input), "surrogate": as_translator(sur)(pair.input)}
                    paths = {}
                    for col, t in imgs.items():
                        p = out / "samples" / f"{pair.name}_{col}.png"
                        p.parent.mkdir(parents=True, exist_ok=True)
                        write_image(t, p)
                        paths[col] = p.relative_to(out).as_posix()
                    rows.append(GridRow(name=pair.name, images=paths))
                grid = ImageGrid(title=f"{victim}, noise defense, 32 queries: input | victim | defended | surrogate",
                                 columns=["input", "victim", "defended", "surrogate"], rows=rows, victim=victim,
                                 defense=d, budget=b, strategy="random")
    v2 = _train_surrogate(clean, 32, seed=5)
    table, grids = evaluate_extraction(clean, as_translator(v2), [bench], ModelRef(name=victim), ModelRef(name="s32"),
                                       "sr4x", metrics=("psnr", "ssim"), sample_dir=out / "samples", results_dir=out,
                                       n_samples=2)
    results = Results(
        kind="campaign", name="tiny-report", config={"budgets": [8, 32]}, config_text=CONFIG_TEXT,
        config_path="configs/campaigns/tiny.toml", environment=Environment.capture("cpu"),
        seeds={"campaign": 0, "corpus": 1234}, peak_memory_mb=512.25,
        victims=[VictimEntry(name=victim, model=ModelRef(name=victim, task="sr", scale=4), recipe="sr4x")],
        defenses=[DefenseEntry(label="none", name="none"), DefenseEntry(label="noise", name="noise",
                                                                       params={"sigma": 0.04}),
                  DefenseEntry(label="blur", name="blur")],
        budgets=[8, 32], strategies=["random"], cells=cells, utility=utility, samples=[grid, *grids],
        extraction=[table],
    )
    results.wall_times = {"utility": round(t_util - t0, 3), "attacks": round(time.perf_counter() - t_util, 3)}
    results.derived = derive(results, target=18.0)
    write_results(results, out / "results.json")
    return out


def _json_numbers(obj, out: set[str]) -> None:
    """Every way the report may print a number that is in the JSON (formatting only, no arithmetic)."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, int):
        out.add(str(obj))
    elif isinstance(obj, float):
        for k in range(5):
            out.add(f"{obj:.{k}f}")
        out.update({f"{obj:.4g}", f"{obj:.3g}", f"{obj:.2e}", f"{obj:g}"})
    elif isinstance(obj, str):
        out.update(re.findall(r"\d+(?:\.\d+)?", obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _json_numbers(k, out)
            _json_numbers(v, out)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _json_numbers(v, out)


def _table_body_rows(md: str) -> list[list[str]]:
    lines = md.splitlines()
    rows = []
    for i, line in enumerate(lines):
        is_header = i + 1 < len(lines) and lines[i + 1].startswith("|---")
        if line.startswith("| ") and not is_header:
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


def test_every_number_in_report_tables_comes_from_results_json(campaign_dir: Path) -> None:
    files = render_report(campaign_dir / "results.json")
    md = files.markdown.read_text()
    allowed: set[str] = set()
    _json_numbers(json.loads((campaign_dir / "results.json").read_text()), allowed)
    rows = _table_body_rows(md)
    assert len(rows) > 30
    checked = 0
    for row in rows:
        for cell in row:
            for token in re.findall(r"-?\d+(?:\.\d+)?(?:e[+-]\d+)?", cell):
                token = token.lstrip("-") if token.lstrip("-") in allowed else token
                assert token in allowed, f"{token!r} in row {row} is not a number of results.json"
                checked += 1
    assert checked > 150


def test_report_rows_match_results(campaign_dir: Path) -> None:
    files = render_report(campaign_dir / "results.json")
    md, html = files.markdown.read_text(), files.html.read_text()
    res = read_results(campaign_dir / "results.json")
    d = res.derived
    assert d is not None
    rows = {r.defense: r for r in d.defense_table}
    assert set(rows) == {"none", "noise", "blur"}
    noise = rows["noise"]
    line = (f"| noise | {noise.honest_psnr:.2f} | {noise.honest_ssim:.4f} | {noise.quality_clean_psnr:.2f} | "
            f"{noise.quality_defended_psnr:.2f} | {noise.utility_cost_db:.2f} | {noise.attacker_psnr['8']:.2f} | "
            f"{noise.attacker_psnr['32']:.2f} | {noise.attack_degradation_db['8']:.2f} | "
            f"{noise.attack_degradation_db['32']:.2f} | {'yes' if noise.pareto_optimal else 'no'} |")
    assert line in md
    assert f"<td>{noise.honest_psnr:.2f}</td>" in html
    assert "| blur |" in md
    assert "| – | – |" in md
    for cell in res.cells:
        if cell.status == "done":
            s = cell.fidelity.metrics["psnr"].summary
            shown = f"{s.mean:.2f} [{s.ci_low:.2f}, {s.ci_high:.2f}]"
            assert f"| {cell.id} | done | {cell.queries_used} | 0 | {shown} |" in md
        else:
            assert f"| {cell.id} | failed | 17 |" in md
            assert "victim died: connection refused after 17 queries" in md
    for q in d.queries_to_target:
        shown = f"{q.queries:.0f}" if q.queries is not None else f"not reached (> {q.max_queries})"
        shown = f"≤ {shown}" if q.at_first_point else shown
        assert f"| {q.victim} | {q.defense} | {q.strategy} | 18.00 | {shown} | {q.max_queries} |" in md
    a = res.extraction[0].test_sets[0].cells["A"].metrics["psnr"].summary
    assert f"| A | victim | ground truth | {res.extraction[0].test_sets[0].n_images} | {a.mean:.2f} [" in md
    # exact config, seeds, wall times, versions and peak memory are in the report
    assert CONFIG_TEXT.strip() in md
    assert "| campaign | 0 |" in md
    assert "| corpus | 1234 |" in md
    assert f"| attacks | {res.wall_times['attacks']:.1f} s |" in md
    assert f"| torch | {torch.__version__.split('+')[0]}" in md
    assert "Peak memory (RSS): 512.2 MiB" in md or "Peak memory (RSS): 512.3 MiB" in md


def test_html_is_self_contained_and_figures_are_pngs(campaign_dir: Path) -> None:
    files = render_report(campaign_dir / "results.json", out_dir=campaign_dir / "rendered")
    html = files.html.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:|//|file:)""", html)
    assert "<link" not in html
    assert "<script" not in html
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    names = {p.name for p in files.figures}
    assert any(n.startswith("curves_") for n in names)
    assert any(n.startswith("pareto_") for n in names)
    assert sum(n.startswith("grid_") for n in names) == 2
    assert len(uris) == len(files.figures) >= 5
    for uri in uris:
        img = Image.open(io.BytesIO(base64.b64decode(uri)))
        assert img.format == "PNG"
        assert img.size[0] > 300
        assert img.size[1] > 200
    for p in files.figures:
        assert p.parent == campaign_dir / "rendered" / "figures"
        assert f"](figures/{p.name})" in files.markdown.read_text()


def test_report_follows_the_file(campaign_dir: Path, tmp_path: Path) -> None:
    """Change a number in results.json and the report changes with it: nothing is recomputed."""
    raw = json.loads((campaign_dir / "results.json").read_text())
    raw["cells"][0]["fidelity"]["metrics"]["psnr"]["summary"].update({"mean": 12.3456, "ci_low": 11.0,
                                                                       "ci_high": 13.0})
    raw["derived"]["defense_table"][0]["honest_ssim"] = 0.123456
    (tmp_path / "results.json").write_text(json.dumps(raw))
    files = render_report(tmp_path / "results.json", results_dir=campaign_dir)
    md = files.markdown.read_text()
    assert "12.35 [11.00, 13.00]" in md
    assert "| none | 80.00 | 0.1235 |" in md
    again = render_report(tmp_path / "results.json", results_dir=campaign_dir).markdown.read_text()
    assert again == md


def _run(args: list[str], data: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HEIST_DATA_DIR": str(data), "OMP_NUM_THREADS": "1"}
    return subprocess.run([HEIST, *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_report_derives_missing_summaries(campaign_dir: Path, tmp_path: Path) -> None:
    raw = json.loads((campaign_dir / "results.json").read_text())
    raw["derived"] = None
    target = tmp_path / "c"
    target.mkdir()
    (target / "results.json").write_text(json.dumps(raw))
    (target / "samples").symlink_to(campaign_dir / "samples")
    r = _run(["eval", "report", str(target), "--target-psnr", "17.5"], tmp_path)
    assert r.returncode == 0, r.stderr
    res = read_results(target / "results.json")
    assert res.derived is not None
    assert res.derived.target_value == 17.5
    assert len(res.derived.defense_table) == 3
    assert (target / "report.html").is_file()
    assert "| 17.50 |" in (target / "report.md").read_text()


def test_cli_report_elsewhere_leaves_the_input_alone(campaign_dir: Path, tmp_path: Path) -> None:
    """--out OTHER --target-psnr rewrote the input results.json (its own report no longer matched it), and
    the new report said it read a results.json in its folder, where there was none."""
    before = (campaign_dir / "results.json").read_bytes()
    out = tmp_path / "other"
    r = _run(["eval", "report", str(campaign_dir), "--out", str(out), "--target-psnr", "17.5"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (campaign_dir / "results.json").read_bytes() == before
    assert read_results(out / "results.json").derived.target_value == 17.5
    md = (out / "report.md").read_text()
    assert "| 17.50 |" in md
    for img in re.findall(r"\]\(([^)]+\.png)\)", md):  # sample images still found beside the input
        assert (out / img).resolve().is_file(), img


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not valid JSON"),
    ('{"kind": "campaign"}', "invalid results (name: Field required)"),
    ('{"kind": "campaign", "name": "x", "schema_version": 99}', "newer than this Heist"),
])
def test_cli_report_bad_results_file(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "results.json").write_text(content)
    r = _run(["eval", "report", str(tmp_path / "results.json")], tmp_path)
    assert r.returncode == 2
    assert message in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "report.md").exists()


def test_cli_report_refuses_a_target_psnr_it_would_ignore(tmp_path: Path) -> None:
    """--target-psnr on an extraction result was silently ignored (only campaigns have queries-to-target)."""
    path = write_results(Results(kind="extraction", name="one surrogate"), tmp_path / "results.json")
    r = _run(["eval", "report", str(path), "--target-psnr", "30"], tmp_path)
    assert r.returncode == 2
    assert "--target-psnr applies to campaign results" in " ".join(r.stderr.split())
    assert not (tmp_path / "report.md").exists()
