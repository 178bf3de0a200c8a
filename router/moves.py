"""Preemption moves: ask the profiles' preemptors which running requests to move, carry the moves
out (re-account on the target, abort at the source) and build each moved request's next attempt.

The request's own relay (`relay.Relay`) sees the abort and continues the answer on the target with
the attempt built here; docs/ROUTER.md "Preemption" has the whole mechanism.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from lenpred.router.config import Policy
from lenpred.router.continuation import Part, continuation
from lenpred.router.interfaces import Move, Preemptor
from lenpred.router.lifecycle import RequestState, RequestTable, Tracked
from lenpred.router.metrics import RouterMetrics
from lenpred.router.state import ReplicaPool

log = logging.getLogger(__name__)


class Mover:
    def __init__(self, pool: ReplicaPool, table: RequestTable, policy: Callable[[], Policy], metrics: RouterMetrics,
                 clock: Callable[[], float], abort: Callable[[str, str], None]):
        self.pool, self.table, self._policy, self.metrics = pool, table, policy, metrics
        self._clock, self._abort = clock, abort
        self._handle: asyncio.TimerHandle | None = None

    def soon(self) -> None:
        """Ask the profiles' preemptors for moves, coalesced to one pass per `interval_s`."""
        if self._handle is not None:
            return
        intervals = [p.preemptor.interval_s for p in self._policy().profiles.values() if p.preemptor is not None]
        if intervals:
            self._handle = asyncio.get_running_loop().call_later(min(intervals), self._pass)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def _pass(self) -> None:
        self._handle = None
        healthy = self.pool.healthy()
        if len(healthy) < 2:
            return
        now = self._clock()
        policy = self._policy()
        for profile in policy.profiles.values():
            if profile.preemptor is None:
                continue
            for move in profile.preemptor.select(healthy, now):
                t = self.table.get(move.rid)
                if t is not None and policy.profiles.get(t.profile) is profile:
                    self.execute(t, move, profile.preemptor, now)

    def execute(self, t: Tracked, move: Move, preemptor: Preemptor, now: float) -> bool:
        """Re-account `t` on the target at once, abort it where it runs; its relay sees the abort
        and continues it on the target from what was generated."""
        req = t.req
        target = self.pool.replicas.get(move.to)
        if (t.state is not RequestState.RUNNING or req.pinned or target is None or not target.healthy
                or move.to == req.replica or req.replica is None):
            return False
        source = req.replica
        self.pool.remove(req)
        self.pool.add(req, move.to)
        req.pinned = True
        t.move, t.move_reason = move, move.reason
        self.table.transition(t, RequestState.MOVING)
        preemptor.on_move(req, source, move.to, now)
        self.metrics.preemptions.inc()
        log.info("moving %s from %s to %s (%s)", req.rid, source, move.to, move.reason)
        self._abort(source, t.attempt_rid)
        return True

    def next_attempt(self, t: Tracked, body: dict, api: str, parts: list[Part]) -> dict:
        """The body that continues `t` on its new replica after `parts` (what the client got).
        The request stays MOVING until the continuation answers (the relay moves it on)."""
        done = sum(p.tokens for p in parts)
        t.move = None
        out = continuation(body, api, parts) if parts else dict(body)
        out["rid"] = self.table.next_attempt(t, done, "m")
        t.req.generated = max(t.req.generated, done)
        return out

    def too_late(self, t: Tracked) -> None:
        """The answer ended before the abort landed: the move is dropped, the answer stands."""
        t.move = None
        self.metrics.moves_late.inc()
        self.table.transition(t, RequestState.RUNNING)
