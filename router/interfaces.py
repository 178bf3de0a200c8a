"""Contracts between the router core and its plugins.

One small interface per stage, in the order a request meets them:

    admission (Admitter) -> ordering (Orderer) -> placement (Scorer* -> weighted sum -> Picker)
    batch submissions: Batcher (groups a known set into micro-batches and assigns them to replicas)
    in flight: Preemptor (moves a request whose prediction grew off an overloaded replica)

The data plugins see is plain and typed: `RequestView` (one request, with its output-length
`Estimate`) and `ReplicaView` (one engine replica: the load it reports plus the router's own
accounting of what it sent there). Implementations live in `lenpred.router.plugins.<stage>`.
"""
from __future__ import annotations

import enum
import functools
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping, Sequence

from pydantic import BaseModel, ConfigDict

_Z90 = statistics.NormalDist().inv_cdf(0.9)


class Role(str, enum.Enum):
    """The stage a plugin type serves; its type name ends with this suffix."""

    ADMITTER = "admitter"
    ORDERER = "orderer"
    SCORER = "scorer"
    PICKER = "picker"
    BATCHER = "batcher"
    PREEMPTOR = "preemptor"


@dataclass
class Estimate:
    """Output-length estimate for one request, in tokens.

    `p50`/`p90` are *total* output lengths; `remaining_*` are the tokens still to come when the
    estimate was made, after `step` tokens had been decoded. `source` is `egtp` (prompt, at
    prefill), `plp` (decode state) or `fallback` (heuristic: no fresh prediction).
    """

    p50: float
    p90: float
    remaining_p50: float
    remaining_p90: float
    step: int = 0
    source: str = "fallback"
    ts: float = 0.0

    def total(self, quantile: float) -> float:
        """Total output length at `quantile`, interpolating p50/p90 on a normal scale."""
        return _at_quantile(self.p50, self.p90, quantile)

    def remaining(self, quantile: float, generated: int) -> float:
        """Tokens still to come at `quantile`, given `generated` tokens seen so far."""
        rem = _at_quantile(self.remaining_p50, self.remaining_p90, quantile)
        return max(rem - max(generated - self.step, 0), 0.0)

    def header(self) -> str:
        return f"p50={self.p50:.0f};p90={self.p90:.0f};source={self.source};step={self.step}"


@functools.lru_cache(maxsize=64)
def _quantile_factor(q: float) -> float:
    """Where `q` sits between p50 (0) and p90 (1) on a normal scale."""
    return 0.0 if q == 0.5 else 1.0 if q == 0.9 else statistics.NormalDist().inv_cdf(q) / _Z90


def _at_quantile(p50: float, p90: float, q: float) -> float:
    if q == 0.5:
        return p50
    if q == 0.9:
        return p90
    return max(p50 + (p90 - p50) * _quantile_factor(q), 0.0)


@dataclass
class RequestView:
    """The router's view of one request (queued, running, or finished)."""

    rid: str
    api: str                      # "chat" | "completions" | "generate"
    prompt_tokens: int            # estimated at arrival (the router has no tokenizer)
    prompt_text: str              # for prefix affinity
    max_tokens: int | None
    arrival: float                # monotonic seconds
    estimate: Estimate
    client_priority: int | None = None
    replica: str | None = None
    generated: int = 0            # tokens seen streaming back (0 for non-streamed until done)
    pinned: bool = False          # the router will not move it (batch attempt, move in progress)
    seq: int = 0                  # dispatch order in the pool (0: never dispatched)

    def progress(self) -> int:
        """Output tokens produced so far: counted while streaming, else the step of the latest
        PLP prediction (a non-streamed answer is only counted when it is done)."""
        return max(self.generated, self.estimate.step if self.estimate.source == "plp" else 0)

    def kv_tokens(self, quantile: float) -> float:
        """KV tokens this request will hold at its end, at `quantile`."""
        return self.prompt_tokens + self.generated + self.estimate.remaining(quantile, self.generated)


