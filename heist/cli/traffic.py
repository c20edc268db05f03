"""``heist traffic benign``: customers sending their photos to the victim (to calibrate the query monitor)."""

from __future__ import annotations

import asyncio
from collections import Counter

import typer

from heist.cli.common import console, seed_option
from translators.errors import HeistError

app = typer.Typer(help="Synthetic traffic against the victim API.", no_args_is_help=True)


@app.command("benign")
def benign(
    url: str = typer.Option(..., "--url", help="Victim API base URL."),
    model: str = typer.Option(..., "--model", help="Model name as listed by GET /v1/models."),
    admin_key: str = typer.Option(..., "--admin-key", envvar="HEIST_ADMIN_KEY",
                                  help="Admin key: one key per customer is created through the admin API."),
    images: str = typer.Option("corpus:victim", help="Photos: corpus:victim|attacker|benchmark|all or a folder."),
    clients: int = typer.Option(5, min=1, help="Customers at once."),
    photos: int = typer.Option(2, min=1, help="Distinct photos per customer."),
    allow_shared: bool = typer.Option(False, "--allow-shared",
                                      help="Let customers share photos when the pool is too small (the monitor "
                                           "links keys that share photos: they look like one thief's Sybils)."),
    tier: str = typer.Option("free", help="Tier of the customers' keys."),
    time_scale: float = typer.Option(1.0, min=0.0, help="Multiply think times (0 = no pauses)."),
    prefix: str = typer.Option("benign", help="Customer names are PREFIX-NNN."),
    seed: int = seed_option("photo choice, sizes and think times"),
) -> None:
    """Distinct photos at varied sizes, retries, re-uploads and bursts from many customers at once."""
    from attacker.benign import BenignParams, plan_benign, run_benign
    from attacker.client import VictimClient
    from evaluation.monitor_eval import make_keys
    from translators.corpus import load_images

    ims = load_images(images)
    if not ims:
        raise HeistError(f"no photos in {images}")
    if len(ims) < clients * photos and not allow_shared:
        raise HeistError(
            f"{len(ims)} photos in {images} for {clients} customers x {photos} photos: customers would share "
            "photos, and the monitor links keys that share photos (it would flag them as one thief's Sybil keys); "
            "lower --clients or --photos, give more photos (--images corpus:all or a folder), or pass "
            "--allow-shared to send exactly that")

    async def go() -> dict[str, list]:  # type: ignore[type-arg]
        async with VictimClient(url) as vc:
            info = await vc.model_info(model)
        plan = plan_benign(ims, info, BenignParams(clients=clients, photos_per_client=photos), seed, prefix)
        keys = await make_keys(url, admin_key, [c.name for c in plan], tier)
        return await run_benign(url, model, keys, plan, time_scale)

    results = asyncio.run(go())
    codes = Counter(o.code or str(o.status) for outs in results.values() for o in outs)
    total = sum(len(v) for v in results.values())
    console.print(f"{len(results)} customers sent {total} requests: {dict(codes)}", highlight=False)
