"""Builders that run the router's scheduling core without HTTP, Redis or a GPU (tests, replays).

    sim = make_router(POLICY_YAML, replicas={"a": 10_000, "b": 10_000})
    reqs = make_requests(3, p50=[10, 500, 50])
"""
from __future__ import annotations

import random
import textwrap
from dataclasses import dataclass
from typing import Sequence

import yaml

from lenpred.router.config import Policy, parse_policy
from lenpred.router.interfaces import EngineLoad, Estimate, Handle, RequestView
from lenpred.router.queue import Scheduler
from lenpred.router.state import Replica, ReplicaPool


class FakeClock:
    """A settable monotonic clock."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@dataclass
class SimRouter:
    policy: Policy
    pool: ReplicaPool
    scheduler: Scheduler
    clock: FakeClock
    handle: Handle

    @property
    def profile(self):
        return self.policy.default

    def replica(self, name: str) -> Replica:
        return self.pool.replicas[name]


def make_router(policy: str | dict, replicas: dict[str, int] | int = 2, seed: int = 0) -> SimRouter:
    """A healthy pool of replicas (name -> KV capacity in tokens, or a count of 10k-token ones)
    and a scheduler running `policy` (YAML text or a dict)."""
    data = yaml.safe_load(textwrap.dedent(policy)) if isinstance(policy, str) else policy
    clock = FakeClock()
    handle = Handle(clock=clock, rng=random.Random(seed))
    pol = parse_policy(data, "<test>", handle)
    if isinstance(replicas, int):
        replicas = {f"r{i}": 10_000 for i in range(replicas)}
    pool = ReplicaPool(list(replicas), client=None, settings=lambda: pol.spec.replicas)  # type: ignore[arg-type]
    for name, capacity in replicas.items():
        r = pool.replicas[name]
        r.healthy, r.load = True, EngineLoad(max_total_num_tokens=capacity)
    return SimRouter(pol, pool, Scheduler(pool, lambda: pol, clock), clock, handle)


def make_request(rid: str = "r", prompt_tokens: int = 100, p50: float = 100, p90: float | None = None,
                 arrival: float = 1000.0, generated: int = 0, source: str = "egtp", prompt_text: str = "",
                 max_tokens: int | None = None) -> RequestView:
    p90 = p50 * 2 if p90 is None else p90
    return RequestView(rid=rid, api="chat", prompt_tokens=prompt_tokens, prompt_text=prompt_text,
                       max_tokens=max_tokens, arrival=arrival, generated=generated,
                       estimate=Estimate(p50, p90, p50, p90, source=source))


def make_requests(n: int, prompt_tokens: int | Sequence[int] = 100, p50: float | Sequence[float] = 100,
                  arrival: float | Sequence[float] = 1000.0, prefix: str = "req") -> list[RequestView]:
    """n requests; each argument is one value for all or one per request."""
    def at(v, i):
        return v[i] if isinstance(v, Sequence) and not isinstance(v, str) else v
    return [make_request(f"{prefix}{i}", at(prompt_tokens, i), at(p50, i), arrival=at(arrival, i))
            for i in range(n)]
