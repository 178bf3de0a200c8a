"""Each policy plugin and the dispatcher, through the builders: no HTTP, no Redis, no GPU."""
from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from lenpred.router.config import FallbackSettings
from lenpred.router.interfaces import Estimate, Verdict
from lenpred.router.predictions import HistoryFallback
from lenpred.router.queue import Dropped, place
from lenpred.router.testing import make_request, make_requests, make_router

HEAD = "apiVersion: lenpred.io/v1alpha1\nkind: RouterPolicy\n"


def policy(plugins: str = "", **profile) -> str:
    prof = "".join(f"    {k}: {v}\n" for k, v in profile.items())
    return HEAD + (f"plugins:\n{plugins}" if plugins else "") + f"profiles:\n  default:\n{prof or '    {}'}\n"


KV = policy("  - {name: kv, type: predicted-kv-admitter, parameters: {quantile: 0.9, headroom: 0.5}}\n",
            admission="kv")


# -- estimates --------------------------------------------------------------------------------
def test_estimate_quantiles_and_remaining():
    e = Estimate(p50=100, p90=200, remaining_p50=60, remaining_p90=150, step=40, source="plp")
    assert e.total(0.5) == 100 and e.total(0.9) == 200
    assert 200 < e.total(0.95) < 300  # extrapolated on the normal scale
    assert e.remaining(0.5, generated=40) == 60 and e.remaining(0.5, generated=50) == 50
    assert e.remaining(0.5, generated=500) == 0


def test_history_fallback_buckets_then_global_then_constant():
    fb = HistoryFallback(FallbackSettings(default_output_tokens=100, p90_factor=3, min_samples=5))
    assert (fb.estimate(50, None).p50, fb.estimate(50, None).p90) == (100, 300)
    assert fb.estimate(50, 40).p90 == 40  # capped by max_tokens
    for n in range(10):
        fb.observe(1000, 500 + n)  # long prompts, long answers
    assert fb.estimate(1000, None).p50 == 505  # own bucket
    assert fb.estimate(10, None).p50 == 505  # no bucket yet: global history
    for _ in range(5):
        fb.observe(10, 7)
    assert fb.estimate(10, None).p50 == 7 and fb.estimate(10, None).source == "fallback"


# -- admission --------------------------------------------------------------------------------
def test_kv_admitter_counts_predicted_remaining_of_running_requests():
    sim = make_router(KV, replicas={"a": 10_000})
    admitter = sim.profile.admitter
    running = make_request("run", prompt_tokens=1000, p50=1000, p90=2000)
    sim.pool.add(running, "a")
    # capacity 10k x headroom 0.5 = 5000; in use 1000 + predicted p90 remaining 2000 = 3000
    assert admitter.admit(make_request(prompt_tokens=500, p50=500, p90=1000), sim.pool.healthy()).verdict is Verdict.ADMIT
    small_then_big = make_request(prompt_tokens=500, p50=1000, p90=2000)
    adm = admitter.admit(small_then_big, sim.pool.healthy())
    assert adm.verdict is Verdict.QUEUE and adm.reason == "saturated-kv"
    running.generated = 1500  # PLP-free: generated tokens eat into the remaining estimate
    assert admitter.admit(small_then_big, sim.pool.healthy()).verdict is Verdict.QUEUE  # 2500 in use + 500 left
    sim.pool.remove(running)
    huge = make_request(prompt_tokens=50_000, p50=10)
    assert admitter.admit(huge, sim.pool.healthy()).verdict is Verdict.ADMIT  # idle replica takes anything


def test_kv_admitter_restricts_placement_to_replicas_with_room():
    sim = make_router(KV, replicas={"a": 10_000, "b": 10_000})
    sim.pool.add(make_request("busy", prompt_tokens=4500, p50=100, p90=200), "a")
    adm = sim.profile.admitter.admit(make_request(prompt_tokens=500, p50=100), sim.pool.healthy())
    assert adm.verdict is Verdict.ADMIT and adm.eligible == {"b"}


async def test_saturation_queues_then_dispatches_on_release():
    sim = make_router(KV, replicas={"a": 10_000})
    first = make_request("first", prompt_tokens=3000, p50=500, p90=1000)
    second = make_request("second", prompt_tokens=3000, p50=500, p90=1000)
    placed = await sim.scheduler.submit(first, "default")
    waiter = asyncio.create_task(sim.scheduler.submit(second, "default"))
    await asyncio.sleep(0)
    assert not waiter.done() and sim.scheduler.depth() == 1
    sim.scheduler.release(first, placed.profile)
    assert (await waiter).replica == "a"


