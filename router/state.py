"""Replica pool: health, polled engine load (`GET /v1/loads`), and in-flight accounting."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping

import httpx

from lenpred.contract.prediction import quantile_factor
from lenpred.router.config import OutlierSettings, ReplicaSettings
from lenpred.router.interfaces import EngineLoad, RequestView

log = logging.getLogger(__name__)


def parse_v1_loads(payload: Mapping) -> EngineLoad:
    """SGLang 0.5.23's `GET /v1/loads` answer, summed over its DP ranks."""
    ranks = payload.get("loads") or []
    return EngineLoad(
        num_running_reqs=sum(int(r.get("num_running_reqs", 0)) for r in ranks),
        num_waiting_reqs=sum(int(r.get("num_waiting_reqs", 0)) for r in ranks),
        num_used_tokens=sum(int(r.get("num_used_tokens", 0)) for r in ranks),
        max_total_num_tokens=sum(int(r.get("max_total_num_tokens", 0)) for r in ranks),
        token_usage=max((float(r.get("token_usage", 0.0)) for r in ranks), default=0.0),
        gen_throughput=sum(float(r.get("gen_throughput", 0.0)) for r in ranks),
    )


@dataclass(eq=False)
class Replica:
    """One engine replica (a `ReplicaView` for plugins), named by its base URL. It starts out of
    the pool until a poll succeeds."""

    name: str
    load: EngineLoad = field(default_factory=EngineLoad)
    inflight: dict[str, RequestView] = field(default_factory=dict)
    load_seq: int = -1
    """Dispatch `seq` when `load` was requested: requests dispatched later are not in the report
    (-1: no report taken into account yet, every in-flight request counts as unreported)."""
    healthy: bool = False
    fails: int = 0
    oks: int = 0
    last_error: str = ""
    failures: deque = field(default_factory=deque)
    """Times of recent request-path failures (outlier detection)."""
    ejected_until: float = 0.0
    ejections: int = 0
    """Ejections in a row (each one lasts twice as long as the one before)."""

    def predicted_remaining(self, quantile: float) -> float:
        """Sum of `r.estimate.remaining(quantile, r.generated)` over the in-flight requests, inlined
        because scorers and admitters call it for every replica on every placement."""
        k, total = quantile_factor(quantile), 0.0
        for r in self.inflight.values():
            e = r.estimate
            rem = (e.remaining_p50 if k == 0.0 else e.remaining_p90 if k == 1.0
                   else max(e.remaining_p50 + (e.remaining_p90 - e.remaining_p50) * k, 0.0))
            ahead = r.generated - e.step
            if ahead > 0:
                rem -= ahead
            if rem > 0:
                total += rem
        return total

    def current_tokens(self) -> int:
        """KV tokens in use: the engine's report plus the prompts dispatched since it was taken,
        or the router's own count when that is larger. Without the unreported prompts a stale
        report hid the router's own dispatches, and load-based placement sent a burst of
        arrivals to the replica that had just drained (docs/results/schedule.md, 60 req/s)."""
        own = unreported = 0
        for r in self.inflight.values():
            own += r.prompt_tokens + r.generated
            if r.seq > self.load_seq:
                unreported += r.prompt_tokens
        return max(self.load.num_used_tokens + unreported, own)

    def current_requests(self) -> int:
        """Running + waiting requests: the engine's report plus those dispatched since, or the
        router's own count when that is larger."""
        unreported = sum(1 for r in self.inflight.values() if r.seq > self.load_seq)
        return max(self.load.num_running_reqs + self.load.num_waiting_reqs + unreported, len(self.inflight))


