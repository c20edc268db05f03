"""The query monitor's logic, free of HTTP and storage: the crop-tolerant source embedding
(:mod:`.embedding`), per-client state and signals (:mod:`.scoring`), cross-key linking (:mod:`.linking`)
and the engine that folds log entries into risk and escalation levels (:mod:`.engine`).
The service side (consuming the query log, Redis state, admin routes) is ``victim_service.monitor``."""

from defenses.monitor.config import EscalationStep, MonitorConfig, SignalParams, SignalWeights
from defenses.monitor.engine import MonitorEngine
from defenses.monitor.scoring import ClientState, Observation

__all__ = ["ClientState", "EscalationStep", "MonitorConfig", "MonitorEngine", "Observation", "SignalParams",
           "SignalWeights"]
