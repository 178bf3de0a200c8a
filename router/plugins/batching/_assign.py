"""Shared batch-planning helpers: longest-processing-time-first (LPT) assignment."""
from __future__ import annotations

from typing import Sequence

from lenpred.router.interfaces import MicroBatch, ReplicaView


def assign_lpt(batches: list[MicroBatch], replicas: Sequence[ReplicaView],
               start: dict[str, float] | None = None) -> list[MicroBatch]:
    """Graham's LPT rule: the costliest batch first, each to the replica with the least planned
    work (`start` = work already there). Makespan <= 4/3 of optimal for exact costs. Returned in
    release order: per replica, cheapest first (mean latency), replicas interleaved."""
    work = {r.name: (start or {}).get(r.name, 0.0) for r in replicas}
    for b in sorted(batches, key=lambda b: -b.predicted_cost):
        b.replica = min(work, key=lambda n: (work[n], n))
        work[b.replica] += b.predicted_cost
    return sorted(batches, key=lambda b: b.predicted_cost)


def assign_round_robin(batches: list[MicroBatch], replicas: Sequence[ReplicaView]) -> list[MicroBatch]:
    names = sorted(r.name for r in replicas)
    for i, b in enumerate(batches):
        b.replica = names[i % len(names)]
    return batches
