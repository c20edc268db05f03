"""``heist attack``: harvest pairs from a victim API, train surrogates, imitate from one example.

Thin glue over :mod:`attacker` (see ``docs/attacker.md``). User mistakes raise
:class:`translators.errors.HeistError` subclasses, which ``heist`` prints as one line (exit 2). A
harvest that stops early but cleanly (every key's quota used up, pixel budget spent) exits 3.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import typer
from rich.progress import Progress, TaskID
from rich.table import Table

from heist.cli.common import console, device_option, err_console, print_table, progress, seed_option
from translators.errors import HeistError

app = typer.Typer(
    help="Steal a translation model through its API: harvest pairs, train surrogates, imitate from one example.",
    no_args_is_help=True,
)

EXIT_STOPPED = 3


class RichProgressHook:
    """:class:`attacker.progress.ProgressHook` drawing rich progress bars (``heist.cli.common.progress``)."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.tasks: dict[str, TaskID] = {}

    def start(self, task: str, total: int | None, done: int = 0) -> None:
        if task in self.tasks:
            self.bar.reset(self.tasks[task], total=total, completed=done)
        else:
            self.tasks[task] = self.bar.add_task(task, total=total, completed=done, info="")

    def advance(self, task: str, n: int = 1, info: str = "") -> None:
        if task in self.tasks:
            self.bar.update(self.tasks[task], advance=n, info=info)

    def finish(self, task: str) -> None:
        if task in self.tasks:
            self.bar.refresh()


def _quiet_http() -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def _auto_int(value: str, name: str) -> int | str:
    if value == "auto":
        return "auto"
    try:
        v = int(value)
    except ValueError:
        raise HeistError(f"--{name} must be 'auto' or a positive integer (got {value!r})") from None
    if v < 1:
        raise HeistError(f"--{name} must be 'auto' or a positive integer (got {value!r})")
    return v


def _range(value: str, flag: str, words: str = "") -> tuple[float, float]:
    """``"S"`` -> ``(S, S)``, ``"LO:HI"`` -> ``(LO, HI)``; anything else is a one-line error naming ``flag``."""
    try:
        parts = [float(p) for p in value.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise HeistError(f"{flag} must be {words}S or LO:HI (got {value!r})")
    return (parts[0], parts[-1])


def _noise(value: str) -> tuple[float, float] | str | None:
    if value in ("auto", "none"):
        return None if value == "none" else "auto"
    return _range(value, "--noise-sigma", "auto, none, ")


def _strategy_names() -> str:
    """The registered query strategies, for ``--strategy`` help ("a, b or c")."""
    from attacker.strategies import STRATEGY_REGISTRY

    names = STRATEGY_REGISTRY.names()
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)


def _keys(api_key: list[str]) -> list[str]:
    keys = [k.strip() for raw in api_key for k in raw.split(",") if k.strip()]
    if not keys:
        raise HeistError("give at least one --api-key (or set HEIST_API_KEY)")
    return keys


@app.command("models")
def models(url: str = typer.Option(..., "--url", help="Victim API base URL, e.g. http://127.0.0.1:8000.")) -> None:
    """List the victim's models and their public limits (GET /v1/models)."""
    from attacker.client import VictimClient

    _quiet_http()

    async def go() -> list[Any]:
        async with VictimClient(url) as c:
            return await c.models()

    table = Table(title=f"Models at {url}")
    for col in ("name", "task", "scale", "min_side", "size_multiple", "max_pixels", "max_bytes"):
        table.add_column(col)
    for m in asyncio.run(go()):
        table.add_row(m.name, m.task, str(m.scale), str(m.min_side), str(m.size_multiple), str(m.max_pixels),
                      str(m.max_bytes))
    print_table(table)


