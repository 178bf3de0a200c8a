"""Explicit plugin registry: type name -> plugin class (the class is its own factory).

Every plugin type is registered in `register_all()` and nowhere else (plugin modules import only the
contracts), so importing a plugin module has no side effects and the list of types is greppable in
one place.
"""
from __future__ import annotations

import re

from lenpred.router.interfaces import Plugin, Role
from lenpred.router.plugins.admission.predicted_kv import PredictedKVAdmitter
from lenpred.router.plugins.batching.fcfs import FCFSBatcher
from lenpred.router.plugins.batching.length_bucket import LengthBucketBatcher
from lenpred.router.plugins.batching.lpt import LPTBatcher
from lenpred.router.plugins.ordering.fcfs import FCFSOrderer
from lenpred.router.plugins.ordering.predicted_srpt import PredictedSRPTOrderer
from lenpred.router.plugins.picking.max_score import MaxScorePicker
from lenpred.router.plugins.picking.weighted_random import WeightedRandomPicker
from lenpred.router.plugins.preemption.rebalance import RebalancePreemptor
from lenpred.router.plugins.scoring.least_load import LeastLoadScorer
from lenpred.router.plugins.scoring.predicted_load import PredictedLoadScorer
from lenpred.router.plugins.scoring.prefix_affinity import PrefixAffinityScorer
from lenpred.router.plugins.scoring.round_robin import RoundRobinScorer

_TYPE_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_REGISTRY: dict[str, type[Plugin]] = {}


def register(type_name: str, factory: type[Plugin]) -> None:
    """Register `factory` (a Plugin subclass) under a kebab-case type name ending in its role."""
    if not _TYPE_NAME.match(type_name) or not type_name.endswith("-" + factory.role.value):
        raise ValueError(f"plugin type {type_name!r} must be kebab-case and end in "
                         f"'-{factory.role.value}'")
    if _REGISTRY.get(type_name, factory) is not factory:
        raise ValueError(f"plugin type {type_name!r} is already registered")
    factory.type_name = type_name
    _REGISTRY[type_name] = factory


def lookup(type_name: str) -> type[Plugin] | None:
    register_all()
    return _REGISTRY.get(type_name)


def types(role: Role | None = None) -> dict[str, type[Plugin]]:
    register_all()
    return {k: v for k, v in sorted(_REGISTRY.items()) if role is None or v.role == role}


def register_all() -> None:
    """Register every built-in plugin type (idempotent)."""
    if _REGISTRY:
        return
    register("predicted-kv-admitter", PredictedKVAdmitter)
    register("fcfs-orderer", FCFSOrderer)
    register("predicted-srpt-orderer", PredictedSRPTOrderer)
    register("predicted-load-scorer", PredictedLoadScorer)
    register("prefix-affinity-scorer", PrefixAffinityScorer)
    register("least-load-scorer", LeastLoadScorer)
    register("round-robin-scorer", RoundRobinScorer)
    register("max-score-picker", MaxScorePicker)
    register("weighted-random-picker", WeightedRandomPicker)
    register("fcfs-batcher", FCFSBatcher)
    register("length-bucket-batcher", LengthBucketBatcher)
    register("lpt-batcher", LPTBatcher)
    register("predicted-rebalance-preemptor", RebalancePreemptor)
