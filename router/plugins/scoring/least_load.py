"""least-load-scorer: prefer the replica with the fewest requests or tokens, ignoring predictions."""
from __future__ import annotations

from typing import Literal, Sequence

from lenpred.router.interfaces import PluginParameters, ReplicaView, RequestView, Scorer
from lenpred.router.plugins.scoring._normalize import inverse_relative


class LeastLoadParameters(PluginParameters):
    metric: Literal["requests", "tokens"] = "requests"
    """`requests`: running + waiting requests; `tokens`: KV tokens in use."""


class LeastLoadScorer(Scorer):
    """The baseline load balancer. The engine's report lags by up to one poll interval, so what
    the router dispatched since is added to it (ReplicaView.current_requests/current_tokens)."""

    Parameters = LeastLoadParameters
    params: LeastLoadParameters

    def score(self, req: RequestView, replicas: Sequence[ReplicaView]) -> dict[str, float]:
        if self.params.metric == "tokens":
            loads = {r.name: float(r.current_tokens()) for r in replicas}
        else:
            loads = {r.name: float(r.current_requests()) for r in replicas}
        return inverse_relative(loads)
