"""length-bucket-batcher: seed B's sequence scheduling -- sort by predicted length, cut micro-batches
of similar length; optional variable batch size (VBS) and failure collection and recompute (FCR)."""
from __future__ import annotations

import math
from typing import Literal, Sequence

from pydantic import Field

from lenpred.router.interfaces import BatchPlan, Batcher, MicroBatch, PluginParameters, ReplicaView, RequestView
from lenpred.router.plugins.batching._assign import assign_lpt, assign_round_robin


class LengthBucketParameters(PluginParameters):
    batch_size: int = Field(16, ge=1)
    """Requests per micro-batch (without VBS; with VBS the size for the longest bucket)."""
    quantile: float = Field(0.5, ge=0.5, le=0.99)
    """Quantile of each prediction used to sort and to size batches."""
    vbs: bool = False
    """Variable batch size: grow a batch while size x predicted longest member stays within
    `vbs_token_budget` (short buckets get big batches), up to `max_batch_size`."""
    vbs_token_budget: int = Field(8192, ge=1)
    """VBS: output-token budget per micro-batch (default 16 x 512, seed B's vanilla footprint)."""
    max_batch_size: int = Field(128, ge=1)
    """VBS: hard cap on a micro-batch's size."""
    fcr: bool = False
    """Failure collection and recompute: cap each micro-batch's outputs at its predicted bucket;
    members that hit the cap are continued afterwards (prompt + tokens so far) in new batches."""
    fcr_bucket_tokens: int = Field(32, ge=1)
    """FCR: the cap is the batch's longest prediction x `fcr_slack`, rounded up to this multiple."""
    fcr_slack: float = Field(1.2, ge=1.0)
    """FCR: margin over the longest prediction before a member counts as failed."""
    assignment: Literal["lpt", "round-robin"] = "lpt"
    """How micro-batches go to replicas: longest predicted first to the least planned work (all
    replicas finish together), or in turn."""
    width_cost: float = Field(0.004, ge=0.0)
    """Cost model for LPT: a batch costs steps x (1 + width_cost x size); 0.004 is b/a of the
    emulated 7B-on-H100 step (25 us per token over a 6 ms step)."""
    release: Literal["sequential", "queued", "all"] = "sequential"
    """`sequential` for static-batching engines; `queued` for static engines that queue tagged
    micro-batches (no turnaround between batches); `all` for continuous batching."""


class LengthBucketBatcher(Batcher):
    """Sort by predicted length and cut batches of similar length: a static batch runs as long as its
    longest member, so similar lengths waste little padding. Needs EGTP predictions (probe first)."""

    Parameters = LengthBucketParameters
    params: LengthBucketParameters

    def _pred(self, r: RequestView) -> float:
        return max(r.estimate.remaining(self.params.quantile, r.generated), 1.0)

    def _cut(self, reqs: list[RequestView]) -> list[list[RequestView]]:
        p = self.params
        if not p.vbs:
            return [reqs[i:i + p.batch_size] for i in range(0, len(reqs), p.batch_size)]
        out: list[list[RequestView]] = [[]]
        for r in reqs:                         # ascending: the newcomer is the batch's longest
            cur = out[-1]
            if cur and ((len(cur) + 1) * self._pred(r) > p.vbs_token_budget or len(cur) >= p.max_batch_size):
                out.append(cur := [])
            cur.append(r)
        return [b for b in out if b]

    def _batch(self, members: list[RequestView], capped: bool) -> MicroBatch:
        p = self.params
        longest = max(self._pred(r) for r in members)
        cap = None
        if capped and p.fcr:
            cap = int(math.ceil(longest * p.fcr_slack / p.fcr_bucket_tokens) * p.fcr_bucket_tokens)
            limits = [r.max_tokens - r.generated for r in members if r.max_tokens]
            if limits and cap >= max(limits):
                cap = None                     # the cap would not bind
        steps = cap or longest
        return MicroBatch("", members, cap, steps * (1.0 + p.width_cost * len(members)))

    def _plan(self, reqs: Sequence[RequestView], replicas: Sequence[ReplicaView], capped: bool) -> BatchPlan:
        ordered = sorted(reqs, key=lambda r: (self._pred(r), r.arrival))
        batches = [self._batch(b, capped) for b in self._cut(ordered)]
        if self.params.assignment == "lpt":
            batches = assign_lpt(batches, replicas)
        else:
            batches = assign_round_robin(batches, replicas)
        return BatchPlan(batches, self.params.release)

    def plan(self, reqs: Sequence[RequestView], replicas: Sequence[ReplicaView]) -> BatchPlan:
        return self._plan(reqs, replicas, capped=True)

    def continue_plan(self, reqs: Sequence[RequestView], replicas: Sequence[ReplicaView]) -> BatchPlan:
        return self._plan(reqs, replicas, capped=False)
