"""``heist monitor``: the query monitor's view of clients (risk, flag, level, signals), and its evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from heist.cli.common import check_out_file, choice, console, err_console, print_table, seed_option
from translators.errors import HeistError

TASKS = ("sr", "denoise", "style", "edges2photo")  # translators.zoo.recipes.Task, without importing torch here

if TYPE_CHECKING:
    from translators.corpus import NamedImage

app = typer.Typer(help="The victim's query monitor: per-client extraction risk and escalation.",
                  no_args_is_help=True)

UrlOpt = typer.Option(..., "--url", help="Victim API base URL, e.g. http://127.0.0.1:8000.")
AdminOpt = typer.Option(..., "--admin-key", envvar="HEIST_ADMIN_KEY", help="The victim's admin key.")


def _monitor_status(url: str, admin_key: str, client: str | None) -> Any:
    """The admin API's answer: one client's risk row, or every client's. One-line errors
    (:class:`attacker.client.VictimAdminClient`)."""
    import asyncio

    from attacker.client import VictimAdminClient

    async def go() -> Any:
        async with VictimAdminClient(url, admin_key) as admin:
            return await admin.client_risk(client) if client else await admin.clients_status()

    return asyncio.run(go())


@app.command("status")
def status(
    url: str = UrlOpt,
    admin_key: str = AdminOpt,
    client: str | None = typer.Option(None, "--client", help="Only this client, with all its signals (the "
                                                          "table of all clients leaves out signals at 0)."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON the service returned."),
) -> None:
    """Risk, flag, level, queries and signals per client (GET /v1/admin/clients, or /v1/admin/clients/NAME/risk)."""
    data = _monitor_status(url, admin_key, client)
    if as_json:
        print(json.dumps(data, indent=2))  # noqa: T201 - machine-readable output on stdout
        return
    rows = [data] if client else data["clients"]
    table = Table()
    for col in ("client", "tier", "risk", "flagged", "level (monitor)", "level in force", "queries", "flagged at",
                "signals", "linked"):
        table.add_column(col)
    for c in rows:
        sig = ", ".join(f"{k}={v:.2f}" for k, v in sorted(c["signals"].items()) if v or client)  # one: all
        force = c.get("level_in_force")
        table.add_row(c["client"], c.get("tier") or "-", f"{c['risk']:.3f}", "yes" if c["flagged"] else "no",
                      str(c["level"]), "-" if force is None else str(force), str(c["queries"]),
                      str(c["flagged_at_query"] or "-"), sig, ", ".join(c.get("linked", [])))
    print_table(table)


CALIBRATION_SEEDS = 30
"""Long benign customers (each sends every benign photo once, at random sizes) the thresholds come from."""
CALIBRATION_PERCENTILE = 0.5
"""Benign percentile of the calibrated thresholds (docs/monitor.md, Calibration)."""
CALIBRATED = ("knn_threshold", "dup_distance", "prada_delta")


def _benign_images(spec: str, extra: str | None) -> list[NamedImage]:
    from translators.corpus import load_images

    images = load_images(spec) + (load_images(extra) if extra else [])
    if len(images) < 2:
        raise HeistError(f"{spec}: need at least 2 benign images to calibrate on (got {len(images)})")
    return images


def check_task_scale(task: str, scale: int | None) -> int:
    """The scale for ``--task`` (``--scale`` or its default: 4 for sr, else 1); a one-line error for a pair no
    victim has (sr enlarges; the others keep the size)."""
    if scale is None:
        return 4 if task == "sr" else 1
    if task == "sr" and scale < 2:
        raise HeistError(f"--task sr --scale {scale}: super-resolution enlarges; give its factor (--scale 2, 4, ...)")
    if task != "sr" and scale != 1:
        raise HeistError(f"--task {task} --scale {scale}: a {task} victim keeps the image size; use --scale 1")
    return scale


def calibration_toml(cal: dict[str, Any], source: str, task: str, scale: int) -> str:
    """The ``[monitor.signals]`` table of a calibration (:func:`evaluation.monitor_eval.calibrate`), with
    comments saying what each value was measured on; paste it into the victim's settings file."""
    from defenses.monitor.config import SignalParams

    default = SignalParams()
    p = cal["params"]
    lines = [f"# heist monitor calibrate: {source} ({task} x{scale}), {cal['percentile']} percentile of benign",
             f"# distances between distinct images ({cal['knn_values']} k-NN, {cal['dmin_values']} nearest-neighbour,",
             f"# {cal['w_values']} Shapiro-Wilk values); paste into the victim's settings file.",
             "[monitor.signals]"]
    for name in CALIBRATED:
        note = f"default {getattr(default, name)}"
        if name == "dup_distance" and not cal["dup_distance_lowered"]:
            note += f"; benign percentile {cal['dmin_percentile']} is wider, the default is kept"
        if name == "prada_delta" and not cal["w_values"]:
            note += f"; not calibrated: fewer than {default.prada_min + 1} distinct images"
        if name == "knn_threshold" and not cal["knn_values"]:
            note += f"; not calibrated: fewer than {default.k + 1} distinct images"
        lines.append(f"{name} = {p[name]}  # {note}")
    return "\n".join(lines) + "\n"


