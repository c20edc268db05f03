"""``heist eval``: score extraction attacks (the A/B/C table), render reports, check feature networks."""

from __future__ import annotations

import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from heist.cli.common import choice, console, device_option, progress
from translators.corpus import DEFAULT_SEED
from translators.errors import HeistError, first_problem
from translators.paths import file_in_the_way

if TYPE_CHECKING:  # the evaluator (torch, piq, matplotlib) is imported when a command runs, not at CLI start
    from evaluation.features import FeatureNetwork
    from evaluation.metrics import MetricSettings
    from evaluation.results import ModelRef
    from translators.checkpoint import LoadedModel

app = typer.Typer(help="Evaluate attacks and defenses; render reports from results.json.", no_args_is_help=True)
log = logging.getLogger(__name__)


def metric_settings(data_range: float, crop_border: int, color_space: str) -> MetricSettings:
    """Validated :class:`MetricSettings` from CLI options (a one-line error otherwise)."""
    from pydantic import ValidationError

    from evaluation.errors import EvaluationError
    from evaluation.metrics import MetricSettings

    try:
        return MetricSettings(data_range=data_range, crop_border=crop_border, color_space=color_space)
    except ValidationError as exc:
        raise EvaluationError(f"bad metric setting {first_problem(exc)}") from None


def parse_metrics(text: str) -> list[str]:
    from evaluation.errors import EvaluationError
    from evaluation.metrics import METRICS

    names = [m.strip().lower().replace("-", "_") for m in text.split(",") if m.strip()]
    for m in names:
        if m not in METRICS:
            raise EvaluationError(f"unknown metric {m!r}; use a comma list of {', '.join(METRICS.names())}")
    if not names:
        raise EvaluationError("no metric given")
    return names


def feature_network_for(mode: str, name: str, weights: Path | None, device: str) -> tuple[FeatureNetwork | None, str]:
    """The feature network (or None) and a note for the report when FID/KID are skipped."""
    from evaluation.errors import EvaluationError, FeatureNetworkError
    from evaluation.features import load_feature_network

    if mode not in ("auto", "on", "off"):
        raise EvaluationError(f"--fid must be auto, on or off, got {mode!r}")
    if mode == "off":
        return None, "FID/KID switched off (--fid off)"
    try:
        return load_feature_network(name, weights, device), ""
    except FeatureNetworkError as exc:
        if mode == "on" or weights is not None:
            raise
        log.warning("FID/KID skipped: %s", exc)
        return None, f"FID/KID skipped: {exc}"


def _model_ref(m: LoadedModel) -> ModelRef:
    from evaluation.results import ModelRef

    return ModelRef(name=m.card.name, path=str(m.source), task=m.card.task, scale=m.card.scale, arch=m.card.arch)


def _load(path: Path, device: str, what: str) -> LoadedModel:
    from translators.checkpoint import load_model

    m = load_model(path, device)
    log.info("%s: %s (%s, task %s, x%d)", what, m.card.name, m.kind, m.card.task, m.card.scale)
    return m


