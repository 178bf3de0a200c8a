"""predicted-load-scorer: prefer the replica with the least current + predicted future decode load."""
from __future__ import annotations

from typing import Sequence

from pydantic import Field

from lenpred.router.interfaces import PluginParameters, ReplicaView, RequestView, Scorer
from lenpred.router.plugins.scoring._normalize import inverse_relative


class PredictedLoadParameters(PluginParameters):
    quantile: float = Field(0.5, ge=0.5, le=0.99)
    """Quantile of each in-flight request's remaining-length estimate."""
    current_weight: float = Field(1.0, ge=0.0)
    """Weight of the KV tokens in use now relative to the predicted tokens still to decode."""


class PredictedLoadScorer(Scorer):
    """Load = current_weight x KV tokens in use + predicted remaining decode tokens (STAR's
    "current + predicted future" decode load). Replicas that look equal by request count diverge
    as long decodes pile up; this sees the pile-up coming."""

    Parameters = PredictedLoadParameters
    params: PredictedLoadParameters

    def score(self, req: RequestView, replicas: Sequence[ReplicaView]) -> dict[str, float]:
        return inverse_relative({
            r.name: self.params.current_weight * r.current_tokens() + r.predicted_remaining(self.params.quantile)
            for r in replicas})