@app.command("calibrate")
def calibrate_cmd(
    out: Path = typer.Option(..., "--out", help="TOML file to write: a \\[monitor.signals] table for the settings."),
    benign_images: str = typer.Option("corpus:victim", help="Images your honest customers send (spec or folder)."),
    extra_benign: str | None = typer.Option("corpus:benchmark", help="More benign images (spec or folder); "
                                            "'' for none."),
    task: str = typer.Option("sr", callback=choice(*TASKS),
                             help="Task of the victim the traffic is shaped for: sr, denoise, style or edges2photo."),
    scale: int | None = typer.Option(None, min=1, help="The victim's scale (default: 4 for sr, else 1)."),
    percentile: float = typer.Option(CALIBRATION_PERCENTILE, min=0.01, max=50.0,
                                     help="Benign percentile of the thresholds."),
    seeds: int = typer.Option(CALIBRATION_SEEDS, min=1, help="Long benign customers to measure."),
) -> None:
    """Set the monitor's thresholds (k-NN distance, near-duplicate radius, PRADA's delta) on benign images."""
    from attacker.victim_info import ModelInfo
    from evaluation.monitor_eval import calibrate
    from translators.files import atomic_write_bytes

    scale = check_task_scale(task, scale)
    check_out_file(out, "monitor-signals.toml")
    ben = _benign_images(benign_images, extra_benign or None)
    cal = calibrate(ben, ModelInfo(name="offline", task=task, scale=scale, min_side=8), seeds=seeds,
                    percentile=percentile)
    source = benign_images + (f" + {extra_benign}" if extra_benign else "")
    table = calibration_toml(cal, f"{len(ben)} images of {source}", task, scale)
    atomic_write_bytes(out, table.encode())
    for line in table.splitlines():
        if line.split(" ", 1)[0] in CALIBRATED:
            console.print(line, highlight=False, soft_wrap=True)
    if (note := small_sample_note(cal)) is not None:
        err_console.print(f"[yellow]warning:[/yellow] {note}", highlight=False, soft_wrap=True)
    if cal["dup_distance_lowered"]:
        console.print(f"dup_distance lowered to the benign {percentile} percentile: distinct images of this "
                      "population sit closer than one photo's rescaled copies, so reuse sees less", highlight=False)
    console.print(f"-> {out}", highlight=False)


def small_sample_note(cal: dict[str, Any]) -> str | None:
    """Why a calibration's thresholds rest on too few benign values: a ``p`` percentile of ``n < 100 / p``
    values is (nearly) their minimum, set by one customer's luck; None when every threshold has enough."""
    p = float(cal["percentile"])
    need = math.ceil(100.0 / p)
    what = {"knn": "k-NN distances", "w": "Shapiro-Wilk W values", "dmin": "nearest-neighbour distances"}
    short = {k: int(cal[f"{k}_values"]) for k in what if 0 < int(cal[f"{k}_values"]) < need}
    if not short:
        return None
    counts = ", ".join(f"{n} {what[k]}" for k, n in short.items())
    return (f"the {p:g} percentile needs at least {need} benign values, this calibration had {counts}: those "
            "thresholds are about the smallest benign value seen; give more benign images (--benign-images, "
            "--extra-benign) or more customers (--seeds), or a larger --percentile")


