"""Batch submissions (`POST /v1/lenpred/batch`): a known set of requests, planned as a whole.

For batch and RL-rollout traffic the whole set is known up front, so the router can do what it
cannot for single requests: learn every request's predicted length *before* placing any of them,
then group and balance. Steps:

1. probe (when the profile's batcher needs predictions and Redis is configured): every request is
   sent prefill-only (max tokens 1, rid `<rid>-probe`); the tap/sidecar publishes its EGTP
   prediction at prefill, which the runner reads from Redis (fallback estimate if none arrives).
   the probe body and the wait are shared with single requests' probe-then-dispatch
   (`probes.py`, profile `probe.enabled`);
2. plan: the batcher groups the set into micro-batches and assigns them to replicas;
3. release: `sequential` sends a replica's next micro-batch when its previous one is done (static
   batching engines), `all` sends everything in plan order (continuous batching);
4. FCR: members that hit their micro-batch's cap are continued (prompt + tokens so far, new rid)
   in batches planned by `batcher.continue_plan`, until all are done.

Results stream back as NDJSON lines in completion order, `{"index", "rid", "status", "replica",
"parts", "response"}`, then one `{"summary": ...}` line.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol, Sequence

from lenpred.contract.prediction import Estimate, Prediction
from lenpred.router.config import Profile
from lenpred.router.continuation import Part, continuation, merge, part_of, with_cap
from lenpred.router.ids import new_rid
from lenpred.router.interfaces import MicroBatch, ReplicaView, RequestView
from lenpred.router.parsing import max_tokens_of, prompt_of
from lenpred.router.probes import probe_body, probe_rid
from lenpred.router.upstream import ERRORS

log = logging.getLogger(__name__)
MAX_ROUNDS = 8
PROBE_CONCURRENCY = 4096
PREDICTION_WAIT_S = 3.0


class BatchHost(Protocol):
    """What a batch run needs from the router (`core.Router` implements it): nothing else of the
    router's internals is reachable from here."""

    @property
    def predictions_enabled(self) -> bool:
        """Whether predictions can arrive (Redis configured): probing is pointless without them."""

    def profile(self, name: str) -> Profile: ...

    def clock(self) -> float: ...

    def healthy(self) -> Sequence[ReplicaView]: ...

    def fallback_estimate(self, prompt_tokens: int, max_tokens: int | None) -> Estimate: ...

    def observe_length(self, prompt_tokens: int, output_tokens: int) -> None:
        """Learn a finished request's output length (the fallback's history)."""

    async def post_read(self, replica: str, api: str, body: dict) -> tuple[int, bytes]:
        """POST `body` to the API's path on `replica` and read the whole answer."""

    def begin_attempt(self, req: RequestView, replica: str, rid: str) -> None:
        """`req` runs on `replica` as engine rid `rid`: account it there, route its predictions."""

    def end_attempt(self, req: RequestView, rid: str) -> None: ...

    async def wait_for_predictions(self, rids: list[str], timeout_s: float) -> dict[str, Prediction]: ...

    async def latest_prediction(self, rid: str) -> Prediction | None: ...


@dataclass
class Item:
    index: int
    body: dict
    req: RequestView
    parts: list[Part] = field(default_factory=list)
    attempts: int = 0
    status: int = 200
    error: str = ""
    done: bool = False
    last_rid: str = ""