@app.command("extraction")
def extraction(
    victim: Path = typer.Option(..., "--victim", help="Victim checkpoint (.safetensors + .json card, .pt or .pt2)."),
    surrogate: Path = typer.Option(..., "--surrogate", help="Surrogate checkpoint."),
    images: list[str] = typer.Option(
        ["benchmark=corpus:benchmark"], "--images",
        help="Test set, repeatable: [LABEL=]corpus:SPLIT, [LABEL=]FOLDER of clean images (pairs made by --task), "
             "or [LABEL=]paired:FOLDER with inputs/ and targets/ subfolders.",
    ),
    task: str | None = typer.Option(None, "--task", help="Zoo recipe whose make_pair builds (input, ground truth) "
                                                          "from clean images: sr4x, denoise25, style-ink, ..."),
    out: Path = typer.Option(..., "--out", help="Folder for results.json, report.md, report.html and figures/."),
    metrics: str = typer.Option("psnr,ssim,ms_ssim", help="Comma list of psnr, ssim, ms_ssim."),
    data_range: float = typer.Option(
        1.0, help="Pixel value range of the images. Every image is read as floats in [0, 1], so only 1.0 is "
        "accepted here (evaluation.metrics takes other ranges for tensors you pass yourself)."),
    crop_border: int = typer.Option(0, help="Pixels cropped from every side before scoring (SR papers: the scale)."),
    color_space: str = typer.Option("rgb", help="rgb, or y for ITU-R BT.601 luma as in SR papers."),
    fid: str = typer.Option("auto", callback=choice("auto", "on", "off"),
                            help="FID/KID: auto (if weights are found), on (required) or off."),
    feature_network: str = typer.Option("inception-v3", help="Feature network for FID/KID (inception-v3, "
                                                              "inception-v3-fid, inception-v3-torchvision)."),
    feature_weights: Path | None = typer.Option(None, help="InceptionV3 weights file (see docs/evaluation.md)."),
    kid_subsets: int = typer.Option(100, min=1, help="KID subsets."),
    kid_subset_size: int = typer.Option(1000, min=2, help="KID subset size (capped at the set size)."),
    d_bound: float = typer.Option(0.3, help="TOST equivalence bound as Cohen's d (> 0)."),
    alpha: float = typer.Option(0.05, help="Significance level of Welch and TOST, in (0, 0.5)."),
    max_side: int = typer.Option(0, min=0, help="Downsize clean images (corpus:SPLIT, folders; not paired: sets) "
                                 "to this longest side first (0: keep)."),
    samples: int = typer.Option(3, min=0, help="Sample images per test set in the report's image grid."),
    seed: int = typer.Option(0, help="Seed for make_pair noise, bootstrap CIs and KID subsets."),
    corpus_seed: int = typer.Option(DEFAULT_SEED, help="Seed of the corpus split assignment."),
    device: str = device_option(),
) -> None:
    """Score a surrogate against its victim: the A/B/C table with CIs, Welch and TOST; JSON, then a report."""
    from evaluation.errors import EvaluationError
    from evaluation.extraction import (
        KIDSettings,
        PairSet,
        as_translator,
        evaluate_extraction,
        folder_pairs,
        parse_image_set,
        recipe_pairs,
    )
    from evaluation.report import render_report
    from evaluation.results import Environment, Results, write_results
    from translators.device import pick_device
    from translators.registry import UnknownNameError

    if (blocked := file_in_the_way(out)) is not None:
        raise HeistError(f"--out {out}: {blocked} is a file; name a folder for results.json and the report")
    if not 0.0 < alpha < 0.5:  # the rules of evaluation.stats, checked before minutes of scoring
        raise HeistError(f"--alpha {alpha:g}: give a significance level in (0, 0.5)")
    if not (math.isfinite(d_bound) and d_bound > 0):
        raise HeistError(f"--d-bound {d_bound:g}: give an equivalence bound > 0 (Cohen's d)")
    t0 = time.perf_counter()
    if data_range != 1.0:  # 255 scored 8-bit photos read as [0, 1] at 73 dB instead of 26
        raise HeistError(f"--data-range {data_range:g}: heist eval reads every image as floats in [0, 1], so the "
                         "range is 1.0 whatever the file's bit depth; leave the option out")
    settings = metric_settings(data_range, crop_border, color_space)
    names = parse_metrics(metrics)
    dev = str(pick_device(device))
    vm, sm = _load(victim, dev, "victim"), _load(surrogate, dev, "surrogate")
    recipe = None
    if task:
        from translators.zoo import get_recipe

        try:
            recipe = get_recipe(task)
        except UnknownNameError as exc:
            raise EvaluationError(str(exc)) from None
        for what, m in (("victim", vm), ("surrogate", sm)):
            if m.card.scale != recipe.scale:
                raise EvaluationError(f"{what} {m.card.name} has scale x{m.card.scale} but task {task} has "
                                      f"x{recipe.scale}")
    multiple = max(vm.card.size_multiple, sm.card.size_multiple, 1)
    sets: list[PairSet] = []
    for text in images:
        label, spec = parse_image_set(text)
        if spec.startswith("paired:"):
            sets.append(folder_pairs(label, spec.split(":", 1)[1], multiple))
        elif recipe is None:
            raise EvaluationError(f"image set {text!r} holds clean images: give --task (a zoo recipe) to make "
                                  "(input, ground truth) pairs, or use paired:FOLDER")
        else:
            sets.append(recipe_pairs(label, spec, recipe.make_pair, recipe.scale, multiple, seed,
                                     max_side or None, corpus_seed))
    if len({s.name for s in sets}) != len(sets):
        raise EvaluationError("two image sets share a label; name them with LABEL=SPEC")
    if max_side and all(parse_image_set(t)[1].startswith("paired:") for t in images):
        raise EvaluationError(f"--max-side {max_side}: paired: sets are scored at the size of their files; the "
                              "option applies to clean image sets (corpus:SPLIT, folders)")
    net, net_note = feature_network_for(fid, feature_network, feature_weights, dev)
    out.mkdir(parents=True, exist_ok=True)
    t_eval = time.perf_counter()
    with progress() as bar:
        job = bar.add_task("scoring", total=None, info="")
        table, grids = evaluate_extraction(
            as_translator(vm.module, dev), as_translator(sm.module, dev), sets, _model_ref(vm), _model_ref(sm),
            task=task or vm.card.task, settings=settings, metrics=names, feature_network=net,
            kid=KIDSettings(kid_subsets, kid_subset_size, seed), d_bound=d_bound, alpha=alpha, seed=seed,
            sample_dir=out / "samples", results_dir=out, n_samples=samples,
            on_image=lambda s, n: bar.update(job, advance=1, info=f"{s}/{n}"),
        )
    results = Results(
        kind="extraction", name=f"{sm.card.name} vs {vm.card.name}",
        command=shlex.join(["heist", *sys.argv[1:]]) if sys.argv else None,
        config={"victim": str(victim), "surrogate": str(surrogate), "images": list(images), "task": task,
                "metrics": names, "fid": fid, "feature_network": feature_network,
                "feature_weights": str(feature_weights) if feature_weights else None, "kid_subsets": kid_subsets,
                "kid_subset_size": kid_subset_size, "d_bound": d_bound, "alpha": alpha, "max_side": max_side,
                "samples": samples, "device": device},
        environment=Environment.capture(dev), seeds={"seed": seed, "corpus_seed": corpus_seed},
        metric_settings=settings, feature_network=net.info if net else None,
        feature_network_note=net_note or None, extraction=[table], samples=grids,
    )
    results.wall_times = {"load": round(t_eval - t0, 3), "evaluation": round(time.perf_counter() - t_eval, 3)}
    path = write_results(results, out / "results.json")
    files = render_report(path)
    console.print(f"results: {path}\nreport:  {files.markdown}\n         {files.html}")


