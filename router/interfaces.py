"""Contracts between the router core and its plugins (contracts only: the core's implementations
live in `state.py`, `queue.py`, `core.py`; plugins in `lenpred.router.plugins.<stage>`).

One small interface per stage, in the order a request meets them:

    admission (Admitter) -> ordering (Orderer) -> placement (Scorer* -> weighted sum -> Picker)
    batch submissions: Batcher (groups a known set into micro-batches and assigns them to replicas)
    in flight: Preemptor (moves a request whose prediction grew off an overloaded replica)

What a plugin must write, and what it may leave to the base class (SMG's style: optional hooks are
no-ops, so a simple plugin is a few lines):

| role | must implement | defaults (override when needed) |
|---|---|---|
| every plugin | - | `on_dispatch(req, replica)`, `on_finish(req)`: no-ops |
| Admitter | - | `admit`: admit to every healthy replica |
| Orderer | - | `key`: arrival time (FCFS); `engine_priority`: None (send none) |
| Scorer | `score(req, replicas)` | - |
| Picker | `pick(req, scores)` | - |
| Batcher | `plan(reqs, replicas)` | `continue_plan`: plan the continuations uncapped; `needs_predictions = True` |
| Preemptor | - | `select`: no moves; `on_move`: no-op; `interval_s = 0.05` |

The data plugins see is plain and typed: `RequestView` (one request, with its output-length
`Estimate`) and `ReplicaView` (one engine replica: the load it reports plus the router's own
accounting of what it sent there).
"""
from __future__ import annotations

import abc
import enum
import random
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping, Protocol, Sequence

from pydantic import BaseModel, ConfigDict

from lenpred.contract.prediction import Estimate

__all__ = ["Role", "Estimate", "RequestView", "EngineLoad", "ReplicaView", "Verdict", "Admission", "Handle",
           "PluginParameters", "Plugin", "Admitter", "Orderer", "Scorer", "Picker", "MicroBatch", "BatchPlan",
           "Batcher", "Move", "Preemptor"]


class Role(str, enum.Enum):
    """The stage a plugin type serves; its type name ends with this suffix."""

    ADMITTER = "admitter"
    ORDERER = "orderer"
    SCORER = "scorer"
    PICKER = "picker"
    BATCHER = "batcher"
    PREEMPTOR = "preemptor"


@dataclass(eq=False)
class RequestView:
    """The router's view of one request (queued, running, or finished)."""

    rid: str
    api: str                      # "chat" | "completions" | "generate"
    prompt_tokens: int            # estimated at arrival (the router has no tokenizer)
    prompt_text: str              # for prefix affinity (dropped once the request ended)
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


@dataclass
class EngineLoad:
    """What the replica reports on `GET /v1/loads` (SGLang 0.5.23), summed over its DP ranks."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    num_used_tokens: int = 0
    max_total_num_tokens: int = 0
    token_usage: float = 0.0
    gen_throughput: float = 0.0


class ReplicaView(Protocol):
    """One engine replica: its last reported load and the requests this router has running there.
    The accounting methods add what the engine's (stale) report cannot know yet."""

    name: str
    load: EngineLoad
    inflight: Mapping[str, RequestView]

    def predicted_remaining(self, quantile: float) -> float:
        """Decode tokens still to come on this replica from the router's in-flight requests, at
        `quantile` of each request's remaining-length estimate."""

    def current_tokens(self) -> int:
        """KV tokens in use: the engine's report plus the prompts dispatched since it was taken,
        or the router's own count when that is larger."""

    def current_requests(self) -> int:
        """Running + waiting requests: the engine's report plus those dispatched since, or the
        router's own count when that is larger."""


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


class Plugin(abc.ABC):
    """Base of all plugins. A plugin class is its own factory: `cls(name, params, handle)`."""

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
        """Decide whether `req` may be dispatched now to one of the healthy `replicas`.
        Default: admit it to any of them."""
        return Admission.admit()


class Orderer(Plugin):
    role = Role.ORDERER

    def key(self, req: RequestView) -> float:
        """Sort key in the router queue: the smallest key is dispatched first. It must not change
        as time passes (express aging as a virtual deadline), only when the request's estimate
        does: the queue is a heap keyed once per estimate. Default: arrival time (FCFS)."""
        return req.arrival

    def engine_priority(self, req: RequestView, now: float) -> int | None:
        """SGLang `priority` to send with the request (None: leave it unset)."""
        return None


class Scorer(Plugin):
    role = Role.SCORER

    @abc.abstractmethod
    def score(self, req: RequestView, replicas: Sequence[ReplicaView]) -> dict[str, float]:
        """Score each candidate replica in [0, 1]; higher is better. Values are clamped."""


class Picker(Plugin):
    role = Role.PICKER

    @abc.abstractmethod
    def pick(self, req: RequestView, scores: Mapping[str, float]) -> str:
        """Choose one replica from the weighted total scores (never empty)."""


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

    @abc.abstractmethod
    def plan(self, reqs: Sequence[RequestView], replicas: Sequence[ReplicaView]) -> BatchPlan:
        """Group `reqs` (a known set, each with its estimate) into micro-batches on `replicas`."""

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
        must not be chosen. The router may refuse a move (the request finished meanwhile).
        Default: none."""
        return []

    def on_move(self, req: RequestView, source: str, target: str, now: float) -> None:
        """Called when the router carries out a move (after `select`)."""
