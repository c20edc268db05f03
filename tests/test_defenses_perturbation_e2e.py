"""FMD through the real service (uvicorn + Redis): a tiny surrogate trained on FMD-defended outputs is
measurably further from the clean victim than one trained on clean outputs; repeating a query returns the
very same defended bytes (per-input keyed start: averaging repeats gains nothing).

Calibration (same victim, data and training, 3 seeds, offline): clean-trained surrogates reach 42.2-42.9 dB
against the victim; FMD eps 16/255 costs them 1.7-4.3 dB (paired by seed), eps 8/255 only 0.3-0.9 dB,
eps 2/255 (the default, honest PSNR 42 dB) 0.01-0.07 dB. The test asserts a mean paired loss of 1 dB at
eps 16/255 over two seeds.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F

from defenses.poison import synthetic_images
from evaluation.metrics import psnr
from tests.servers import start_victim, tiny_models
from translators.archs.registry import build_arch
from translators.codecs import decode_image, encode_image

torch.set_num_threads(1)


def _train(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 150) -> torch.nn.Module:
    """A tiny DnCNN surrogate fitted with MSE (Adam 3e-3, batch 8) to ``x -> y``."""
    torch.manual_seed(seed)
    s = build_arch("dncnn", {"channels": 8, "depth": 3, "batch_norm": False})
    opt = torch.optim.Adam(s.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (8,), generator=g)
        loss = F.mse_loss(s(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return s.eval()


@pytest.mark.slow
def test_a_surrogate_trained_on_fmd_outputs_is_further_from_the_victim(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    models = tiny_models(tmp_path / "m", ("denoise",))
    fmd = {"name": "fmd", "eps": 16 / 255, "steps": 6}
    srv = start_victim(
        tmp_path,
        models=[{"name": "denoise", "source": str(models["denoise"]), "max_batch": 4}],
        tiers={"clean": {"rate": None}, "guarded": {"rate": None, "defenses": [fmd]}},
        keys={"honest": "clean", "thief": "guarded"},
        redis_url=redis_url, key_prefix=key_prefix,
    )
    g = torch.Generator().manual_seed(1)
    train_x, test_x = synthetic_images(24, 32, g), synthetic_images(16, 32, g)
    try:
        with srv.client() as c:

            def ask(who: str, x: torch.Tensor) -> torch.Tensor:
                r = c.post("/v1/models/denoise/translate", content=encode_image(x[None]),
                           headers={**srv.headers(who), "Content-Type": "image/png"})
                assert r.status_code == 200, r.text
                return decode_image(r.content)[0]

            clean_y = torch.stack([ask("honest", x) for x in train_x])
            fmd_y = torch.stack([ask("thief", x) for x in train_x])
            truth = torch.stack([ask("honest", x) for x in test_x])
            again = ask("thief", train_x[0])
        metrics = httpx.get(f"{srv.url}/metrics").text
    finally:
        srv.stop()
    assert torch.equal(again, fmd_y[0]), "per-input keyed start: a repeated query returns the same output"
    honest = psnr(fmd_y, clean_y, data_range=1.0).mean().item()
    assert 23.0 < honest < 27.0, f"eps 16/255 costs honest users ~24.5 dB, got {honest:.2f}"
    assert (fmd_y - clean_y).abs().max().item() <= 16 / 255 + 1.01 / 255  # eps + PNG rounding
    losses = []
    for seed in (0, 1):
        fitted = [_train(train_x, target, seed) for target in (clean_y, fmd_y)]
        with torch.no_grad():
            on_clean, on_fmd = (psnr(s(test_x).clamp(0, 1), truth, data_range=1.0).mean().item() for s in fitted)
        losses.append(on_clean - on_fmd)
    assert sum(losses) / len(losses) > 1.0, f"fidelity loss from FMD per seed: {losses} dB"
    assert 'heist_defense_seconds_count{defense="fmd",model="denoise"}' in metrics