class BatchRun:
    def __init__(self, host: BatchHost, api: str, bodies: list[dict], profile: str):
        self.host, self.api, self.profile_name = host, api, profile
        self.profile = host.profile(profile)
        self.batcher = self.profile.batcher
        self.id = new_rid("lpb")
        self.items = []
        for i, body in enumerate(bodies):
            text, ptoks = prompt_of(body, api)
            mt = max_tokens_of(body, api)
            req = RequestView(rid=new_rid(), api=api, prompt_tokens=ptoks, prompt_text=text,
                              max_tokens=mt, arrival=host.clock(), estimate=host.fallback_estimate(ptoks, mt),
                              pinned=True)   # batch plans place and continue their own requests: never moved
            self.items.append(Item(i, body, req))
        self.results: asyncio.Queue = asyncio.Queue()
        self.stats = {"batch_id": self.id, "requests": len(bodies), "probes": 0, "probe_predictions": 0,
                      "micro_batches": 0, "rounds": 0, "continued": 0, "probe_s": 0.0,
                      "replica_finish_s": {}}
        self._started = time.monotonic()

    # -- 1. probe ----------------------------------------------------------------------------
    async def probe(self) -> None:
        healthy = sorted(r.name for r in self.host.healthy())
        sem = asyncio.Semaphore(PROBE_CONCURRENCY)
        started = time.monotonic()

        counts = {r: sum(1 for i in range(len(self.items)) if healthy[i % len(healthy)] == r) for r in healthy}

        async def one(item: Item, replica: str) -> None:
            body = probe_body(item.body, self.api, item.req.rid)
            custom = body.setdefault("custom_params", {})   # one batch on a static-batching engine
            custom["lenpred_micro_batch"], custom["lenpred_micro_batch_size"] = f"{self.id}-probe-{replica}", counts[replica]
            async with sem:
                try:
                    await self.host.post_read(replica, self.api, body)
                    self.stats["probes"] += 1
                except ERRORS as e:
                    log.debug("probe %s failed: %s", body["rid"], e)

        await asyncio.gather(*(one(it, healthy[i % len(healthy)]) for i, it in enumerate(self.items)))
        # The sidecar writes EGTP at prefill, around when the probe answers: read them all at once,
        # retrying the missing ones briefly; those still missing keep the fallback estimate.
        by_rid = {probe_rid(it.req.rid): it for it in self.items}
        got = await self.host.wait_for_predictions(list(by_rid), PREDICTION_WAIT_S)
        for rid, rec in got.items():
            item = by_rid[rid]
            item.req.estimate = Estimate.from_record(rec, item.req.max_tokens)
            self.stats["probe_predictions"] += 1
        self.stats["probe_s"] = time.monotonic() - started

    # -- 2-4. plan, release, continue ---------------------------------------------------------
    async def _send(self, item: Item, replica: str, cap: int | None, group: tuple[str, int] | None = None) -> None:
        req = item.req
        item.attempts += 1
        rid = req.rid if item.attempts == 1 else f"{req.rid}-c{item.attempts - 1}"
        body = continuation(item.body, self.api, item.parts, cap) if item.parts else with_cap(item.body, self.api, cap)
        body["rid"] = rid
        if group is not None:
            # Tell a static-batching engine which requests form one batch (a real static server
            # takes the batch in one call; SGLang ignores unknown custom_params).
            custom = body.setdefault("custom_params", {})
            custom["lenpred_micro_batch"], custom["lenpred_micro_batch_size"] = group
        item.last_rid = rid
        self.host.begin_attempt(req, replica, rid)
        try:
            status, content = await self.host.post_read(replica, self.api, body)
            payload = json.loads(content) if status == 200 else None
        except (*ERRORS, ValueError) as e:
            item.status, item.error, item.done = 502, f"{type(e).__name__}: {e}", True
            return
        finally:
            self.host.end_attempt(req, rid)
        if payload is None:
            item.status, item.error, item.done = status, content[:500].decode(errors="replace"), True
            return
        part = part_of(payload, self.api)
        item.parts.append(part)
        req.generated += part.tokens
        own_left = None if req.max_tokens is None else req.max_tokens - (req.generated - part.tokens)
        hit_cap = cap is not None and part.finish == "length" and part.tokens >= cap and (
            own_left is None or cap < own_left)
        if not hit_cap:
            item.done = True

    async def _run_plan(self, plan) -> None:
        per_replica = plan.per_replica()
        self.stats["micro_batches"] += len(plan.batches)

        def tag(replica: str, k: int, mb: MicroBatch) -> tuple[str, int]:
            """Micro-batch id and size, as static-batching engines are told them."""
            return f"{self.id}-{replica[-5:]}-{self.stats['rounds']}-{k}", len(mb.requests)

        async def replica_worker(replica: str, batches: list[MicroBatch]) -> None:
            if plan.release == "sequential":
                for k, mb in enumerate(batches):
                    group = tag(replica, k, mb)
                    await asyncio.gather(*(self._member(it, replica, mb.max_tokens, group) for it in self._items(mb)))
            else:
                tasks = []
                for k, mb in enumerate(batches):
                    group = tag(replica, k, mb) if plan.release == "queued" else None
                    for it in self._items(mb):
                        tasks.append(asyncio.create_task(self._member(it, replica, mb.max_tokens, group)))
                        await asyncio.sleep(0)  # keep the plan's order on the wire
                await asyncio.gather(*tasks)
            self.stats["replica_finish_s"][replica] = time.monotonic() - self._started

        await asyncio.gather(*(replica_worker(r, bs) for r, bs in per_replica.items()))

    def _items(self, mb: MicroBatch) -> list[Item]:
        return [self._by_rid[r.rid] for r in mb.requests]

    async def _member(self, item: Item, replica: str, cap: int | None, group=None) -> None:
        await self._send(item, replica, cap, group)
        if item.done:
            await self.results.put(self._result(item, replica))

    def _result(self, item: Item, replica: str) -> dict:
        out = {"index": item.index, "rid": item.req.rid, "status": item.status, "replica": replica,
               "parts": len(item.parts)}
        if item.status == 200:
            out["response"] = merge(item.parts, self.api)
            self.host.observe_length(item.req.prompt_tokens, item.req.generated)
        else:
            out["error"] = item.error
        return out

    async def _refresh_estimate(self, item: Item) -> None:
        """After a capped attempt: the latest PLP for its rid, else 'at least as much again'."""
        req = item.req
        rec = await self.host.latest_prediction(item.last_rid)
        rem = Estimate.from_record(rec).remaining(0.5, item.parts[-1].tokens) if rec is not None else 0.0
        rem = max(rem, 0.5 * req.generated, 1.0)
        if req.max_tokens:
            rem = min(rem, req.max_tokens - req.generated)
        req.estimate = Estimate(p50=req.generated + rem, p90=req.generated + 2 * rem, remaining_p50=rem,
                                remaining_p90=2 * rem, step=req.generated, source=rec.source if rec else "fallback")

    async def execute(self) -> None:
        self._by_rid = {it.req.rid: it for it in self.items}
        try:
            if self.batcher.needs_predictions and self.host.predictions_enabled:
                await self.probe()
            pending = list(self.items)
            for rnd in range(MAX_ROUNDS):
                healthy = self.host.healthy()
                if not healthy:
                    for it in pending:
                        it.status, it.error, it.done = 503, "no healthy replica", True
                        await self.results.put(self._result(it, ""))
                    break
                reqs = [it.req for it in pending]
                plan = self.batcher.plan(reqs, healthy) if rnd == 0 else self.batcher.continue_plan(reqs, healthy)
                if rnd == MAX_ROUNDS - 1:
                    for b in plan.batches:
                        b.max_tokens = None
                self.stats["rounds"] = rnd + 1
                await self._run_plan(plan)
                pending = [it for it in pending if not it.done]
                if not pending:
                    break
                self.stats["continued"] += len(pending)
                await asyncio.gather(*(self._refresh_estimate(it) for it in pending))
        finally:
            self.stats["makespan_s"] = time.monotonic() - self._started
            await self.results.put(None)

    async def stream(self) -> AsyncIterator[dict]:
        task = asyncio.create_task(self.execute())
        try:
            while True:
                item = await self.results.get()
                if item is None:
                    break
                yield item
            await task
            yield {"summary": self.stats}
        finally:
            if not task.done():
                task.cancel()

