"""`lenpred bench queue`: the router queue's cost with N requests waiting (no HTTP, no Redis).

A replica is held full by one request (KV admission), N requests queue behind it under the
predicted-srpt orderer, then: every arrival (submit + dispatch pass), U prediction updates of random
queued requests (what `Router._on_prediction` does: re-key + dispatch pass), and the drain once room
is made (one pass dispatches all N). The same workload runs through the router's heap queue
(`lenpred.router.queue.Scheduler`) and through a reference that works as the queue did before it:
a list re-sorted by orderer key on every dispatch pass and popped from the front.

    lenpred bench queue --n 10000 --samples 500 --json out.json --md out.md
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time

from lenpred.bench import report
from lenpred.contract.prediction import Estimate
from lenpred.router.queue import ProfileQueue, Scheduler
from lenpred.router.testing import make_request, make_router

POLICY = """apiVersion: lenpred.io/v1alpha1
kind: RouterPolicy
plugins:
  - {name: srpt, type: predicted-srpt-orderer}
  - {name: kv, type: predicted-kv-admitter, parameters: {headroom: 0.5}}
profiles:
  default: {ordering: srpt, admission: kv}
queue: {max_size: 1000000}
"""
CAPACITY = 10_000


class SortedListQueue(ProfileQueue):
    """The queue as it was: a list sorted by orderer key once per dispatch pass, popped from the
    front; a prediction update re-keys nothing (the next pass re-sorts everything)."""

    def __init__(self, orderer):
        super().__init__(orderer)
        self.items: list = []
        self.sorted = False

    def push(self, w) -> None:
        self.live += 1
        self.items.append(w)

    def rekey(self, w) -> None:
        pass

    def rebuild(self, orderer) -> None:
        self.orderer = orderer

    def peek(self):
        if not self.sorted:
            self.items.sort(key=lambda w: self.orderer.key(w.req))
            self.sorted = True
        while self.items and not self.items[0].live():
            self.items.pop(0)
        return self.items[0] if self.items else None

    def pop(self, w) -> None:
        self.items.pop(0)
        self.discard(w)


class SortedListScheduler(Scheduler):
    """The same dispatcher over `SortedListQueue`s, each sorted at the start of every pass.
    `filling`: skip the passes while the untimed backlog is queued (n sorts of up to n items)."""

    filling = False

    def _new_queue(self, orderer):
        return SortedListQueue(orderer)

    def dispatch(self) -> None:
        if self.filling:
            return
        for q in self.queues.values():
            q.sorted = False
        super().dispatch()


def _pcts(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"mean_us": statistics.fmean(xs) * 1e6, "p50_us": xs[len(xs) // 2] * 1e6,
            "p99_us": xs[min(int(len(xs) * 0.99), len(xs) - 1)] * 1e6}


def _requests(n: int, seed: int):
    rng = random.Random(seed)
    return [make_request(f"q{i}", prompt_tokens=100, p50=rng.lognormvariate(5, 1), arrival=1000.0 + i * 0.001)
            for i in range(n)]


def _updates(reqs, samples: int, seed: int, update) -> list[float]:
    """Time `samples` prediction updates of random queued requests (re-key + dispatch pass)."""
    rng = random.Random(seed + 1)
    out = []
    for _ in range(samples):
        r = rng.choice(reqs)
        r.estimate = Estimate.constant(rng.lognormvariate(5, 1), 400, "plp")
        t0 = time.perf_counter()
        update(r)
        out.append(time.perf_counter() - t0)
    return out


def _open(sim) -> None:
    """Make room for everything, with O(1) admission and placement (a replica that reports no KV
    capacity is not judged by the admitter; one replica needs no scoring), so the drain measures
    the queue, not the admitter's O(in flight) demand sums."""
    sim.replica("a").load.max_total_num_tokens = 0


async def _run(n: int, samples: int, seed: int, scheduler: type[Scheduler]) -> dict:
    sim = make_router(POLICY, replicas={"a": CAPACITY})
    sim.scheduler = scheduler(sim.pool, lambda: sim.policy, sim.clock)
    blocker = make_request("blocker", prompt_tokens=CAPACITY // 2 - 100, p50=100, p90=100)
    placed = await sim.scheduler.submit(blocker, "default")
    reqs = _requests(n + samples, seed)
    sim.scheduler.filling = True        # the backlog is not timed: no passes while it is queued
    tasks = [asyncio.ensure_future(sim.scheduler.submit(r, "default")) for r in reqs[:n]]
    await asyncio.sleep(0)
    sim.scheduler.filling = False
    arrivals = []
    for r in reqs[n:]:                  # arrivals at depth >= n
        t0 = time.perf_counter()
        tasks.append(asyncio.ensure_future(sim.scheduler.submit(r, "default")))
        await asyncio.sleep(0)          # the submit runs: push + dispatch pass
        arrivals.append(time.perf_counter() - t0)
    assert sim.scheduler.depth() == n + samples

    def update(r) -> None:
        sim.scheduler.update(r)
        sim.scheduler.dispatch()

    ups = _updates(reqs, samples, seed, update)
    _open(sim)
    t0 = time.perf_counter()
    sim.scheduler.release(blocker, placed.profile)
    drain = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    return {"arrival": _pcts(arrivals), "update": _pcts(ups), "drain_ms": drain * 1000}


def render(result: dict) -> str:
    a = result["args"]
    rows = []
    for name, r in result["queues"].items():
        rows.append({"queue": name, "arrival_mean_us": r["arrival"]["mean_us"], "arrival_p99_us": r["arrival"]["p99_us"],
                     "update_p50_us": r["update"]["p50_us"], "update_p99_us": r["update"]["p99_us"],
                     "drain_ms": r["drain_ms"]})
    h, s = result["queues"]["heap (router)"], result["queues"]["sorted list (before)"]
    return "\n".join([
        "### `lenpred bench queue` — router queue cost", "",
        f"Command: `{result['command']}`", "",
        f"{a['n']} requests queued behind a full replica (predicted-kv-admitter), predicted-srpt-orderer; then "
        f"{a['samples']} more arrivals and {a['samples']} prediction updates of random queued requests, each "
        "followed by a dispatch pass; then one pass drains the queue (admission and placement made O(1), so the "
        "drain is the queue's own cost). Arrival = submit + dispatch pass + one asyncio task switch. Both rows "
        "run the same dispatcher (`Scheduler`); only the queue differs. One process, no HTTP.",
        f"Machine: {result['environment'].get('cpu_count', '?')} CPUs, load average {result['loadavg']}.", "",
        report.markdown_table(rows, ["queue", "arrival_mean_us", "arrival_p99_us", "update_p50_us", "update_p99_us",
                                     "drain_ms"]), "",
        f"A prediction update: {s['update']['p50_us'] / h['update']['p50_us']:.0f}x cheaper with the heap (p50).", ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lenpred bench queue", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="requests waiting")
    p.add_argument("--samples", type=int, default=500, help="arrivals and prediction updates timed at that depth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    args = p.parse_args(argv)
    result = {"bench": "queue", "args": vars(args), "environment": report.environment(),
              "command": "lenpred bench queue " + " ".join(argv if argv is not None else sys.argv[1:]),
              "loadavg": [round(x, 2) for x in os.getloadavg()],
              "queues": {"heap (router)": asyncio.run(_run(args.n, args.samples, args.seed, Scheduler)),
                         "sorted list (before)": asyncio.run(_run(args.n, args.samples, args.seed,
                                                                  SortedListScheduler))}}
    report.write(result, args.json, args.md, render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
