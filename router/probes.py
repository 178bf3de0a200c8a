"""Probes: a prefill-only copy of a request (max tokens 1, rid `<rid>-probe`), sent so the tap and
sidecar publish its EGTP prediction before the real request is placed. Used by probe-then-dispatch
for single requests (profile `probe.enabled`, `Prober`) and by batch runs (`batch.BatchRun.probe`),
with the same body and the same wait.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from typing import Callable, Coroutine

from lenpred.contract.prediction import Estimate, Prediction
from lenpred.router.config import Profile
from lenpred.router.continuation import with_cap
from lenpred.router.lifecycle import Probe, Tracked
from lenpred.router.metrics import RouterMetrics
from lenpred.router.parsing import PATHS
from lenpred.router.predictions import PredictionStore
from lenpred.router.queue import place
from lenpred.router.state import ReplicaPool
from lenpred.router.upstream import Upstream

log = logging.getLogger(__name__)

PROBE_TOKENS = 1   # prefill plus one token: SGLang's OpenAI endpoints refuse max_tokens 0
PROBE_SEND_TIMEOUT_S = 5.0
"""The probe's own HTTP request may run past the wait (its KV is what the real request reuses)."""


def probe_rid(rid: str) -> str:
    return f"{rid}-probe"


def probe_body(body: dict, api: str, rid: str) -> dict:
    """A prefill-only copy of `body` under the probe rid of `rid` (never streamed)."""
    out = with_cap(body, api, PROBE_TOKENS)
    out["rid"] = probe_rid(rid)
    out.pop("stream", None)
    out.pop("stream_options", None)
    return out


class PredictionWaiters:
    """Callers waiting for the predictions of given rids: woken by the pub/sub stream
    (`offer`), and reading Redis every `poll_s` (a record written before they listened, or a lost
    event)."""

    def __init__(self, store: PredictionStore):
        self.store = store
        self._waiting: dict[str, tuple[dict[str, Prediction], asyncio.Event]] = {}

    def offer(self, rec: Prediction) -> bool:
        """A prediction arrived: True if a waiter was waiting for its rid (it is taken if fresh)."""
        waiter = self._waiting.get(rec.rid)
        if waiter is None:
            return False
        if self.store.fresh(rec):
            waiter[0][rec.rid] = rec
            waiter[1].set()
        return True

    async def wait(self, rids: list[str], timeout_s: float, poll_s: float = 0.05,
                   give_up: Callable[[], bool] | None = None) -> dict[str, Prediction]:
        """Fresh predictions for `rids`, until all are in, `timeout_s` has passed or `give_up()`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        got: dict[str, Prediction] = {}
        arrived = asyncio.Event()
        for rid in rids:
            self._waiting[rid] = (got, arrived)
        try:
            while True:
                arrived.clear()
                missing = [r for r in rids if r not in got]
                if missing:
                    left = deadline - loop.time()
                    read = await self.store.get_many(missing, max(min(left, 2.0), 0.01))
                    got.update({r: rec for r, rec in read.items() if self.store.fresh(rec)})
                left = deadline - loop.time()
                if len(got) == len(rids) or left <= 0 or (give_up is not None and give_up()):
                    return got
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(arrived.wait(), min(poll_s, left))
        finally:
            for rid in rids:
                self._waiting.pop(rid, None)


class Prober:
    """Probe-then-dispatch for single requests."""

    def __init__(self, pool: ReplicaPool, upstream: Upstream, waiters: PredictionWaiters, metrics: RouterMetrics,
                 clock: Callable[[], float], spawn: Callable[[Coroutine], asyncio.Task]):
        self.pool, self.upstream, self.waiters, self.metrics = pool, upstream, waiters, metrics
        self._clock, self._spawn = clock, spawn

    async def probe(self, t: Tracked, profile: Profile, api: str, body: dict) -> None:
        """Prefill a copy of the prompt on the replica the profile's scorers pick now, wait (at
        most `probe.timeout_ms`) for the EGTP the tap publishes at prefill, and make it the
        request's estimate before it is queued; the real request is then sent to the same replica
        (`Scheduler.submit(prefer=...)`) to reuse the probe's KV through the prefix cache. A
        timeout or a failed probe keeps the fallback (never an error)."""
        req = t.req
        healthy = self.pool.healthy()
        if not healthy:
            return
        replica = place(profile, req, healthy)
        pbody = probe_body(body, api, req.rid)
        # The probe is one token of work: give it the engine priority of a one-token request, so
        # it prefills ahead of the engine's waiting queue and its prediction arrives in time.
        prio = profile.orderer.engine_priority(replace(req, estimate=Estimate.constant(1, 1, "probe")), self._clock())
        if prio is not None:
            pbody["priority"] = prio
        info = t.probe = Probe(pbody["rid"], replica)
        started = time.monotonic()
        sent = self._spawn(asyncio.wait_for(self.upstream.post_read(f"{replica}{PATHS[api]}", pbody),
                                            timeout=max(profile.probe.timeout_ms / 1000, PROBE_SEND_TIMEOUT_S)))
        sent.add_done_callback(lambda task: task.cancelled() or task.exception())   # a failed probe is no error

        def failed() -> bool:
            return sent.done() and (sent.cancelled() or sent.exception() is not None or sent.result()[0] != 200)

        got = await self.waiters.wait([info.rid], profile.probe.timeout_ms / 1000, poll_s=0.01, give_up=failed)
        info.wait_ms = (time.monotonic() - started) * 1000
        rec = got.get(info.rid)
        if rec is not None:
            req.estimate = Estimate.from_record(rec, req.max_tokens)
            info.outcome, info.estimate = "prediction", req.estimate.header()
        elif failed():
            info.outcome = "failed"
        self.metrics.probes.labels(info.outcome).inc()