def _live_run_id(seed: int) -> str:
    """Prefix of a live run's key names: ``evalSEED-HHMMSS`` (UTC), new for every run, so a second run against
    the same victim creates fresh keys instead of failing on the first run's names."""
    import datetime as dt

    return f"eval{seed}-{dt.datetime.now(dt.UTC):%H%M%S}"


@app.command("eval")
def eval_cmd(
    out: Path = typer.Option(..., "--out", help="JSON file to write (atomically)."),
    task: str = typer.Option("sr", callback=choice(*TASKS),
                             help="Task of the victim the traffic is shaped for: sr, denoise, style or edges2photo."),
    scale: int | None = typer.Option(None, min=1, help="The victim's scale (default: 4 for sr, else 1)."),
    url: str | None = typer.Option(
        None, "--url", help="Live victim (monitor on); default: offline engine. Each live run creates its own keys "
        "(evalSEED-HHMMSS-...); the victim's monitor still remembers earlier runs' photos."),
    admin_key: str | None = typer.Option(None, "--admin-key", envvar="HEIST_ADMIN_KEY",
                                         help="Admin key of the live victim (--url runs create keys)."),
    model: str | None = typer.Option(None, "--model", help="Model name (live runs)."),
    benign_images: str = typer.Option("corpus:victim", help="Photos of benign customers (spec or folder)."),
    extra_benign: str | None = typer.Option("corpus:benchmark", help="More benign photos (spec or folder)."),
    attacker_images: str = typer.Option("corpus:attacker", help="The attackers' photos."),
    queries: int = typer.Option(50, min=1, help="Queries per attacker."),
    customers: int = typer.Option(100, min=1, help="Independent long benign customers for the FPR (offline)."),
    seed: int = seed_option("the traffic plans"),
) -> None:
    """Calibrate on benign traffic, then benign population vs every attacker (plain and evasive)."""
    import asyncio

    from attacker.benign import BenignParams
    from attacker.victim_info import ModelInfo
    from defenses.monitor.config import MonitorConfig, SignalParams
    from evaluation.monitor_eval import (
        benign_customers_fpr,
        calibrate,
        default_attackers,
        evaluate_live,
        evaluate_offline,
        long_customers_summary,
    )
    from translators.corpus import load_images
    from translators.files import atomic_write_json

    if not url and model:  # (not --admin-key: it may come from $HEIST_ADMIN_KEY)
        raise HeistError("--model applies to a live victim: add --url (the offline engine needs no model; "
                         "--task and --scale shape its traffic)")
    scale = check_task_scale(task, scale)
    check_out_file(out, "monitor-eval.json")
    ben = _benign_images(benign_images, extra_benign)
    att = load_images(attacker_images)
    bp = BenignParams(clients=max(1, len(ben) // 3), photos_per_client=3)
    if url:
        if not admin_key or not model:
            raise HeistError("--url needs --admin-key and --model")
        result = asyncio.run(evaluate_live(url, admin_key, model, ben, att, default_attackers(queries), bp, seed,
                                           time_scale=0.02, run_id=_live_run_id(seed)))
    else:
        info = ModelInfo(name="offline", task=task, scale=scale, min_side=8)
        cal = calibrate(ben, info, seeds=CALIBRATION_SEEDS, percentile=CALIBRATION_PERCENTILE)
        cfg = MonitorConfig(signals=SignalParams(**cal["params"]))
        result = evaluate_offline(ben, att, info, cfg, default_attackers(queries), bp, seed)
        result["calibration"] = cal
        result["benign_customers"] = benign_customers_fpr(ben, info, cfg, customers=customers, seed=seed + 1000)
    atomic_write_json(out, result)
    for a in result["attackers"]:
        q = a["queries_to_detection"]
        seen = f"detected after {q} queries" if q is not None else f"not detected in {a.get('queries', '?')} queries"
        console.print(f"{a['name']:>20}: {seen} (keys flagged {a['flagged_keys']}/{a['keys']})", highlight=False)
    console.print(f"benign: {result['benign']['flagged']}/{result['benign']['clients']} flagged -> {out}",
                  highlight=False)
    if result.get("benign_customers"):
        console.print(long_customers_summary(result["benign_customers"]), highlight=False)
