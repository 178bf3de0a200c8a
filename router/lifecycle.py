"""A request's life in the router as one state machine (vLLM's `RequestStatus`, made explicit):

    RECEIVED --> PROBING --> QUEUED --> RUNNING <--> MOVING
        |           |          |           |            |
        +-----------+----------+-----------+------------+--> FINISHED | FAILED | DROPPED

- RECEIVED: parsed and tracked, not queued yet.
- PROBING: probe-then-dispatch, waiting for the probe's prediction (profile `probe.enabled`).
- QUEUED: waiting in the router queue for admission and placement.
- RUNNING: sent to a replica; the answer is streaming back or awaited.
- MOVING: a preemptor's move was decided: the attempt is being aborted at the source and will be
  continued on the target (back to RUNNING), or the answer ended first (back to RUNNING, then done).
- FINISHED (answered), FAILED (upstream error, broken stream, client gone), DROPPED (shed, queue
  full or timed out, no healthy replica): terminal.

Every state change goes through `RequestTable.transition`, which checks it against `TRANSITIONS`,
records it on the request (state and seconds since arrival) and reports it to a metric callback;
an illegal transition is refused, logged and counted (a bug, never a client's fault).
"""
from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from lenpred.contract.prediction import Estimate
from lenpred.router.interfaces import Move, RequestView

log = logging.getLogger(__name__)


class RequestState(str, enum.Enum):
    RECEIVED = "received"
    PROBING = "probing"
    QUEUED = "queued"
    RUNNING = "running"
    MOVING = "moving"
    FINISHED = "finished"
    FAILED = "failed"
    DROPPED = "dropped"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def active(self) -> bool:
        """Queued or in flight: predictions for it still matter."""
        return self in _ACTIVE


S = RequestState
_TERMINAL = frozenset({S.FINISHED, S.FAILED, S.DROPPED})
_ACTIVE = frozenset({S.PROBING, S.QUEUED, S.RUNNING, S.MOVING})
TRANSITIONS: dict[RequestState, frozenset[RequestState]] = {
    S.RECEIVED: frozenset({S.PROBING, S.QUEUED, S.FAILED}),
    S.PROBING: frozenset({S.QUEUED, S.FAILED}),
    S.QUEUED: frozenset({S.RUNNING, S.DROPPED, S.FAILED}),
    S.RUNNING: frozenset({S.MOVING, S.FINISHED, S.FAILED}),
    S.MOVING: frozenset({S.RUNNING, S.FAILED}),
    S.FINISHED: frozenset(),
    S.FAILED: frozenset(),
    S.DROPPED: frozenset(),
}
MAX_HISTORY = 16
"""Transitions kept per request (moves are bounded by the preemptor; this bounds memory anyway)."""


@dataclass(eq=False)
class Probe:
    """Probe-then-dispatch: the prefill-only copy sent before queueing, and what it gave."""

    rid: str
    replica: str
    outcome: str = "timeout"          # prediction | timeout | failed
    wait_ms: float = 0.0
    estimate: str | None = None       # header form of the estimate it gave

    def header(self) -> str:
        return f"replica={self.replica};outcome={self.outcome};wait_ms={self.wait_ms:.1f}"


@dataclass(eq=False)
class Tracked:
    """One request, as the router follows it from arrival to its end (and the debug endpoint
    reports it)."""

    req: RequestView
    profile: str
    stream: bool
    tenant: str = ""
    state: RequestState = S.RECEIVED
    history: list[tuple[RequestState, float]] = field(default_factory=list)
    engine_priority: int | None = None
    queued_s: float | None = None
    status: int | None = None
    drop_reason: str | None = None
    estimate_at_dispatch: Estimate | None = None   # formatted only when someone asks
    attempt_rid: str = ""             # rid of the attempt running now (rid, rid-rK after a re-dispatch, rid-mK after a move)
    move: Move | None = None          # decided and not yet carried out (state MOVING)
    moves: int = 0
    move_reason: str = ""             # reason of the last move decided
    redispatches: int = 0
    aliases: list[str] = field(default_factory=list)
    probe: Probe | None = None
    watch: asyncio.Timeout | None = field(default=None, repr=False)
    """The deadline of the attempt waiting for its first byte; cut short when its replica is ejected."""
    evacuated: str = ""               # why the attempt's deadline was cut short (its replica left the pool)
    evacuated_from: str | None = None
    error: str = ""                   # why the request failed (clear, for the debug endpoint)

    def evacuate(self, replica: str, why: str) -> bool:
        """End the wait for the first byte now (`replica`, where it runs, left the pool): the
        request path sees a timeout marked as an evacuation and sends the request elsewhere. False
        if no wait is on."""
        if self.watch is None or self.req.replica != replica:
            return False
        try:
            self.watch.reschedule(asyncio.get_running_loop().time())
        except RuntimeError:          # the deadline context has already been left
            return False
        self.evacuated, self.evacuated_from = why, replica
        return True

    def view(self) -> dict:
        """The debug endpoint's JSON for this request (lengths and counts, never prompt text)."""
        req = self.req
        return {
            "state": self.state.value, "profile": self.profile, "api": req.api, "stream": self.stream,
            "replica": req.replica, "status": self.status, "drop_reason": self.drop_reason,
            "prompt_tokens_estimate": req.prompt_tokens, "max_tokens": req.max_tokens,
            "generated": req.generated, "queued_s": self.queued_s, "engine_priority": self.engine_priority,
            "estimate_at_dispatch": self.estimate_at_dispatch and self.estimate_at_dispatch.header(),
            "estimate": vars(req.estimate).copy(), "fallback_used": req.estimate.source == "fallback",
            "moves": self.moves, "attempt_rid": self.attempt_rid, "move_reason": self.move_reason or None,
            "redispatches": self.redispatches, "error": self.error or None,
            "probe": vars(self.probe).copy() if self.probe else None,
            "history": [[s.value, round(t, 6)] for s, t in self.history],
        }


