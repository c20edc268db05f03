"""AKD's privacy-utility trade-off on the tiny ``mia-edges`` victim, and how much NKID can resolve.

    .venv/bin/python bench/akd_sweep.py                          # the default grid (about 15 min on 2 cores)
    .venv/bin/python bench/akd_sweep.py --runs akd:400:96 akd:2000:96:10 dmp:2000:96

Each run ``METHOD:STEPS:N_PROXY[:LAMBDA]`` distils a student from the zoo's tiny ``mia-edges`` teacher
(:func:`defenses.model_level.akd.distill`, proxy images ``corpus:attacker``) and reports, with the outputs
computed in process (no API, no output defense):

- ``auc``: the reconstruction-loss attack (score = -L1 of the output against the true photo) over the
  victim's 24 members and 24 non-members (:func:`evaluation.privacy.roc_auc`);
- ``nkid_non_members``: NKID on the 24 non-members, as the membership campaign measures it;
- ``nkid_heldout``: NKID on ``--heldout`` edge -> photo pairs of ``corpus:benchmark`` (the same task, never
  seen by teacher or student), for three KID subset seeds.

For the teacher it also reports NKID on disjoint 24-pair slices of the held-out set: the spread of the
number the campaign reads, i.e. what a 24-image NKID can tell apart. NKID's network is
:func:`evaluation.features.resolve_feature_network` (InceptionV3 when its weights are found, else the
offline random-weight VGG16). Prints JSON and writes ``bench/results/akd_sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import exit_on_sigterm  # noqa: E402

from attacker.mia import load_candidates  # noqa: E402
from defenses.model_level.akd import LAMBDA_L1, distill  # noqa: E402
from evaluation.features import extract_features, resolve_feature_network  # noqa: E402
from evaluation.fid import black_features, nkid_result  # noqa: E402
from evaluation.privacy import roc_auc  # noqa: E402
from translators.checkpoint import load_model, read_card  # noqa: E402
from translators.files import atomic_write_json  # noqa: E402
from translators.zoo import build  # noqa: E402
from translators.zoo.membership import edge_pairs  # noqa: E402

log = logging.getLogger("bench.akd_sweep")
DEFAULT_RUNS = ["akd:400:96", "akd:800:96", "akd:2000:96", "akd:2000:48", "dmp:2000:96"]


def _outputs(model: torch.nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x).clamp(0, 1) for x in xs]


class _NKID:
    """NKID against one fixed reference set, its features (and the black images') extracted once."""

    def __init__(self, network: Any, reference: list[torch.Tensor]) -> None:
        self.network = network
        self.ref = extract_features(network, reference)
        self.black = black_features(network, reference[0][:1], len(reference))

    def features(self, images: list[torch.Tensor]) -> np.ndarray:
        return extract_features(self.network, images)

    def __call__(self, feats: np.ndarray, seed: int, rows: slice = slice(None)) -> float:
        ref, black = self.ref[rows], self.black[rows]
        size = max(2, len(ref) // 2)  # the campaign's setting: 10 subsets of half the set
        return round(nkid_result(feats, ref, black, self.network.info, 10, size, seed).nkid_percent, 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="METHOD:STEPS:N_PROXY[:LAMBDA] (method akd|dmp)")
    ap.add_argument("--heldout", type=int, default=120, help="held-out pairs for the large-sample NKID")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "akd_sweep.json")
    args = ap.parse_args(argv)
    exit_on_sigterm()  # servers stopped, temporary folders removed on SIGTERM too
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = []
    for r in args.runs:
        parts = r.split(":")
        if len(parts) not in (3, 4) or parts[0] not in ("akd", "dmp"):
            ap.error(f"bad run {r!r}: expected METHOD:STEPS:N_PROXY[:LAMBDA] with METHOD akd or dmp")
        runs.append((parts[0], int(parts[1]), int(parts[2]), float(parts[3]) if len(parts) == 4 else LAMBDA_L1))
    teacher = build("mia-edges", "tiny")
    split = read_card(teacher).model_extra["membership"]
    side = int(split["members"]["side"])
    mem = load_candidates(split["members"]["dir"], "members")
    non = load_candidates(split["non_members"]["dir"], "non-members")
    held = edge_pairs("corpus:benchmark", side, args.heldout, seed=args.seed + 5)
    network = resolve_feature_network(None, None)
    nkid_non, nkid_held = _NKID(network, [c.y for c in non]), _NKID(network, [y for _, y in held])
    log.info("NKID network: %s; %d members, %d non-members, %d held-out pairs", network.info.label, len(mem),
             len(non), len(held))

    def evaluate(path: Path) -> dict[str, Any]:
        model = load_model(path).module.eval()
        cand = _outputs(model, [c.x for c in mem + non])
        scores = [-float((o - c.y).abs().mean()) for o, c in zip(cand, mem + non, strict=True)]
        held_feats = nkid_held.features(_outputs(model, [x for x, _ in held]))
        return {"auc": round(roc_auc(scores, [1] * len(mem) + [0] * len(non)), 4),
                "nkid_non_members": nkid_non(nkid_non.features(cand[len(mem):]), args.seed),
                "nkid_heldout": [nkid_held(held_feats, s) for s in range(3)], "_feats": held_feats}

    t = evaluate(teacher)
    feats, n24 = t.pop("_feats"), len(non)
    t["nkid_heldout_slices_of_24"] = [nkid_held(feats[i : i + n24], args.seed, slice(i, i + n24))
                                      for i in range(0, len(feats) - n24 + 1, n24)]
    log.info("teacher: %s", t)
    rows = []
    with tempfile.TemporaryDirectory(prefix="heist-akd-sweep-") as tmp:
        for method, steps, n_proxy, lam in runs:
            t0 = time.perf_counter()
            path = distill(teacher, Path(tmp) / f"{method}-{steps}-{n_proxy}-{lam:g}.safetensors", name="student",
                           adversarial=method == "akd", steps=steps, seed=args.seed, n_proxy=n_proxy, lambda_l1=lam)
            train_s = time.perf_counter() - t0
            row = {"method": method, "steps": steps, "n_proxy": n_proxy,
                   "lambda_l1": lam if method == "akd" else None, "train_s": round(train_s, 1), **evaluate(path)}
            row.pop("_feats")
            log.info("%s", row)
            rows.append(row)
    result = {"settings": {"victim": "mia-edges", "zoo_profile": "tiny", "side": side, "members": len(mem),
                           "non_members": len(non), "heldout_pairs": len(held), "heldout_images": "corpus:benchmark",
                           "proxy_images": "corpus:attacker", "feature_network": network.info.label,
                           "seed": args.seed, "attack": "-L1 reconstruction loss, outputs in process"},
              "teacher": t, "students": rows}
    atomic_write_json(args.out, result, durable=False)
    print(json.dumps(result, indent=2))  # noqa: T201 - the benchmark's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