@app.command("harvest")
def harvest_cmd(
    url: str = typer.Option(..., "--url", help="Victim API base URL."),
    api_key: list[str] = typer.Option([], "--api-key", envvar="HEIST_API_KEY",
                                      help="API key; repeat (or comma-separate) for several keys (Sybil)."),
    model: str = typer.Option(..., "--model", help="Model name as listed by GET /v1/models."),
    out: Path = typer.Option(..., "--out", help="Run folder (created; an existing harvest there is resumed)."),
    images: str = typer.Option("corpus:attacker", help="corpus:victim|attacker|benchmark|all or a folder."),
    budget: int = typer.Option(100, min=1, help="Pairs to harvest."),
    budget_pixels: int | None = typer.Option(None, min=1, help="Also stop when this many input pixels are spent."),
    strategy: str = typer.Option("crops", help=f"Query strategy: {_strategy_names()}."),
    crop_size: str = typer.Option("auto", help="Crop/tile side in input pixels, or auto."),
    downscale: str = typer.Option("auto", help="Shrink photos by this factor first (auto = the model's scale)."),
    noise_sigma: str = typer.Option("auto", help="Gaussian noise sigma (0..255) added to queries: auto, none, "
                                                 "S or LO:HI (auto: 0:50 for denoise models)."),
    pool: int = typer.Option(16, min=1, help="Candidates per query (diversity strategy)."),
    zoom: str | None = typer.Option(None, help="Crop strategies: shrink each photo by a factor in LO:HI "
                                               "(0 < LO <= HI <= 1) before cutting the crop; off by default."),
    leaves: float = typer.Option(0.5, min=0.0, max=1.0,
                                 help="crops/tiles: share of the queries beyond what the photos hold (once "
                                      "they are used up) that are dead-leaves compositions of the photos; "
                                      "0 = crops only."),
    seed: int = typer.Option(0, help="Strategy seed (queries are deterministic in it)."),
    concurrency: int = typer.Option(8, min=1, help="Most requests in flight per key."),
    max_rate: float | None = typer.Option(None, "--max-rate", min=0.001,
                                          help="Requests/s per key at most, below what the victim allows (evasion: "
                                               "pace like a customer). A harvest resumes with any value."),
    max_retries: int = typer.Option(6, min=0, help="Retries per query on 5xx/timeouts."),
    fsync: bool = typer.Option(True, help="fsync every pair (crash-safe against power loss)."),
) -> None:
    """Harvest (input, output) pairs at the highest rate the victim's limits allow; resumable."""
    from attacker.harvest import harvest

    _quiet_http()
    params: dict[str, Any] = {"crop_size": _auto_int(crop_size, "crop-size"),
                              "downscale": _auto_int(downscale, "downscale"), "noise_sigma": _noise(noise_sigma),
                              "pool": pool}
    if zoom is not None:
        params["zoom"] = _range(zoom, "--zoom")
    params["leaves"] = leaves
    with progress(transient=True) as bar:
        result = harvest(url, _keys(api_key), model, out, images=images, strategy=strategy, strategy_params=params,
                         budget=budget, budget_pixels=budget_pixels, seed=seed, max_rate=max_rate,
                         client={"max_concurrency": concurrency, "max_retries": max_retries}, durable=fsync,
                         progress=RichProgressHook(bar))
    s = result.summary
    rate = s.get("steady_rate") or s.get("achieved_rate")
    allowed = s.get("allowed_rate_estimate")
    console.print(f"{result.pairs}/{result.budget} pairs in {out} · {s['queries_sent']} queries · "
                  f"{s['rate_limited_429']} rate-limited (429) · "
                  f"{f'{rate:.2f}/s' if rate else 'rate n/a'}"
                  f"{f' (limit estimated at ~{allowed:.2f}/s)' if allowed else ''}")
    if result.status == "stopped":
        err_console.print(f"[yellow]harvest stopped early: {result.stop_reason}[/yellow] "
                          f"({result.pairs} of {result.budget} pairs kept; run.json says more)")
        raise typer.Exit(EXIT_STOPPED)


