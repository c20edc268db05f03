"""The extraction paper's A/B/C table (``model-extraction-image-translation-gans``, Tables 2-4).

On each test set (the victim's test split and an independent benchmark split):

- **A**: victim output vs ground truth (how good the victim is);
- **B**: surrogate output vs victim output (the attacker's proxy: all the attacker can measure);
- **C**: surrogate output vs ground truth (how good the stolen model really is).

Each cell holds per-image PSNR, SSIM and MS-SSIM with summaries and bootstrap CIs, and, when a
feature network is given, set-level FID and KID. Per metric, Welch's t-test and TOST equivalence
(Cohen's d bound, default 0.3) compare the victim's per-image quality scores (A) with the
surrogate's (C), as the paper does for its user-study scores.

(input, ground truth) pairs come from a victim-zoo recipe's ``make_pair(clean, seed)`` applied to
clean images (``corpus:benchmark`` or a folder), or from a folder of ready pairs
(``paired:DIR`` with ``DIR/inputs`` and ``DIR/targets`` holding files with the same names).
Everything streams image by image; memory does not grow with the set size except for the
2048-d features FID/KID need.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from evaluation.comparison import ComparisonBuilder
from evaluation.errors import EvaluationError
from evaluation.features import FeatureNetwork
from evaluation.metrics import MetricSettings, build_metric
from evaluation.results import ExtractionTable, ExtractionTestSet, GridRow, ImageGrid, ModelRef, ScoreTests
from evaluation.stats import tost_equivalence, welch_ttest
from translators.codecs import read_image, write_image
from translators.corpus import NamedImage, check_spec, image_files, load_images
from translators.errors import CorpusError, ImageError

log = logging.getLogger(__name__)

Translator = Callable[[torch.Tensor], torch.Tensor]
PairMaker = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
DEFAULT_METRICS = ("psnr", "ssim", "ms_ssim")


@dataclass
class Pair:
    """One test image: ``input`` ``(1, 3, h, w)`` and ``target`` ``(1, 3, s*h, s*w)`` in [0, 1]."""

    name: str
    input: torch.Tensor
    target: torch.Tensor


@dataclass
class PairSet:
    """A named stream of pairs. ``spec`` records where they came from (for the report)."""

    name: str
    spec: str
    pairs: Callable[[], Iterator[Pair]]
    source: str = ""


@dataclass
class KIDSettings:
    """KID subset settings (``subset_size`` is capped at the set size)."""

    subsets: int = 100
    subset_size: int = 1000
    seed: int = 0


def as_translator(model: nn.Module | Translator, device: str | torch.device = "cpu") -> Translator:
    """Wrap a module or callable as ``(1, 3, h, w) -> (1, 3, H, W)`` float32 in [0, 1], no gradients."""
    dev = torch.device(device)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            y = model(x.to(dev, torch.float32))
        if not isinstance(y, torch.Tensor) or y.ndim != 4:
            raise EvaluationError(f"a model returned {type(y).__name__}, expected a (N, 3, H, W) tensor")
        return y.detach().float().cpu().clamp(0, 1)

    return run


def _crop_multiple(x: torch.Tensor, m: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    return x[..., : h - h % m, : w - w % m]


def recipe_pairs(
    name: str,
    spec: str,
    make_pair: PairMaker,
    scale: int = 1,
    input_multiple: int = 1,
    seed: int = 0,
    max_side: int | None = None,
    images_seed: int | None = None,
) -> PairSet:
    """Pairs from clean images (``corpus:SPLIT`` or a folder) and a zoo recipe's ``make_pair``.

    Clean images are cropped (bottom/right) so the input side is a multiple of ``input_multiple``
    (the models' ``size_multiple``) and the target a multiple of ``scale * input_multiple``. Image ``i``
    gets ``make_pair(clean, seed + i)`` (the noise seed of denoising recipes).
    """
    m = max(1, scale) * max(1, input_multiple)
    check_spec(spec)  # a typo fails now, not after the other sets were scored

    def gen() -> Iterator[Pair]:
        kwargs = {"seed": images_seed} if images_seed is not None else {}
        images: list[NamedImage] = load_images(spec, max_side=max_side, **kwargs)
        for i, im in enumerate(images):
            clean = _crop_multiple(im.image, m)
            if min(clean.shape[-2:]) < m:
                raise EvaluationError(f"{im.name}: too small for a multiple of {m} px")
            inp, target = make_pair(clean, seed + i)
            yield Pair(im.name, inp.float().clamp(0, 1), target.float().clamp(0, 1))

    return PairSet(name, spec, gen, source="recipe")


def folder_pairs(name: str, folder: str | Path, input_multiple: int = 1) -> PairSet:
    """Ready pairs from ``folder/inputs/X`` and ``folder/targets/X`` (same relative names, any image format).

    Inputs are cropped to a multiple of ``input_multiple`` and targets to the matching region.
    """
    root = Path(folder).expanduser()
    ind, tgd = root / "inputs", root / "targets"
    if not ind.is_dir() or not tgd.is_dir():
        raise CorpusError(f"{root}: a paired folder needs 'inputs/' and 'targets/' subfolders")

    def stems(d: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for f in image_files(d):  # hidden files and folders left out, as in every photo folder
            key = str(f.relative_to(d).with_suffix(""))
            if key in found:  # im0.jpg beside im0.png: which one pairs would be a guess
                raise CorpusError(f"{d}: {found[key].name} and {f.name} are the same image name; keep one")
            found[key] = f
        return found

    inputs, targets = stems(ind), stems(tgd)
    missing = sorted(set(inputs) ^ set(targets))
    if missing:
        raise CorpusError(f"{root}: {len(missing)} images lack a partner in inputs/ or targets/ (e.g. {missing[0]})")
    if not inputs:
        raise CorpusError(f"{root}: no images in inputs/")

    def gen() -> Iterator[Pair]:
        for key in sorted(inputs):
            try:
                inp, target = read_image(inputs[key]), read_image(targets[key])
            except ImageError as exc:
                raise CorpusError(f"{root}: {key}: {exc}") from None
            ih, iw = inp.shape[-2:]
            th, tw = target.shape[-2:]
            if th % ih or tw % iw or th // ih != tw // iw:
                raise CorpusError(f"{root}: {key}: target {th}x{tw} is not an integer scaling of input {ih}x{iw}")
            s = th // ih
            inp = _crop_multiple(inp, input_multiple)
            target = target[..., : inp.shape[-2] * s, : inp.shape[-1] * s]
            yield Pair(key, inp, target)

    return PairSet(name, f"paired:{root}", gen, source="folder")


def parse_image_set(text: str) -> tuple[str, str]:
    """``[LABEL=]SPEC`` -> ``(label, spec)``; the label defaults to the split or folder name."""
    if "=" in text and not text.startswith(("/", ".", "~")):
        label, spec = text.split("=", 1)
        if not label or not spec:
            raise EvaluationError(f"bad image set {text!r}; use LABEL=SPEC, e.g. benchmark=corpus:benchmark")
        return label, spec
    if text.startswith("corpus:"):
        return text.split(":", 1)[1], text
    if text.startswith("paired:"):
        return Path(text.split(":", 1)[1]).name or "paired", text
    return Path(text).name or text, text


class _Sampler:
    """Keeps the first ``limit`` images of a test set for the report's image grid; :meth:`write` saves them
    as PNGs once every set has been scored, so a run that fails half-way leaves the previous run's samples
    (which its results.json shows) untouched."""

    def __init__(self, out_dir: Path | None, base: Path | None, set_name: str, limit: int) -> None:
        self.dir = out_dir / _safe(set_name) if out_dir else None
        self.base = base
        self.limit = limit if out_dir else 0
        self.rows: list[GridRow] = []
        self._pending: list[tuple[Path, torch.Tensor]] = []

    def add(self, name: str, images: dict[str, torch.Tensor]) -> None:
        if len(self.rows) >= self.limit or self.dir is None:
            return
        paths = {}
        for col, t in images.items():
            p = self.dir / f"{_safe(name)}__{_safe(col)}.png"
            self._pending.append((p, t))
            paths[col] = str(p.relative_to(self.base)) if self.base else str(p)
        self.rows.append(GridRow(name=name, images=paths))

    def write(self) -> None:
        for p, t in self._pending:
            p.parent.mkdir(parents=True, exist_ok=True)
            write_image(t, p)
        self._pending.clear()


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def evaluate_extraction(
    victim: Translator,
    surrogate: Translator,
    test_sets: Sequence[PairSet],
    victim_ref: ModelRef,
    surrogate_ref: ModelRef,
    task: str,
    settings: MetricSettings | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    feature_network: FeatureNetwork | None = None,
    kid: KIDSettings | None = None,
    d_bound: float = 0.3,
    alpha: float = 0.05,
    confidence: float = 0.95,
    seed: int = 0,
    sample_dir: Path | None = None,
    results_dir: Path | None = None,
    n_samples: int = 3,
    on_image: Callable[[str, str], None] | None = None,
) -> tuple[ExtractionTable, list[ImageGrid]]:
    """Compute the A/B/C table for ``victim`` and ``surrogate`` on every test set.

    ``victim``/``surrogate`` map ``(1, 3, h, w)`` inputs to ``(1, 3, s*h, s*w)`` outputs in [0, 1]
    (see :func:`as_translator`). Sample images (input | victim | surrogate | ground truth) for the
    first ``n_samples`` images of each set go to ``sample_dir`` with paths relative to
    ``results_dir``. ``on_image(set_name, image_name)`` is called after each image (progress bars).
    """
    settings = settings or MetricSettings()
    kid = kid or KIDSettings()
    built = [build_metric(m, settings) for m in metrics]
    sides = {"A": ("victim", "ground_truth"), "B": ("surrogate", "victim"), "C": ("surrogate", "ground_truth")}
    tables: list[ExtractionTestSet] = []
    grids: list[ImageGrid] = []
    samplers: list[_Sampler] = []
    for ps in test_sets:
        builders = {
            c: ComparisonBuilder(out, ref, ps.name, built, settings, feature_network, kid.subsets, kid.subset_size,
                                 seed)
            for c, (out, ref) in sides.items()
        }
        sampler = _Sampler(sample_dir, results_dir, ps.name, n_samples)
        samplers.append(sampler)
        names: list[str] = []
        for pair in ps.pairs():
            images = {"victim": victim(pair.input), "surrogate": surrogate(pair.input), "ground_truth": pair.target}
            for who in ("victim", "surrogate"):
                if images[who].shape != pair.target.shape:
                    raise EvaluationError(
                        f"{ps.name}/{pair.name}: {who} output {tuple(images[who].shape)} does not match the ground "
                        f"truth {tuple(pair.target.shape)}; is the task right for this model?"
                    )
            feats = {k: feature_network(t).numpy() for k, t in images.items()} if feature_network else {}
            for c, (out, ref) in sides.items():
                builders[c].add(pair.name, images[out], images[ref], feats.get(out), feats.get(ref))
            names.append(pair.name)
            sampler.add(pair.name, {"input": pair.input, "victim": images["victim"],
                                    "surrogate": images["surrogate"], "ground truth": pair.target})
            if on_image:
                on_image(ps.name, pair.name)
        if not names:
            raise EvaluationError(f"image set {ps.name!r} ({ps.spec}) produced no pairs")
        comparisons = {c: b.finish(confidence) for c, b in builders.items()}
        tests = {}
        for m in built:
            a, c = builders["A"].values(m.name), builders["C"].values(m.name)
            if a and c:
                tests[m.name] = ScoreTests(metric=m.name, welch=welch_ttest(a, c, alpha),
                                           tost=tost_equivalence(a, c, d_bound, alpha))
        tables.append(ExtractionTestSet(name=ps.name, spec=ps.spec, n_images=len(names), image_names=names,
                                        cells=comparisons, tests=tests))
        if sampler.rows:
            grids.append(ImageGrid(title=f"{ps.name}: input | victim | surrogate | ground truth",
                                   columns=["input", "victim", "surrogate", "ground truth"], rows=sampler.rows))
        log.info("extraction %s: %d images", ps.name, len(names))
    cells = [cell for t in tables for cell in t.cells.values()]
    if not any(cell.metrics or cell.fid is not None for cell in cells):  # a report with no number in it
        notes = [n for cell in cells for n in cell.notes if "not computed on" in n]
        raise EvaluationError("no metric could be computed on any image" + (f" ({notes[0]})" if notes else ""))
    for sampler in samplers:
        sampler.write()
    table = ExtractionTable(victim=victim_ref, surrogate=surrogate_ref, task=task,
                            pair_source=", ".join(sorted({ps.source for ps in test_sets})),
                            d_bound=d_bound, alpha=alpha, test_sets=tables)
    return table, grids
