"""The router queue and dispatcher: admission -> ordering -> placement, per profile.

Each profile has its own queue, ordered by its orderer (keys of different orderers are not
comparable). Dispatch is synchronous (no awaits), so it never interleaves with itself on the event
loop; it runs on every arrival, completion, load report and prediction update, and on a tick for
queue timeouts. The head of a queue blocks the ones behind it: skipping ahead to smaller requests
would starve large ones, which is the orderer's aging job to trade off, not the dispatcher's.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

from lenpred.router.config import Policy, Profile
from lenpred.router.interfaces import Admission, ReplicaView, RequestView, Verdict
from lenpred.router.state import ReplicaPool


class Dropped(Exception):
    """The router will not serve this request: HTTP status and a machine-readable reason."""

    def __init__(self, status: int, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.status, self.reason = status, reason


@dataclass
class Placement:
    replica: str
    priority: int | None
    profile: Profile
    queued_s: float


@dataclass
class _Waiting:
    req: RequestView
    profile: str
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    prefer: str | None = None   # the replica a probe already prefilled (probe-then-dispatch)


def place(profile: Profile, req: RequestView, candidates: list[ReplicaView]) -> str:
    """Weighted sum of the profile's scorers (each clamped to [0, 1]), then its picker."""
    totals = {r.name: 0.0 for r in candidates}
    if len(totals) == 1:
        return candidates[0].name
    for scorer, weight in profile.scorers:
        scores = scorer.score(req, candidates)
        for name in totals:
            totals[name] += weight * min(max(scores.get(name, 0.0), 0.0), 1.0)
    return profile.picker.pick(req, totals)


class Scheduler:
    def __init__(self, pool: ReplicaPool, policy: Callable[[], Policy], clock: Callable[[], float] = time.monotonic,
                 on_dispatch: Callable[[RequestView, Placement], None] = lambda r, p: None,
                 on_drop: Callable[[RequestView, Dropped], None] = lambda r, d: None,
                 on_pass: Callable[[float], None] = lambda seconds: None):
        self.pool = pool
        self._policy = policy
        self._clock = clock
        self._on_dispatch, self._on_drop, self._on_pass = on_dispatch, on_drop, on_pass
        self.queues: dict[str, list[_Waiting]] = {}

    def depth(self) -> int:
        return sum(len(q) for q in self.queues.values())

    async def submit(self, req: RequestView, profile: str, prefer: str | None = None) -> Placement:
        """Wait for a replica; raise Dropped when the request is shed or times out. `prefer` (the
        replica that holds its probe's KV) is taken whenever admission leaves it eligible."""
        if not self.pool.healthy():
            raise self._refuse(req, Dropped(503, "no-healthy-replica", "no healthy replica in the pool"))
        if self.depth() >= self._policy().spec.queue.max_size:
            raise self._refuse(req, Dropped(429, "queue-full", "the router queue is full"))
        waiting = _Waiting(req, profile, asyncio.get_running_loop().create_future(), self._clock(), prefer)
        self.queues.setdefault(profile, []).append(waiting)
        self.dispatch()
        try:
            return await waiting.future
        finally:
            if not waiting.future.done():  # the client went away while queued
                waiting.future.cancel()
            q = self.queues.get(profile, [])
            if waiting in q:
                q.remove(waiting)

    def redispatch(self, req: RequestView, profile: Profile, exclude: set[str]) -> str | None:
        """Place an already admitted request again (its replica failed before answering)."""
        self.release(req, profile)
        candidates = [r for r in self.pool.healthy() if r.name not in exclude]
        if not candidates:
            return None
        replica = place(profile, req, candidates)
        self._assign(req, profile, replica)
        return replica

    def release(self, req: RequestView, profile: Profile) -> None:
        """A dispatched request ended; free its accounting and let the queue move."""
        self.pool.remove(req)
        for p in profile.plugins():
            p.on_finish(req)
        self.dispatch()

    def _assign(self, req: RequestView, profile: Profile, replica: str) -> None:
        self.pool.add(req, replica)
        for p in profile.plugins():
            p.on_dispatch(req, replica)

    def expire(self) -> None:
        now, max_wait = self._clock(), self._policy().spec.queue.max_wait_s
        for q in self.queues.values():
            for w in [w for w in q if now - w.enqueued > max_wait]:
                q.remove(w)
                self._drop(w, Dropped(503, "queue-timeout", f"queued longer than {max_wait:g}s"))

    def _refuse(self, req: RequestView, d: Dropped) -> Dropped:
        self._on_drop(req, d)
        return d

    def _drop(self, w: _Waiting, d: Dropped) -> None:
        if not w.future.done():
            w.future.set_exception(d)
            self._on_drop(w.req, d)

    def dispatch(self) -> None:
        if not any(self.queues.values()):
            return
        started = time.perf_counter()
        self._dispatch(self._policy(), self._clock())
        self._on_pass(time.perf_counter() - started)

    def _dispatch(self, policy: Policy, now: float) -> None:
        for name, q in self.queues.items():
            if not q:
                continue
            profile = policy.profiles.get(name, policy.default)  # the profile may be gone after a reload
            if len(q) > 1:
                q.sort(key=lambda w: profile.orderer.key(w.req, now))
            while q:
                w = q[0]
                if w.future.done():
                    q.pop(0)
                    continue
                healthy = self.pool.healthy()
                if not healthy:
                    break
                adm = profile.admitter.admit(w.req, healthy) if profile.admitter else Admission.admit()
                if adm.verdict is Verdict.QUEUE:
                    break
                if adm.verdict is Verdict.SHED:
                    q.pop(0)
                    self._drop(w, Dropped(429, adm.reason or "shed", "shed by admission"))
                    continue
                candidates = [r for r in healthy if adm.eligible is None or r.name in adm.eligible]
                if not candidates:
                    break
                q.pop(0)
                if w.prefer is not None and any(r.name == w.prefer for r in candidates):
                    replica = w.prefer
                else:
                    replica = place(profile, w.req, candidates)
                self._assign(w.req, profile, replica)
                priority = w.req.client_priority
                if priority is None:
                    priority = profile.orderer.engine_priority(w.req, now)
                placement = Placement(replica, priority, profile, now - w.enqueued)
                w.future.set_result(placement)
                self._on_dispatch(w.req, placement)

    async def run(self, tick_s: float = 0.1) -> None:
        while True:
            await asyncio.sleep(tick_s)
            self.expire()
            self.dispatch()