async def test_shed_mode_and_queue_limits():
    shed = KV.replace("headroom: 0.5}", "headroom: 0.5, on_saturation: shed}")
    sim = make_router(shed, replicas={"a": 10_000})
    await sim.scheduler.submit(make_request("a", prompt_tokens=3000, p50=500, p90=1000), "default")
    with pytest.raises(Dropped) as e:
        await sim.scheduler.submit(make_request("b", prompt_tokens=3000, p50=500, p90=1000), "default")
    assert (e.value.status, e.value.reason) == (429, "saturated-kv")

    sim = make_router(KV + "queue: {max_size: 1, max_wait_s: 5}\n", replicas={"a": 10_000})
    await sim.scheduler.submit(make_request("a", prompt_tokens=3000, p50=500, p90=1000), "default")
    waiter = asyncio.create_task(sim.scheduler.submit(make_request("b", prompt_tokens=3000, p50=500), "default"))
    await asyncio.sleep(0)
    with pytest.raises(Dropped, match="queue is full"):
        await sim.scheduler.submit(make_request("c"), "default")
    sim.clock.advance(6)
    sim.scheduler.expire()
    with pytest.raises(Dropped) as e:
        await waiter
    assert (e.value.status, e.value.reason) == (503, "queue-timeout")


async def test_no_healthy_replica_is_503():
    sim = make_router(policy(), replicas={"a": 10_000})
    sim.replica("a").healthy = False
    with pytest.raises(Dropped) as e:
        await sim.scheduler.submit(make_request(), "default")
    assert (e.value.status, e.value.reason) == (503, "no-healthy-replica")


# -- ordering ---------------------------------------------------------------------------------
SRPT = policy("  - {name: srpt, type: predicted-srpt-orderer, parameters: {aging_seconds: 10}}\n", ordering="srpt")


def test_fcfs_orders_by_arrival_and_sets_no_priority():
    sim = make_router(policy())
    reqs = make_requests(3, p50=[500, 10, 100], arrival=[3.0, 1.0, 2.0])
    order = sorted(reqs, key=sim.profile.orderer.key)
    assert [r.rid for r in order] == ["req1", "req2", "req0"]
    assert sim.profile.orderer.engine_priority(reqs[0], 5.0) is None


def test_srpt_orders_by_predicted_remaining_with_aging():
    orderer = make_router(SRPT).profile.orderer
    reqs = make_requests(3, p50=[500, 10, 100], arrival=0.0)
    assert [r.rid for r in sorted(reqs, key=orderer.key)] == ["req1", "req2", "req0"]
    # aging as a virtual deadline: every aging_seconds (10) waited halves the effective length
    old_long = make_request("old", p50=500, arrival=0.0)
    assert orderer.key(old_long) < orderer.key(make_request("new", p50=50, arrival=40.0))   # 500 / 2^4 < 50
    assert orderer.key(old_long) > orderer.key(make_request("new", p50=50, arrival=30.0))   # 500 / 2^3 > 50


def test_srpt_engine_priority_is_a_log_size_class():
    orderer = make_router(SRPT).profile.orderer
    short, long_ = make_request(p50=7), make_request(p50=1023)
    assert (orderer.engine_priority(short, 0), orderer.engine_priority(long_, 0)) == (-3, -10)
    low_first = make_router(SRPT.replace("aging_seconds: 10", "aging_seconds: 10, low_priority_values_first: true"))
    assert low_first.profile.orderer.engine_priority(short, 0) == 3


async def test_queue_dispatches_shortest_first_and_sends_priority():
    sim = make_router(SRPT.replace("ordering: srpt", "ordering: srpt\n    admission: kv").replace(
        "plugins:\n", "plugins:\n  - {name: kv, type: predicted-kv-admitter, parameters: {headroom: 0.5}}\n"),
        replicas={"a": 10_000})
    blocker = make_request("blocker", prompt_tokens=4900, p50=100, p90=200)
    placed = await sim.scheduler.submit(blocker, "default")
    tasks = [asyncio.create_task(sim.scheduler.submit(r, "default"))
             for r in make_requests(3, prompt_tokens=100, p50=[900, 10, 300])]
    await asyncio.sleep(0)
    assert sim.scheduler.depth() == 3
    order: list[str] = []
    sim.scheduler._on_dispatch = lambda req, p: order.append(req.rid)
    sim.scheduler.release(blocker, placed.profile)
    results = await asyncio.gather(*tasks)
    assert order == ["req1", "req2", "req0"]
    assert [p.priority for p in results] == [-10, -4, -9]  # request order: 900, 10, 300 tokens