class RequestTable:
    """The requests this router knows about: the last `capacity` ones, by rid, and the attempt rids
    of moved requests (`<rid>-m<k>`), so a prediction for an attempt finds its request."""

    def __init__(self, capacity: int, clock: Callable[[], float] = time.monotonic,
                 on_transition: Callable[[RequestState, RequestState], None] = lambda a, b: None,
                 on_illegal: Callable[[RequestState, RequestState], None] = lambda a, b: None):
        self.capacity = capacity
        self._clock = clock
        self._on_transition, self._on_illegal = on_transition, on_illegal
        self.tracked: OrderedDict[str, Tracked] = OrderedDict()
        self._attempts: dict[str, tuple[Tracked, int]] = {}

    def __len__(self) -> int:
        return len(self.tracked)

    def get(self, rid: str) -> Tracked | None:
        return self.tracked.get(rid)

    def add(self, t: Tracked) -> None:
        t.history.append((t.state, 0.0))
        self.tracked[t.req.rid] = t
        while len(self.tracked) > self.capacity:
            self.tracked.popitem(last=False)

    def transition(self, t: Tracked, to: RequestState) -> bool:
        """Move `t` to state `to` if the state machine allows it; False (logged, counted) if not."""
        frm = t.state
        if to not in TRANSITIONS[frm]:
            log.error("illegal request transition %s -> %s for %s", frm.value, to.value, t.req.rid)
            self._on_illegal(frm, to)
            return False
        t.state = to
        if len(t.history) < MAX_HISTORY:
            t.history.append((to, self._clock() - t.req.arrival))
        if to.terminal:
            t.req.prompt_text = ""      # only placement needs it; the history keeps lengths, not text
        self._on_transition(frm, to)
        return True

    def end(self, t: Tracked, ok: bool) -> None:
        """The answer is over: FINISHED or FAILED, unless the request already ended."""
        if not t.state.terminal:
            self.transition(t, S.FINISHED if ok else S.FAILED)

    # -- attempts: the engine rids a request ran under ----------------------------------------
    def start_attempt(self, t: Tracked, rid: str, tokens_before: int = 0) -> None:
        """`t` runs now as engine rid `rid` after `tokens_before` tokens of earlier attempts;
        predictions for the attempt it replaces are ignored from now on."""
        self._attempts.pop(t.attempt_rid, None)
        t.attempt_rid = rid
        if rid != t.req.rid:
            t.aliases.append(rid)
        self._attempts[rid] = (t, tokens_before)

    def next_attempt(self, t: Tracked, tokens_before: int, kind: str) -> str:
        """Start the next attempt of `t`: `kind` "m" after a move (`<rid>-m<k>`), "r" after a
        re-dispatch (`<rid>-r<k>`). Returns its rid."""
        if kind == "m":
            t.moves += 1
            n = t.moves
        else:
            t.redispatches += 1
            n = t.redispatches
        rid = f"{t.req.rid}-{kind}{n}"
        self.start_attempt(t, rid, tokens_before)
        return rid

    def attempt(self, rid: str) -> tuple[Tracked, int] | None:
        """The request an engine rid belongs to and the tokens its earlier attempts produced; None
        for unknown rids and for attempts a request has moved on from."""
        return self._attempts.get(rid)

    def forget_attempts(self, t: Tracked) -> None:
        self._attempts.pop(t.attempt_rid, None)
