"""The router's core pieces without HTTP: the request state machine, the heap queue, the one
prediction type and its estimate arithmetic, the plugin contracts, and what the router imports."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from lenpred.contract.prediction import Estimate, Prediction
from lenpred.router.interfaces import Orderer, Plugin, PluginParameters, Preemptor, Scorer
from lenpred.router.lifecycle import TRANSITIONS, RequestState, RequestTable, Tracked
from lenpred.router.testing import make_request, make_requests, make_router

S = RequestState
HEAD = "apiVersion: lenpred.io/v1alpha1\nkind: RouterPolicy\n"


# -- the request state machine -------------------------------------------------------------------
LIFECYCLES = [
    ("served", [S.QUEUED, S.RUNNING, S.FINISHED]),
    ("probed then served", [S.PROBING, S.QUEUED, S.RUNNING, S.FINISHED]),
    ("moved, continued, served", [S.QUEUED, S.RUNNING, S.MOVING, S.RUNNING, S.FINISHED]),
    ("move too late", [S.QUEUED, S.RUNNING, S.MOVING, S.RUNNING, S.FINISHED]),
    ("continuation failed", [S.QUEUED, S.RUNNING, S.MOVING, S.FAILED]),
    ("shed", [S.QUEUED, S.DROPPED]),
    ("client gone while queued", [S.QUEUED, S.FAILED]),
    ("client gone while probing", [S.PROBING, S.FAILED]),
]


@pytest.mark.parametrize("name,path", LIFECYCLES, ids=[n for n, _ in LIFECYCLES])
def test_lifecycles_are_legal_and_recorded(name, path):
    seen = []
    table = RequestTable(10, clock=lambda: 1000.5, on_transition=lambda a, b: seen.append((a, b)))
    t = Tracked(make_request("r", prompt_text="some prompt"), "default", stream=False)
    table.add(t)
    for state in path:
        assert table.transition(t, state), f"{t.state} -> {state}"
    assert t.state is path[-1] and t.state.terminal
    assert [s for s, _ in t.history] == [S.RECEIVED, *path] and t.history[-1][1] == 0.5
    assert seen == list(zip([S.RECEIVED, *path], path))
    assert t.req.prompt_text == ""         # an ended request keeps lengths, not its prompt


ILLEGAL = [(S.RECEIVED, S.RUNNING), (S.QUEUED, S.MOVING), (S.RUNNING, S.QUEUED), (S.MOVING, S.FINISHED),
           (S.FINISHED, S.RUNNING), (S.DROPPED, S.FAILED), (S.FAILED, S.FINISHED)]


@pytest.mark.parametrize("frm,to", ILLEGAL, ids=[f"{a.value}->{b.value}" for a, b in ILLEGAL])
def test_illegal_transitions_are_refused_and_counted(frm, to):
    refused = []
    table = RequestTable(10, on_illegal=lambda a, b: refused.append((a, b)))
    t = Tracked(make_request("r"), "default", stream=False, state=frm)
    assert not table.transition(t, to)
    assert t.state is frm and refused == [(frm, to)]


def test_every_state_is_reachable_and_terminal_states_are_final():
    reachable = {S.RECEIVED}
    for frm in list(S):
        reachable |= TRANSITIONS[frm]
    assert reachable == set(S)
    assert {s for s in S if not TRANSITIONS[s]} == {s for s in S if s.terminal}


def test_attempts_of_moved_and_redispatched_requests_and_table_bound():
    table = RequestTable(3)
    t = Tracked(make_request("a"), "default", stream=True)
    table.add(t)
    assert table.attempt("a") is None          # not dispatched yet
    table.start_attempt(t, "a")
    assert table.attempt("a") == (t, 0)
    assert table.next_attempt(t, 0, "r") == "a-r1"
    assert table.next_attempt(t, tokens_before=12, kind="m") == "a-m1" == t.attempt_rid
    assert table.attempt("a-m1") == (t, 12)
    assert table.attempt("a") is None and table.attempt("a-r1") is None   # late records of earlier attempts
    table.forget_attempts(t)
    assert table.attempt("a-m1") is None and (t.moves, t.redispatches) == (1, 1)
    for rid in "bcd":
        table.add(Tracked(make_request(rid), "default", stream=False))
    assert list(table.tracked) == ["b", "c", "d"]


# -- the queue --------------------------------------------------------------------------------------
SRPT_KV = HEAD + """plugins:
  - {name: srpt, type: predicted-srpt-orderer, parameters: {aging_seconds: 10}}
  - {name: kv, type: predicted-kv-admitter, parameters: {headroom: 0.5}}
profiles:
  default: {ordering: srpt, admission: kv}
