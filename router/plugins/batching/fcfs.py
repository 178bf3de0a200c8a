"""fcfs-batcher: the vanilla baseline -- fixed-size micro-batches in submission order."""
from __future__ import annotations

from typing import Literal, Sequence

from pydantic import Field

from lenpred.router.interfaces import BatchPlan, Batcher, MicroBatch, PluginParameters, ReplicaView, RequestView
from lenpred.router.plugins.batching._assign import assign_round_robin


class FCFSBatcherParameters(PluginParameters):
    batch_size: int = Field(16, ge=1)
    """Requests per micro-batch."""
    release: Literal["sequential", "queued", "all"] = "sequential"
    """`sequential`: a replica's next micro-batch goes out when its previous one is done (static
    batching); `queued`: all micro-batches at once, tagged, for engines that queue tagged batches;
    `all`: everything is sent at once (continuous batching)."""


class FCFSBatcher(Batcher):
    """Length-blind: cut the submission in order into `batch_size` groups, deal them to the replicas
    in turn. What a rollout loop does without predictions; needs no probe."""

    Parameters = FCFSBatcherParameters
    params: FCFSBatcherParameters
    needs_predictions = False

    def plan(self, reqs: Sequence[RequestView], replicas: Sequence[ReplicaView]) -> BatchPlan:
        n = self.params.batch_size
        batches = [MicroBatch("", list(reqs[i:i + n])) for i in range(0, len(reqs), n)]
        return BatchPlan(assign_round_robin(batches, replicas), self.params.release)