@dataclass
class EngineLoad:
    """What the replica reports on `GET /v1/loads` (SGLang 0.5.23), summed over its DP ranks."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    num_used_tokens: int = 0
    max_total_num_tokens: int = 0
    token_usage: float = 0.0
    gen_throughput: float = 0.0

    @classmethod
    def from_v1_loads(cls, payload: Mapping) -> "EngineLoad":
        ranks = payload.get("loads") or []
        return cls(
            num_running_reqs=sum(int(r.get("num_running_reqs", 0)) for r in ranks),
            num_waiting_reqs=sum(int(r.get("num_waiting_reqs", 0)) for r in ranks),
            num_used_tokens=sum(int(r.get("num_used_tokens", 0)) for r in ranks),
            max_total_num_tokens=sum(int(r.get("max_total_num_tokens", 0)) for r in ranks),
            token_usage=max((float(r.get("token_usage", 0.0)) for r in ranks), default=0.0),
            gen_throughput=sum(float(r.get("gen_throughput", 0.0)) for r in ranks),
        )


@dataclass
class ReplicaView:
    """One engine replica: its last reported load and the requests this router has running there."""

    name: str
    load: EngineLoad = field(default_factory=EngineLoad)
    inflight: dict[str, RequestView] = field(default_factory=dict)
    load_seq: int = -1
    """Dispatch `seq` when `load` was requested: requests dispatched later are not in the report
    (-1: no report taken into account yet, every in-flight request counts as unreported)."""

    def predicted_remaining(self, quantile: float) -> float:
        """Decode tokens still to come on this replica from the router's in-flight requests:
        the sum of `r.estimate.remaining(quantile, r.generated)`, inlined because scorers and
        admitters call it for every replica on every placement (O(in-flight) each time)."""
        k, total = _quantile_factor(quantile), 0.0
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


class Verdict(str, enum.Enum):
    ADMIT = "admit"
    QUEUE = "queue"
    SHED = "shed"


@dataclass(frozen=True)
class Admission:
    verdict: Verdict
    reason: str = ""
    eligible: frozenset[str] | None = None  # replicas the request may go to; None = all

    @classmethod
    def admit(cls, eligible: frozenset[str] | None = None) -> "Admission":
        return cls(Verdict.ADMIT, eligible=eligible)


@dataclass
class Handle:
    """Router services a plugin may use. Tests pass a fixed clock and a seeded rng."""

    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)


class PluginParameters(BaseModel):
    """Base of every plugin's parameters model: defaults live on the fields; typos fail."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Plugin:
    """Base of all plugins. Hooks default to no-ops so simple plugins stay small."""

    type_name: ClassVar[str]
    role: ClassVar[Role]
    Parameters: ClassVar[type[PluginParameters]] = PluginParameters

    def __init__(self, name: str, params: PluginParameters, handle: Handle):
        self.name = name
        self.params = params
        self.handle = handle

    def on_dispatch(self, req: RequestView, replica: str) -> None:
        """Called after placement, before the request is sent."""

    def on_finish(self, req: RequestView) -> None:
        """Called when a dispatched request ends (done, failed or cancelled)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, params={self.params!r})"


class Admitter(Plugin):
    role = Role.ADMITTER

    def admit(self, req: RequestView, replicas: Sequence[ReplicaView]) -> Admission:
        """Decide whether `req` may be dispatched now to one of the healthy `replicas`."""
        raise NotImplementedError


class Orderer(Plugin):
    role = Role.ORDERER

    def key(self, req: RequestView, now: float) -> float:
        """Sort key in the router queue: the smallest key is dispatched first."""
        raise NotImplementedError

    def engine_priority(self, req: RequestView, now: float) -> int | None:
        """SGLang `priority` to send with the request (None: leave it unset)."""
        return None


class Scorer(Plugin):
    role = Role.SCORER

    def score(self, req: RequestView, replicas: Sequence[ReplicaView]) -> dict[str, float]:
        """Score each candidate replica in [0, 1]; higher is better. Values are clamped."""
        raise NotImplementedError


class Picker(Plugin):
    role = Role.PICKER

    def pick(self, req: RequestView, scores: Mapping[str, float]) -> str:
        """Choose one replica from the weighted total scores (never empty)."""
        raise NotImplementedError


@dataclass
class MicroBatch:
    """Requests released together to one replica. `max_tokens` caps each member's output (FCR:
    the batch's predicted bucket; members that hit it are continued later)."""

    replica: str
    requests: list[RequestView]
    max_tokens: int | None = None
    predicted_cost: float = 0.0


@dataclass
class BatchPlan:
    """Micro-batches in release order per replica. `sequential`: a replica gets its next
    micro-batch only when the previous one has finished (static-batching engines); `queued`: every
    micro-batch is sent at once, in order, each member tagged with its micro-batch id and size, for
    engines that queue tagged batches and run them one at a time (no turnaround between batches);
    `all`: every request is sent at once in plan order, untagged, and the engine's continuous
    batching takes it from there."""

    batches: list[MicroBatch]
    release: str = "sequential"

    def per_replica(self) -> dict[str, list[MicroBatch]]:
        out: dict[str, list[MicroBatch]] = {}
        for b in self.batches:
            out.setdefault(b.replica, []).append(b)
        return out


class Batcher(Plugin):
    role = Role.BATCHER
    needs_predictions: ClassVar[bool] = True
    """Whether the batch runner should probe (prefill-only) first so EGTP predictions exist."""

    def plan(self, reqs: Sequence[RequestView], replicas: Sequence[ReplicaView]) -> BatchPlan:
        """Group `reqs` (a known set, each with its estimate) into micro-batches on `replicas`."""
        raise NotImplementedError

    def continue_plan(self, reqs: Sequence[RequestView], replicas: Sequence[ReplicaView]) -> BatchPlan:
        """Plan the continuations of requests that hit their micro-batch's cap (FCR). Default:
        plan them like new requests, uncapped."""
        plan = self.plan(reqs, replicas)
        for b in plan.batches:
            b.max_tokens = None
        return plan


@dataclass(frozen=True)
class Move:
    """A preemptor's decision: abort `rid` where it runs and continue it on `to`."""

    rid: str
    to: str
    reason: str = ""


class Preemptor(Plugin):
    role = Role.PREEMPTOR
    interval_s: float = 0.05
    """The router calls `select` at most this often (prediction updates arrive per decode step)."""

    def select(self, replicas: Sequence[ReplicaView], now: float) -> list[Move]:
        """Requests to move now (called on prediction updates and load reports, coalesced to at
        most once per `interval_s`). `replicas` are the healthy ones; requests with `pinned` set
        must not be chosen. The router may refuse a move (the request finished meanwhile)."""
        raise NotImplementedError

    def on_move(self, req: RequestView, source: str, target: str, now: float) -> None:
        """Called when the router carries out a move (after `select`)."""