"""


async def _blocked(sim, n: int, **kw):
    """A replica held full by one request, and `n` requests queued behind it."""
    blocker = make_request("blocker", prompt_tokens=4900, p50=100, p90=200)
    placed = await sim.scheduler.submit(blocker, "default")
    reqs = make_requests(n, prompt_tokens=100, **kw)
    order: list[str] = []
    sim.scheduler._on_dispatch = lambda req, p: order.append(req.rid)
    tasks = [asyncio.create_task(sim.scheduler.submit(r, "default")) for r in reqs]
    await asyncio.sleep(0)
    return blocker, placed, reqs, tasks, order


async def test_a_prediction_update_rekeys_one_queued_request():
    sim = make_router(SRPT_KV, replicas={"a": 10_000})
    blocker, placed, reqs, tasks, order = await _blocked(sim, 3, p50=[900, 10, 300])
    assert sim.scheduler.depth() == 3
    reqs[0].estimate = Estimate.constant(5, 10, "egtp")   # the 900-token one turns out tiny
    sim.scheduler.update(reqs[0])
    sim.scheduler.release(blocker, placed.profile)
    await asyncio.gather(*tasks)
    assert order == ["req0", "req1", "req2"]


async def test_cancelled_and_expired_requests_leave_the_queue_lazily():
    sim = make_router(SRPT_KV + "queue: {max_wait_s: 5}\n", replicas={"a": 10_000})
    blocker, placed, reqs, tasks, order = await _blocked(sim, 3, p50=[10, 20, 30], arrival=[1000.0, 1001.0, 1002.0])
    tasks[0].cancel()
    await asyncio.sleep(0)
    assert sim.scheduler.depth() == 2
    sim.clock.advance(5.5)
    sim.scheduler.expire()      # everything queued at the same (fake) time expires at once
    results = await asyncio.gather(*tasks[1:], return_exceptions=True)
    assert [getattr(r, "reason", None) for r in results] == ["queue-timeout", "queue-timeout"]
    sim.scheduler.release(blocker, placed.profile)
    assert sim.scheduler.depth() == 0 and order == []


async def test_a_reload_that_changes_the_orderer_rekeys_the_queue():
    sim = make_router(SRPT_KV, replicas={"a": 10_000})
    blocker, placed, reqs, tasks, order = await _blocked(sim, 3, p50=[900, 10, 300], arrival=[1.0, 2.0, 3.0])
    fcfs = make_router(SRPT_KV.replace("ordering: srpt", "ordering: fcfs"), replicas={"a": 10_000})
    sim.policy.profiles["default"].orderer = fcfs.profile.orderer     # what a hot reload does to the profile
    sim.scheduler.release(blocker, placed.profile)
    await asyncio.gather(*tasks)
    assert order == ["req0", "req1", "req2"]


# -- one prediction type, one estimate arithmetic ---------------------------------------------------
def _pred(step=0, rem50=100.0, rem90=200.0, **kw):
    return Prediction.after("r", step, rem50, rem90, rem50, source="plp" if step else "egtp", head_version="t",
                            ts=1.0, **kw)


ESTIMATES = [
    # (record, max_tokens, before) -> (p50, p90, remaining_p50, remaining_p90, step)
    ("prefill, uncapped", _pred(), None, 0, (100, 200, 100, 200, 0)),
    ("prefill, capped by max_tokens", _pred(), 150, 0, (100, 150, 100, 150, 0)),
    ("after 40 tokens", _pred(40, 60, 120), None, 0, (100, 160, 60, 120, 40)),
    ("after 40, capped", _pred(40, 60, 120), 120, 0, (100, 120, 60, 80, 40)),
    ("continuation after 30 earlier tokens", _pred(10, 50, 90), None, 30, (90, 130, 50, 90, 40)),
    ("continuation, the cap shrinks by the earlier tokens", _pred(10, 50, 90), 100, 30, (90, 100, 50, 60, 40)),
]


@pytest.mark.parametrize("name,rec,max_tokens,before,expected", ESTIMATES, ids=[e[0] for e in ESTIMATES])
def test_estimate_from_record(name, rec, max_tokens, before, expected):
    e = Estimate.from_record(rec, max_tokens, before=before)
    assert (e.p50, e.p90, e.remaining_p50, e.remaining_p90, e.step) == expected
    assert e.source == rec.source and e.ts == rec.ts


def test_prediction_round_trips_and_refuses_bad_records():
    rec = _pred(16, 48, 96, prompt_tokens=7)
    assert (rec.p50, rec.p90, rec.mean) == (64, 112, 64)
    assert Prediction.from_hash({k.encode(): v.encode() for k, v in rec.to_hash().items()}) == rec
    for bad in ({}, {**rec.to_hash(), "p50": "nan"}, {**rec.to_hash(), "step": "x"}, {**rec.to_hash(), "ts": "inf"}):
        with pytest.raises(ValueError):
            Prediction.from_hash(bad)


# -- plugin contracts -------------------------------------------------------------------------------
def test_plugin_contracts_have_no_op_defaults_and_required_methods():
    p = PluginParameters()
    orderer, preemptor = Orderer("o", p, None), Preemptor("p", p, None)
    req = make_request(arrival=5.0)
    assert orderer.key(req) == 5.0 and orderer.engine_priority(req, 0.0) is None
    assert preemptor.select([], 0.0) == [] and preemptor.on_move(req, "a", "b", 0.0) is None

    class Incomplete(Scorer):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Incomplete("s", p, None)
    assert issubclass(Scorer, Plugin)


# -- packaging ----------------------------------------------------------------------------------------
def test_the_router_imports_no_torch_transformers_or_sglang():
    """`lenpred[router]` must run without them: check what importing the app actually loads."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import lenpred.router.app"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    modules = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    assert "lenpred" in modules and not modules & {"torch", "transformers", "sglang"}


def test_a_remembered_request_fits_in_its_byte_budget():
    """The request table's size comes from `limits.history_bytes` / RECORD_BYTES: check that an
    ended request (a served one, its prompt text dropped) really takes less than RECORD_BYTES."""
    import tracemalloc

    from lenpred.router.core import RECORD_BYTES

    table = RequestTable(100_000)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(2000):
        t = Tracked(make_request(f"lp-{i:032x}", prompt_text="p" * 5000, max_tokens=512), "default", stream=True)
        table.add(t)
        for state in (S.QUEUED, S.RUNNING, S.FINISHED):
            table.transition(t, state)
        table.start_attempt(t, t.req.rid)
        t.estimate_at_dispatch, t.status, t.queued_s = t.req.estimate, 200, 0.01
        table.forget_attempts(t)
    per_record = (tracemalloc.get_traced_memory()[0] - base) / 2000
    tracemalloc.stop()
    assert per_record < RECORD_BYTES, per_record
