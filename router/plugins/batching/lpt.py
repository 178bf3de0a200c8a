"""lpt-batcher: balanced assignment of a known set of requests across continuous-batching replicas."""
from __future__ import annotations

from typing import Literal, Sequence

from pydantic import Field

from lenpred.router.interfaces import BatchPlan, Batcher, MicroBatch, PluginParameters, ReplicaView, RequestView
from lenpred.router.plugins.batching._assign import assign_lpt


class LPTBatcherParameters(PluginParameters):
    quantile: float = Field(0.5, ge=0.5, le=0.99)
    """Quantile of each prediction used as its work."""
    prompt_weight: float = Field(0.0, ge=0.0)
    """Work of a prompt token relative to a decoded token (prefill is cheap per token)."""
    order: Literal["longest-first", "shortest-first"] = "longest-first"
    """Order each replica receives its requests: longest-first finishes the set sooner (the long
    tail starts at once); shortest-first returns more results early."""


class LPTBatcher(Batcher):
    """Longest predicted first, each to the replica with the least predicted work so far; every
    request is released at once and the engine's continuous batching runs them. Replicas then end
    together instead of one replica decoding the set's long tail alone (RL rollouts wait for the
    slowest sample)."""

    Parameters = LPTBatcherParameters
    params: LPTBatcherParameters

    def plan(self, reqs: Sequence[RequestView], replicas: Sequence[ReplicaView]) -> BatchPlan:
        p = self.params
        singles = [MicroBatch("", [r], None, r.estimate.remaining(p.quantile, r.generated) + p.prompt_weight
                              * r.prompt_tokens) for r in reqs]
        start = {r.name: r.predicted_remaining(p.quantile) for r in replicas}   # other traffic there
        assigned = assign_lpt(singles, replicas, start)
        if p.order == "longest-first":
            assigned.reverse()
        return BatchPlan(assigned, "all")
