"""predicted-kv-admitter: admit while predicted KV demand fits the replica's capacity."""
from __future__ import annotations

from typing import Literal, Sequence

from pydantic import Field

from lenpred.router.interfaces import (Admission, Admitter, PluginParameters, ReplicaView,
                                       RequestView, Verdict)


class PredictedKVParameters(PluginParameters):
    quantile: float = Field(0.9, ge=0.5, le=0.99)
    """Quantile of the output-length estimate used for demand (higher = safer, less packed)."""
    headroom: float = Field(0.9, gt=0.0, le=1.0)
    """Fraction of the replica's KV capacity (`max_total_num_tokens`) the router may plan for."""
    on_saturation: Literal["queue", "shed"] = "queue"
    """What to do when no replica has room: wait in the router queue, or reject with 429."""


class PredictedKVAdmitter(Admitter):
    """Demand on a replica = KV in use + predicted remaining decode tokens of what runs there.

    The new request fits a replica when demand + its prompt + its predicted output (both at
    `quantile`) stays within `headroom` x capacity. A replica with nothing running takes any
    request, so a request larger than every replica still runs (the engine truncates it) rather
    than waiting forever. Replicas that have not reported a capacity yet are not judged.
    """

    Parameters = PredictedKVParameters
    params: PredictedKVParameters

    def admit(self, req: RequestView, replicas: Sequence[ReplicaView]) -> Admission:
        q = self.params.quantile
        need = req.prompt_tokens + req.estimate.total(q)
        fits = frozenset(
            r.name for r in replicas
            if r.load.max_total_num_tokens <= 0
            or (not r.inflight and r.load.num_running_reqs == 0)
            or r.current_tokens() + r.predicted_remaining(q) + need
            <= self.params.headroom * r.load.max_total_num_tokens)
        if fits:
            return Admission.admit(fits)
        verdict = Verdict.QUEUE if self.params.on_saturation == "queue" else Verdict.SHED
        return Admission(verdict, reason="saturated-kv")