def _train_options(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


@app.command("train")
def train_cmd(
    pairs: Path = typer.Option(..., "--pairs", help="Run folder (or its pairs/ folder)."),
    arch: str = typer.Option("auto", help="resunet, pix2pix, srresnet, unet-l2 or auto (try resunet and the "
                                          "paper's surrogate briefly, keep the better on held-out pairs)."),
    out: Path | None = typer.Option(None, "--out", help="Surrogate folder (default RUN/surrogate)."),
    profile: str = typer.Option("small", help="tiny, small, default or full."),
    steps: int | None = typer.Option(None, min=1, help="Most training steps (default: the profile's cap)."),
    time_budget: float = typer.Option(300.0, min=1.0, help="Seconds of training; it also stops earlier when "
                                                          "held-out fidelity stops improving."),
    batch_size: int | None = typer.Option(None, min=1, help="Crops per step (default: the profile's)."),
    patch: int | None = typer.Option(None, min=4, help="Crop side in input pixels."),
    align: int | None = typer.Option(None, min=1, help="Training crops start at multiples of this many input "
                                                       "pixels from each query's corner (default 8)."),
    augment: bool | None = typer.Option(None, "--augment/--no-augment",
                                        help="Flip and rotate training crops (default: off; a strided victim is "
                                             "not flip-equivariant)."),
    lr: float | None = typer.Option(None, min=0.0, help="Peak learning rate (default: the profile's)."),
    schedule: str = typer.Option("cosine", help="Learning rate: cosine (decays to 5% over the time budget) or "
                                                "plateau (constant between plateau drops)."),
    amp: bool = typer.Option(True, help="Mixed precision: float16 on CUDA, bfloat16 on CPUs with native "
                                        "bfloat16 (1.2-2x faster there), else float32."),
    seed: int = seed_option("initialisation, crops and the train/held-out split"),
    device: str = device_option(),
    workers: int = typer.Option(0, min=0, help="DataLoader worker processes."),
    threads: int | None = typer.Option(None, min=1, help="Torch CPU threads (default: torch's; on a busy "
                                                        "machine 1 can be much faster)."),
    val_every: int | None = typer.Option(None, min=1, help="Validate every N steps (default 50)."),
    checkpoint_every: int | None = typer.Option(None, min=1, help="Save resumable state every N steps."),
    restart: bool = typer.Option(False, help="Discard saved training state and start over."),
    counter: str = typer.Option("none", help="Counter-measure on harvested outputs: none, lowpass[:sigma=S], "
                                             "jpeg[:quality=Q], median[:size=K], aware[:amp=A]."),
) -> None:
    """Train a surrogate on harvested pairs (checkpoint + card), validating on held-out pairs; resumable."""
    from attacker.train import scored_on, train_surrogate

    with progress(transient=True) as bar:
        r = train_surrogate(pairs, out, progress=RichProgressHook(bar), **_train_options(
            arch=arch, profile=profile, steps=steps, time_budget=time_budget, batch_size=batch_size, patch=patch,
            align=align, augment=augment, lr=lr, schedule=schedule, amp=amp, seed=seed, device=device,
            workers=workers, threads=threads, val_every=val_every,
            checkpoint_every=checkpoint_every, restart=restart, counter=counter))
    f, b = r.fidelity, r.baseline
    console.print(f"surrogate {r.card.arch} ({r.summary['kind']}) -> {r.checkpoint}")
    def ssim(v: float | None) -> str:
        return f"{v:.4f}" if v is not None else "n/a (held-out images under 11 px)"

    console.print(f"{scored_on(r.held_out)} vs victim: PSNR {f['psnr']:.2f} dB, SSIM {ssim(f['ssim'])} · "
                  f"{r.summary['baseline_name']} baseline: {b['psnr']:.2f} dB, {ssim(b['ssim'])} · "
                  f"{r.images_per_s:.1f} images/s · stopped: {r.summary['stop_reason']} at step {r.steps}")
    if r.summary.get("auto"):
        console.print("auto: " + ", ".join(f"{k} {v:.2f} dB" for k, v in r.summary["auto"]["trial_psnr"].items())
                      + f" -> {r.summary['auto']['chosen']}")
    if r.summary.get("warning"):
        err_console.print(f"[bold red]WARNING: {r.summary['warning']}[/bold red]")


@app.command("imitate")
def imitate_cmd(
    url: str = typer.Option(..., "--url", help="Victim API base URL."),
    api_key: list[str] = typer.Option([], "--api-key", envvar="HEIST_API_KEY", help="API key."),
    model: str = typer.Option(..., "--model", help="Model name."),
    image: Path = typer.Option(..., "--image", exists=True, dir_okay=False, help="The one input image to send."),
    out: Path = typer.Option(..., "--out", help="Run folder."),
    add_noise: float | None = typer.Option(None, min=0.0, max=255.0, help="Add Gaussian noise (sigma, 0..255) first."),
    profile: str = typer.Option("small", help="U-Net size: tiny, small, default or full."),
    steps: int | None = typer.Option(None, min=1, help="Most training steps (default: the profile's cap)."),
    time_budget: float = typer.Option(300.0, min=1.0, help="Seconds of training; it also stops earlier when "
                                                          "held-out fidelity stops improving."),
    patch: int | None = typer.Option(None, min=4, help="Crop side in input pixels (default: the profile's)."),
    seed: int = seed_option("initialisation and crops"),
    device: str = device_option(),
    threads: int | None = typer.Option(None, min=1, help="Torch CPU threads (default: torch's)."),
) -> None:
    """Single-example imitation: one query, then an L2 U-Net trained on random crops of that pair."""
    from attacker.imitate import imitate
    from attacker.train import scored_on

    _quiet_http()
    with progress(transient=True) as bar:
        r = imitate(url, _keys(api_key), model, image, out, add_noise=add_noise, profile=profile, steps=steps,
                    seed=seed, device=device, progress=RichProgressHook(bar),
                    **_train_options(patch=patch, threads=threads, time_budget=time_budget))
    f, b = r.train.fidelity, r.train.baseline
    sh, sw = r.sent_size
    console.print(f"1 query -> surrogate {r.checkpoint} (image sent at {sw}x{sh})")
    console.print(f"{scored_on(r.train.held_out)} vs victim: PSNR {f['psnr']:.2f} dB "
                  f"({r.train.summary['baseline_name']} baseline {b['psnr']:.2f} dB)")
    if r.warning:
        err_console.print(f"[bold red]WARNING: {r.warning}[/bold red]")


@app.command("status")
def status_cmd(run: Path = typer.Argument(..., help="Run folder.")) -> None:
    """Print the run summary (run.json) without the long curves."""
    from attacker.runinfo import read_run

    if run.exists() and not run.is_dir():
        raise HeistError(f"{run}: not a folder (a file); give a run folder")
    data = read_run(run)
    if not data:
        raise HeistError(f"{run}: no run.json here")
    slim = json.loads(json.dumps(data))
    for section in ("train",):
        if section in slim:
            for k in ("loss_curve", "val_curve"):
                if k in slim[section]:
                    slim[section][k] = f"{len(slim[section][k])} points"
    if "harvest" in slim:
        slim["harvest"]["sessions"] = f"{len(slim['harvest'].get('sessions', []))} session(s)"
    console.print_json(json.dumps(slim))


@app.command("mia")
def mia_cmd(
    url: str = typer.Option(..., "--url", help="Victim API base URL."),
    api_key: str = typer.Option(..., "--api-key", envvar="HEIST_API_KEY", help="API key."),
    model: str = typer.Option(..., "--model", help="Model name as listed by GET /v1/models (same-size)."),
    members: Path = typer.Option(..., "--members", help="Candidate members: inputs/NAME.png + targets/NAME.png."),
    non_members: Path = typer.Option(..., "--non-members", help="Candidate non-members (same layout)."),
    out: Path = typer.Option(..., "--out", help="Output folder: scores.json, mia.json, roc.png."),
    reference: Path | None = typer.Option(None, "--reference", help="Reference checkpoint for the calibrated "
                                                                    "score (heist attack mia-reference)."),
    concurrency: int = typer.Option(4, min=1, help="Most requests in flight."),
) -> None:
    """Membership inference: score each (x, y) by the API output's reconstruction loss; AUC, TPR@FPR, ROC."""
    from attacker.files import check_out_folder
    from attacker.mia import load_candidates, load_reference, run_mia, write_scores
    from evaluation.privacy import fpr_resolution_note, membership_scores
    from evaluation.report.membership import roc_png

    _quiet_http()
    check_out_folder(out)  # every mistake fails before the first query
    m = load_candidates(members, "members")
    n = load_candidates(non_members, "non-members")
    ref = load_reference(reference, [*m, *n]) if reference else None
    with progress(transient=True) as bar:
        task = bar.add_task("membership queries", total=len(m) + len(n), info="")
        res = run_mia(url, api_key, model, m, n, reference=ref, concurrency=concurrency,
                      on_done=lambda: bar.advance(task))
    write_scores(res, out)
    scores = membership_scores(res.names, res.labels, res.scores)
    (out / "mia.json").write_text(json.dumps({k: v.model_dump(exclude={"per_candidate"}) for k, v in scores.items()},
                                             indent=1))
    roc_png({k: (v.roc.fpr, v.roc.tpr, v.auc) for k, v in scores.items()}, out / "roc.png")
    for k, v in scores.items():
        console.print(f"{k:>10}: AUC {v.auc:.3f} · TPR@1%FPR {v.tpr_at_fpr['0.01']:.3f} · "
                      f"TPR@0.1%FPR {v.tpr_at_fpr['0.001']:.3f}")
    if (note := fpr_resolution_note(len(n))) is not None:
        console.print(f"note: {note}", highlight=False)
    console.print(f"{res.queries} queries · scores in {out / 'scores.json'} · ROC {out / 'roc.png'}")


@app.command("mia-reference")
def mia_reference_cmd(
    out: Path = typer.Option(..., "--out", help="Checkpoint to write (.safetensors)."),
    images: str = typer.Option("corpus:attacker", help="Public images (never the victim's)."),
    side: int = typer.Option(32, min=16, help="Crop side (the candidates' size); a multiple of 16."),
    steps: int = typer.Option(300, min=1, help="Training steps."),
    seed: int = seed_option("initialisation and crops"),
) -> None:
    """Train the attacker's reference model on public edge -> photo pairs (difficulty calibration)."""
    from attacker.mia import train_reference

    console.print(f"reference model: {train_reference(images, side, steps, out, seed=seed)}")