# -- scoring and picking ----------------------------------------------------------------------
def test_predicted_load_scorer_sees_long_decodes_coming():
    sim = make_router(policy("  - {name: fl, type: predicted-load-scorer}\n", scorers="[{ref: fl}]"),
                      replicas={"a": 10_000, "b": 10_000})
    # Same request count and KV in use; a's request will decode 2000 more tokens, b's 20.
    sim.pool.add(make_request("x", prompt_tokens=500, p50=2000), "a")
    sim.pool.add(make_request("y", prompt_tokens=500, p50=20), "b")
    scores = sim.profile.scorers[0][0].score(make_request(), sim.pool.healthy())
    assert scores["b"] > scores["a"]
    assert place(sim.profile, make_request(), sim.pool.healthy()) == "b"


def test_least_load_scorer_uses_requests_or_tokens():
    sim = make_router(policy("  - {name: ll, type: least-load-scorer, parameters: {metric: tokens}}\n",
                             scorers="[{ref: ll}]"), replicas={"a": 10_000, "b": 10_000})
    sim.pool.add(make_request("x", prompt_tokens=5000), "a")
    sim.pool.add(make_request("y", prompt_tokens=10), "b")
    sim.pool.add(make_request("z", prompt_tokens=10), "b")
    assert place(sim.profile, make_request(), sim.pool.healthy()) == "b"
    by_requests = make_router(policy(scorers="[{ref: least-load}]"), replicas={"a": 10_000, "b": 10_000})
    by_requests.replica("b").load.num_running_reqs = 3  # engine report counts too
    assert place(by_requests.profile, make_request(), by_requests.pool.healthy()) == "a"


def test_round_robin_cycles():
    sim = make_router(policy(scorers="[{ref: round-robin}]"), replicas=3)
    picks = []
    for i in range(6):
        req = make_request(f"q{i}")
        picks.append(place(sim.profile, req, sim.pool.healthy()))
        for p in sim.profile.plugins():
            p.on_dispatch(req, picks[-1])
    assert picks == ["r0", "r1", "r2", "r0", "r1", "r2"]


def test_prefix_affinity_follows_the_shared_prefix_and_outweighs_small_load_gaps():
    sim = make_router(policy(
        "  - {name: fl, type: predicted-load-scorer}\n"
        "  - {name: px, type: prefix-affinity-scorer, parameters: {block_chars: 16}}\n",
        scorers="[{ref: fl, weight: 2}, {ref: px, weight: 1}]"), replicas={"a": 10_000, "b": 10_000})
    system = "You are a helpful assistant. " * 4
    first = make_request("first", prompt_text=system + "question one")
    sim.pool.add(first, "a")
    for p in sim.profile.plugins():
        p.on_dispatch(first, "a")
    px = sim.profile.scorers[1][0]
    follow = make_request("follow", prompt_text=system + "question two")
    assert px.score(follow, sim.pool.healthy())["a"] > 0.8 and px.score(follow, sim.pool.healthy())["b"] == 0
    sim.pool.add(make_request("other", prompt_tokens=90, p50=90), "b")  # b slightly less loaded than a
    assert place(sim.profile, follow, sim.pool.healthy()) == "a"
    assert px.score(make_request(prompt_text="unrelated " * 20), sim.pool.healthy()) == {"a": 0.0, "b": 0.0}


def test_scores_are_clamped_and_pickers_choose():
    sim = make_router(policy(scorers="[{ref: round-robin}]", picker="weighted-random"), replicas=2)
    picker = sim.profile.picker
    counts = Counter(picker.pick(make_request(), {"r0": 0.9, "r1": 0.1}) for _ in range(2000))
    assert 1650 < counts["r0"] < 1950
    assert set(picker.pick(make_request(), {"r0": 0.0, "r1": 0.0}) for _ in range(50)) == {"r0", "r1"}
    maxp = make_router(policy()).profile.picker
    assert maxp.pick(make_request(), {"r0": 0.2, "r1": 0.7}) == "r1"


async def test_stale_load_reports_count_what_was_dispatched_since():
    """Between two polls the engines' reports are stale; what the router dispatched since must be
    added to them, or a burst lands on the replica that reported least (the bunching seen at
    60 req/s in docs/results/schedule.md)."""
    sim = make_router(policy("  - {name: ll, type: least-load-scorer, parameters: {metric: tokens}}\n",
                             scorers="[{ref: ll}]", picker="max-score"),
                      replicas={"a": 100_000, "b": 100_000})
    a, b = sim.replica("a"), sim.replica("b")
    a.load.num_used_tokens, b.load.num_used_tokens = 5_000, 5_200   # non-streamed decodes the router
    a.load_seq = b.load_seq = 0                                      # cannot see, reported before the burst
    placed = [(await sim.scheduler.submit(r, "default")).replica
              for r in make_requests(6, prompt_tokens=500)]
    assert Counter(placed) == {"a": 3, "b": 3}
    assert a.current_tokens() == 5_000 + 1_500 and a.current_requests() == 3
    a.load_seq = max(r.seq for r in a.inflight.values())   # a fresh poll includes them
    assert a.current_tokens() == 5_000
