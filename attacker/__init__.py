"""The attacker: a separate client that knows only the victim's URL, its API key(s), the model name and
``GET /v1/models``. It never imports ``victim_service`` or ``defenses``.

Public functions (see ``docs/attacker.md``)::

    from attacker import harvest, train_surrogate, imitate

    h = harvest(url, key, "sr4x", "runs/a1", images="corpus:attacker", strategy="crops", budget=200)
    t = train_surrogate("runs/a1", arch="srresnet", profile="small")
    i = imitate(url, key, "denoise25", "one.png", "runs/one")
"""

from attacker import surrogates as _surrogates  # noqa: F401 - registers surrogate kinds
from attacker.client import ClientConfig, VictimClient
from attacker.errors import AttackError
from attacker.harvest import HarvestConfig, HarvestResult, harvest, harvest_async
from attacker.imitate import ImitationResult, imitate
from attacker.pairstore import PairRecord, PairStore
from attacker.progress import ProgressHook
from attacker.runinfo import read_run
from attacker.strategies import STRATEGY_REGISTRY, StrategyParams
from attacker.surrogates import SURROGATE_REGISTRY
from attacker.train import TrainConfig, TrainResult, train_surrogate
from attacker.victim_info import ModelInfo

__all__ = [
    "STRATEGY_REGISTRY",
    "SURROGATE_REGISTRY",
    "AttackError",
    "ClientConfig",
    "HarvestConfig",
    "HarvestResult",
    "ImitationResult",
    "ModelInfo",
    "PairRecord",
    "PairStore",
    "ProgressHook",
    "StrategyParams",
    "TrainConfig",
    "TrainResult",
    "VictimClient",
    "harvest",
    "harvest_async",
    "imitate",
    "read_run",
    "train_surrogate",
]