@app.command("report")
def report(
    results: Path = typer.Argument(..., help="results.json (or the folder holding it)."),
    out: Path | None = typer.Option(None, "--out", help="Folder for the report (default: beside results.json)."),
    target_psnr: float | None = typer.Option(None, help="Campaigns: recompute queries-to-target for this PSNR."),
) -> None:
    """Render report.md, report.html and figures from a results.json (campaign summaries are derived first)."""
    from evaluation.report import render_report
    from evaluation.results import read_results, write_results

    if target_psnr is not None and not math.isfinite(target_psnr):
        raise HeistError(f"--target-psnr {target_psnr}: give a finite PSNR in dB")
    if out is not None and (blocked := file_in_the_way(out)) is not None:
        raise HeistError(f"--out {out}: {blocked} is a file; name a folder for the report")
    path = results / "results.json" if results.is_dir() else results
    res = read_results(path)
    if target_psnr is not None and res.kind != "campaign":
        raise HeistError(f"--target-psnr applies to campaign results; {path} holds {res.kind} results (leave the "
                         "option out)")
    # With --out elsewhere the report gets its own results.json (the one it says it reads) and the input
    # stays as it was; sample images are still found beside the input.
    dest = path if out is None or out.resolve() == path.parent.resolve() else out / "results.json"
    derived = res.kind == "campaign" and (res.derived is None or target_psnr is not None)
    if derived:
        from evaluation.defense_scoring import derive

        target = target_psnr if target_psnr is not None else (res.derived.target_value if res.derived else 25.0)
        res.derived = derive(res, target=target)
    if derived or dest != path:
        write_results(res, dest)
    files = render_report(dest, out, results_dir=path.parent)
    console.print(f"report: {files.markdown}\n        {files.html} ({len(files.figures)} figures)")


@app.command("features")
def features(
    weights: Path | None = typer.Option(None, "--feature-weights", "--weights",
                                        help="InceptionV3 weights file to check (as eval extraction's option)."),
    network: str = typer.Option("inception-v3", help="Feature network name."),
) -> None:
    """Check that a feature network loads, and print the name FID/KID results will carry."""
    from evaluation.features import load_feature_network

    net = load_feature_network(network, weights)
    console.print(f"{net.info.label}\n(input {net.info.input_size}x{net.info.input_size}, {net.info.dim}-d features)")
