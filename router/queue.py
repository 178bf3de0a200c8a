"""The router queue and dispatcher: admission -> ordering -> placement, per profile.

Each profile has its own queue, ordered by its orderer (keys of different orderers are not
comparable). A queue is a binary heap keyed by `Orderer.key`, which does not change as time passes
(aging is a virtual deadline), so a new request or a prediction update costs O(log n): the request
is pushed again under its new key and the old heap entry is skipped when it surfaces (lazy
invalidation), instead of re-sorting the queue on every pass. Queue timeouts use a FIFO beside the
heap (requests time out in arrival order).

Dispatch is synchronous (no awaits), so it never interleaves with itself on the event loop; it runs
on every arrival, completion, load report and prediction update, and on a tick for queue timeouts.
The head of a queue blocks the ones behind it: skipping ahead to smaller requests would starve
large ones, which is the orderer's aging job to trade off, not the dispatcher's.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from lenpred.router.config import Policy, Profile
from lenpred.router.interfaces import Admission, Orderer, ReplicaView, RequestView, Verdict
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


@dataclass(eq=False)
class _Waiting:
    req: RequestView
    profile: str
    future: asyncio.Future
    enqueued: float
    prefer: str | None = None   # the replica a probe already prefilled (probe-then-dispatch)
    version: int = 0            # bumped on every re-key: heap entries of older versions are stale
    queued: bool = True         # False once dispatched, dropped or abandoned

    def live(self) -> bool:
        return self.queued and not self.future.done()


class ProfileQueue:
    """Min-heap of one profile's waiting requests by orderer key, with lazy invalidation."""

    def __init__(self, orderer: Orderer):
        self.orderer = orderer
        self._heap: list[tuple[float, int, int, _Waiting]] = []
        self._tie = itertools.count()   # equal keys leave in push order; never compares _Waiting
        self.live = 0

    def __len__(self) -> int:
        return self.live

    def push(self, w: _Waiting) -> None:
        self.live += 1
        self._push(w)

    def _push(self, w: _Waiting) -> None:
        heapq.heappush(self._heap, (self.orderer.key(w.req), next(self._tie), w.version, w))

    def rekey(self, w: _Waiting) -> None:
        """The request's estimate changed: enter it again under its new key (O(log n))."""
        w.version += 1
        self._push(w)
        if len(self._heap) > 2 * self.live + 64:   # mostly stale entries: rebuild once
            self.rebuild(self.orderer)

    def rebuild(self, orderer: Orderer) -> None:
        """Re-key every live request (after a policy reload changed the orderer)."""
        live = [e[3] for e in self._heap if e[2] == e[3].version and e[3].live()]
        self.orderer, self._heap = orderer, []
        for w in live:
            self._push(w)

    def peek(self) -> _Waiting | None:
        heap = self._heap
        while heap:
            _, _, version, w = heap[0]
            if version == w.version and w.live():
                return w
            heapq.heappop(heap)
        return None

    def pop(self, w: _Waiting) -> None:
        """Take `w` (the head, from `peek`) out of the queue."""
        heapq.heappop(self._heap)
        self.discard(w)

    def discard(self, w: _Waiting) -> None:
        """Mark `w` as gone; its heap entries are skipped when they surface."""
        if w.queued:
            w.queued = False
            self.live -= 1


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
        self.queues: dict[str, ProfileQueue] = {}
        self._fifo: deque[tuple[_Waiting, ProfileQueue]] = deque()   # arrival order, for timeouts
        self._waiting: dict[str, tuple[_Waiting, ProfileQueue]] = {}  # rid -> queued request

    def _new_queue(self, orderer: Orderer) -> ProfileQueue:
        return ProfileQueue(orderer)

    def depth(self) -> int:
        return len(self._waiting)

    def _profile(self, policy: Policy, name: str) -> Profile:
        return policy.profiles.get(name, policy.default)  # the profile may be gone after a reload

    async def submit(self, req: RequestView, profile: str, prefer: str | None = None) -> Placement:
        """Wait for a replica; raise Dropped when the request is shed or times out. `prefer` (the
        replica that holds its probe's KV) is taken whenever admission leaves it eligible."""
        if not self.pool.healthy():
            raise self._refuse(req, Dropped(503, "no-healthy-replica", "no healthy replica in the pool"))
        policy = self._policy()
        if self.depth() >= policy.spec.queue.max_size:
            raise self._refuse(req, Dropped(429, "queue-full", "the router queue is full"))
        q = self.queues.get(profile)
        if q is None:
            q = self.queues[profile] = self._new_queue(self._profile(policy, profile).orderer)
        waiting = _Waiting(req, profile, asyncio.get_running_loop().create_future(), self._clock(), prefer)
        q.push(waiting)
        self._fifo.append((waiting, q))
        self._waiting[req.rid] = (waiting, q)
        self.dispatch()
        try:
            return await waiting.future
        finally:
            if not waiting.future.done():  # the client went away while queued
                waiting.future.cancel()
            q.discard(waiting)
            if self._waiting.get(req.rid, (None,))[0] is waiting:
                del self._waiting[req.rid]

    def update(self, req: RequestView) -> None:
        """`req`'s estimate changed: if it is queued, re-key it (O(log n))."""
        entry = self._waiting.get(req.rid)
        if entry is not None and entry[0].live():
            entry[1].rekey(entry[0])

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
        """Drop requests queued longer than `queue.max_wait_s` (oldest first; O(expired))."""
        now, max_wait = self._clock(), self._policy().spec.queue.max_wait_s
        fifo = self._fifo
        while fifo:
            w, q = fifo[0]
            if w.live() and now - w.enqueued <= max_wait:
                break
            fifo.popleft()
            if w.live():
                q.discard(w)
                self._drop(w, Dropped(503, "queue-timeout", f"queued longer than {max_wait:g}s"))

    def _refuse(self, req: RequestView, d: Dropped) -> Dropped:
        self._on_drop(req, d)
        return d

    def _drop(self, w: _Waiting, d: Dropped) -> None:
        if not w.future.done():
            w.future.set_exception(d)
            self._on_drop(w.req, d)

    def dispatch(self) -> None:
        if not self._waiting:
            return
        started = time.perf_counter()
        self._dispatch(self._policy(), self._clock())
        self._on_pass(time.perf_counter() - started)

    def _dispatch(self, policy: Policy, now: float) -> None:
        for name, q in self.queues.items():
            if not q.live:
                continue
            profile = self._profile(policy, name)
            if q.orderer is not profile.orderer:
                q.rebuild(profile.orderer)
            while True:
                w = q.peek()
                if w is None:
                    break
                healthy = self.pool.healthy()
                if not healthy:
                    break
                adm = profile.admitter.admit(w.req, healthy) if profile.admitter else Admission.admit()
                if adm.verdict is Verdict.QUEUE:
                    break
                if adm.verdict is Verdict.SHED:
                    q.pop(w)
                    self._drop(w, Dropped(429, adm.reason or "shed", "shed by admission"))
                    continue
                candidates = [r for r in healthy if adm.eligible is None or r.name in adm.eligible]
                if not candidates:
                    break
                q.pop(w)
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