class ReplicaPool:
    """The replicas, their health and the router's accounting. A replica is in the pool (`healthy`)
    while its health poll succeeds and it is not ejected: `report_failure` ejects a replica that
    failed `outlier.failures` requests within `outlier.window_s` (a hung or broken replica is seen
    on the request path before its poll times out); it comes back when the ejection is over and a
    poll succeeds."""

    def __init__(self, urls: list[str], client: httpx.AsyncClient, settings: Callable[[], ReplicaSettings],
                 on_change: Callable[[], None] = lambda: None,
                 outlier: Callable[[], OutlierSettings] = OutlierSettings,
                 clock: Callable[[], float] = time.monotonic):
        self.replicas = {u.rstrip("/"): Replica(u.rstrip("/")) for u in urls}
        self.client = client
        self._settings, self._outlier, self._clock = settings, outlier, clock
        self._on_change = on_change
        self.inflight: dict[str, RequestView] = {}
        self._seq = 0

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.healthy]

    # -- in-flight accounting -------------------------------------------------------------
    def add(self, req: RequestView, replica: str) -> None:
        self._seq += 1
        req.replica, req.seq = replica, self._seq
        self.replicas[replica].inflight[req.rid] = req
        self.inflight[req.rid] = req

    def remove(self, req: RequestView) -> None:
        self.inflight.pop(req.rid, None)
        if req.replica in self.replicas:
            self.replicas[req.replica].inflight.pop(req.rid, None)

    # -- health ---------------------------------------------------------------------------
    def mark_ok(self, r: Replica) -> None:
        r.fails, r.oks = 0, r.oks + 1
        if r.healthy or self._clock() < r.ejected_until:
            return
        r.last_error = ""
        if r.oks >= self._settings().healthy_after:
            r.healthy = True
            log.info("replica %s joined the pool", r.name)
            self._on_change()

    def report_failure(self, name: str, why: str) -> None:
        """A request failed on replica `name` in a way that blames the replica (connection error,
        timeout, stall, broken stream, 5xx). Enough of them within the window eject it."""
        r = self.replicas.get(name)
        if r is None:
            return
        o, now = self._outlier(), self._clock()
        r.failures.append(now)
        while r.failures and now - r.failures[0] > o.window_s:
            r.failures.popleft()
        if len(r.failures) < o.failures or not r.healthy:
            return
        if now - r.ejected_until > o.window_s + o.max_ejection_s:
            r.ejections = 0        # back long enough since the last ejection: start over
        span = min(o.ejection_s * 2 ** r.ejections, o.max_ejection_s)
        r.ejections += 1
        r.ejected_until, r.healthy, r.oks = now + span, False, 0
        r.failures.clear()
        r.last_error = f"ejected for {span:g}s after {o.failures} failures in {o.window_s:g}s: {why}"
        log.warning("replica %s %s", r.name, r.last_error)
        self._on_change()

    def mark_fail(self, r: Replica, why: str) -> None:
        r.oks, r.fails, r.last_error = 0, r.fails + 1, why
        if r.healthy and r.fails >= self._settings().unhealthy_after:
            r.healthy = False
            log.warning("replica %s left the pool: %s", r.name, why)
            self._on_change()

    async def _poll(self, r: Replica) -> None:
        timeout = self._settings().timeout_s
        seq = self._seq   # what was dispatched before this poll is (mostly) in its report
        # /v1/loads alone is the liveness check: SGLang answers it with a round trip to its
        # scheduler (a frozen or dead engine fails it), while SGLang's /health runs a 1-token
        # generation and always waits >= 1 s before answering, so with a 1 s deadline it failed at
        # random and under real load it ejected busy replicas (docs/results/schedule_gpu.md).
        try:
            loads = await self.client.get(f"{r.name}/v1/loads", params={"include": "core"}, timeout=timeout)
            loads.raise_for_status()
            r.load, r.load_seq = parse_v1_loads(loads.json()), seq
        except Exception as e:  # noqa: BLE001 - anything wrong with a poll is a failed poll, never a dead poller
            self.mark_fail(r, f"{type(e).__name__}: {e}")
            return
        self.mark_ok(r)

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(r) for r in self.replicas.values()))
        self._on_change()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._settings().poll_interval_s)
            await self.poll_once()
