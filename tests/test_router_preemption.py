"""Preemption (moving a running request): the plugin through the builders, and the whole move over
HTTP with emulated SGLang replicas and real Redis (nothing mocked)."""
from __future__ import annotations

import json
import threading

import httpx
import pytest

from lenpred.router.interfaces import Estimate
from lenpred.router.testing import make_request, make_router
from tests.test_router_app import HEAD, publish_prediction, received, servers, wait_for  # noqa: F401

PREEMPT = HEAD + """plugins:
  - name: move
    type: predicted-rebalance-preemptor
    parameters: {growth: 2.0, cooldown_s: 0, move_cost_tokens: 0, interval_s: 0.02, min_remaining_tokens: 16}
profiles:
  default: {scorers: [{ref: least-load}], preemption: move}
replicas: {poll_interval_s: 0.1, timeout_s: 0.5, unhealthy_after: 1}
"""


def grown(rid, planned=100.0, now_p50=1000.0, prompt=100, step=20):
    """A running request placed with `planned` predicted tokens, now predicted at `now_p50` (PLP)."""
    r = make_request(rid, prompt_tokens=prompt, p50=planned, p90=planned)
    return r, Estimate(now_p50, now_p50 * 1.5, now_p50 - step, (now_p50 - step) * 1.5, step=step, source="plp")


def setup(params="", replicas=None, **kw):
    text = HEAD + f"""plugins:
  - {{name: move, type: predicted-rebalance-preemptor, parameters: {{{params}}}}}
profiles:
  default: {{preemption: move}}
"""
    sim = make_router(text, replicas=replicas or {"a": 100_000, "b": 100_000, "c": 100_000})
    return sim, sim.profile.preemptor


def place(sim, pre, req, replica, est=None):
    sim.pool.add(req, replica)
    pre.on_dispatch(req, replica)
    if est is not None:
        req.estimate = est


# -- the plugin --------------------------------------------------------------------------------
def test_moves_the_request_that_grew_off_the_overloaded_replica_to_the_least_loaded():
    sim, pre = setup("cooldown_s: 1")
    long_, est = grown("long", now_p50=3000)
    place(sim, pre, long_, "a", est)
    steady = make_request("steady", prompt_tokens=100, p50=2000)
    place(sim, pre, steady, "a")                       # big but as planned: not a candidate
    place(sim, pre, make_request("small-b", p50=500), "b")
    place(sim, pre, make_request("small-c", p50=100), "c")
    assert pre.select(sim.pool.healthy(), sim.clock()) == []   # cooldown since placement
    sim.clock.advance(1.0)
    moves = pre.select(sim.pool.healthy(), sim.clock())
    assert [(m.rid, m.to) for m in moves] == [("long", "c")]
    assert "growth x" in moves[0].reason and "gain" in moves[0].reason


def test_no_move_without_gain_above_cost_or_without_overload():
    # One request alone on a replica: moving it only moves the hot spot (gain 0).
    sim, pre = setup("cooldown_s: 0")
    alone, est = grown("alone", now_p50=3000)
    place(sim, pre, alone, "a", est)
    assert pre.select(sim.pool.healthy(), sim.clock()) == []

    # Overloaded and grown, but re-prefilling a long prompt costs more than the imbalance it removes.
    sim, pre = setup("cooldown_s: 0, prefill_cost: 1.0, move_cost_tokens: 0")
    big_prompt, est = grown("big-prompt", prompt=20_000, now_p50=1200, step=200)
    place(sim, pre, big_prompt, "a", est)
    place(sim, pre, make_request("other", prompt_tokens=100, p50=1500), "a")
    assert pre.select(sim.pool.healthy(), sim.clock()) == []

    # Balanced replicas: nobody is overloaded, nothing moves even though the prediction grew.
    sim, pre = setup("cooldown_s: 0")
    for name in "abc":
        r, est = grown(f"g-{name}", now_p50=3000)
        place(sim, pre, r, name, est)
    assert pre.select(sim.pool.healthy(), sim.clock()) == []


def test_guard_rails_growth_fallback_pinned_max_moves_and_cooldown():
    sim, pre = setup("cooldown_s: 5, max_moves_per_request: 1")
    r, est = grown("r", now_p50=3000)
    place(sim, pre, r, "a", est)
    place(sim, pre, make_request("other", p50=1500), "a")
    sim.clock.advance(10)
    r.pinned = True
    assert pre.select(sim.pool.healthy(), sim.clock()) == []          # move in progress / batch attempt
    r.pinned = False
    r.estimate = Estimate(3000, 4500, 2980, 4480, step=20, source="fallback")
    assert pre.select(sim.pool.healthy(), sim.clock()) == []          # no real prediction: never move
    r.estimate = Estimate(150, 200, 130, 180, step=20, source="plp")
    assert pre.select(sim.pool.healthy(), sim.clock()) == []          # grew x1.5 < growth 2
    r.estimate = est
    [m] = pre.select(sim.pool.healthy(), sim.clock())
    sim.pool.remove(r)
    sim.pool.add(r, m.to)
    pre.on_move(r, "a", m.to, sim.clock())
    place(sim, pre, make_request("pile", p50=20_000), m.to)           # now its new home is overloaded
    sim.clock.advance(10)
    assert pre.select(sim.pool.healthy(), sim.clock()) == []          # max one move per request
    pre.on_finish(r)
    assert "r" not in pre._moves and "r" not in pre._planned


def test_kv_pressure_and_target_room():
    # Two replicas, balanced by the mean rule, but a is over 90% of its KV: it counts as overloaded.
    sim, pre = setup("cooldown_s: 0, overload: 10", replicas={"a": 10_000, "b": 100_000})
    r, est = grown("r", now_p50=4000)
    place(sim, pre, r, "a", est)
    place(sim, pre, make_request("other", p50=2000, p90=2000, prompt_tokens=3000), "a")
    place(sim, pre, make_request("on-b", p50=8000, p90=8000), "b")
    assert [m.to for m in pre.select(sim.pool.healthy(), sim.clock())] == ["b"]
    # ... unless the target would itself pass its headroom.
    sim, pre = setup("cooldown_s: 0, overload: 10, target_headroom: 0.1", replicas={"a": 10_000, "b": 100_000})
    place(sim, pre, r, "a", est)
    place(sim, pre, make_request("other", p50=2000, p90=2000, prompt_tokens=3000), "a")
    place(sim, pre, make_request("on-b", p50=8000, p90=8000), "b")
    assert pre.select(sim.pool.healthy(), sim.clock()) == []


def test_max_moves_per_pass_and_unknown_parameter_rejected():
    sim, pre = setup("cooldown_s: 0, max_moves_per_pass: 2")
    for i in range(5):
        r, est = grown(f"g{i}", now_p50=3000)
        place(sim, pre, r, "a", est)
    assert len(pre.select(sim.pool.healthy(), sim.clock())) == 2
    from lenpred.router.config import PolicyError
    with pytest.raises(PolicyError, match="cooldwn_s: Extra inputs"):
        setup("cooldwn_s: 1")


# -- over HTTP: emulated replicas, real Redis --------------------------------------------------
def _body(api: str, n: int, stream: bool) -> dict:
    custom = {"emulated_output_len": n}
    if api == "chat":
        return {"model": "m", "messages": [{"role": "user", "content": "tell me a long story"}], "stream": stream,
                "max_tokens": 1000, "custom_params": custom}
    if api == "completions":
        return {"model": "m", "prompt": "once upon a time", "max_tokens": 1000, "stream": stream,
                "custom_params": custom}
    return {"input_ids": list(range(100, 140)), "sampling_params": {"max_new_tokens": 1000}, "stream": stream,
            "custom_params": custom}


PATH = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "generate": "/generate"}


def _text_of_stream(api: str, lines: list[str]) -> tuple[str, list[dict]]:
    objs = [json.loads(x[6:]) for x in lines if x.startswith("data: ") and x != "data: [DONE]"]
    if api == "generate":
        return objs[-1]["text"], objs
    key = (lambda c: (c.get("delta") or {}).get("content")) if api == "chat" else (lambda c: c.get("text"))
    return "".join(key(o["choices"][0]) or "" for o in objs if o.get("choices")), objs


@pytest.mark.parametrize("api,stream", [("chat", True), ("completions", True), ("generate", True),
                                        ("chat", False), ("generate", False)])
def test_request_moved_mid_answer_yields_exactly_the_right_tokens_once(servers, redis_url, api, stream):
    n = 120
    client, emus, _ = servers(PREEMPT, backends=2, redis_url=redis_url, step_base_s=0.01)
    a, b = emus
    wait_for(lambda: client.get("/health").json()["redis"] == "connected", what="subscription")
    # b out of the pool, so both requests land on a; then b comes back empty.
    httpx.post(f"{b.url}/emulator/health", json={"healthy": False})
    wait_for(lambda: not client.get("/health").json()["replicas"][b.url]["healthy"], what="b out")
    filler = threading.Thread(target=lambda: client.post("/v1/chat/completions", json=_body("chat", 300, False)))
    filler.start()
    wait_for(lambda: len(received(a)) == 1, what="filler on a")
    result: dict = {}

    def on_running(rid):
        wait_for(lambda: any(r["rid"] == rid for r in received(a)), what="request on a")
        httpx.post(f"{b.url}/emulator/health", json={"healthy": True})
        wait_for(lambda: client.get("/health").json()["replicas"][b.url]["healthy"], what="b back")
        # PLP says: far longer than the fallback planned (256); a holds two requests, b none.
        publish_prediction(redis_url, rid, p50=3000, source="plp", step=10)

    if stream:
        with client.stream("POST", PATH[api], json=_body(api, n, True)) as s:
            assert s.status_code == 200 and s.headers["x-lenpred-replica"] == a.url
            rid = s.headers["x-lenpred-rid"]
            lines = s.iter_lines()
            got = [next(lines) for _ in range(3)]
            on_running(rid)
            got += [x for x in lines if x]
        got = [x for x in got if x]
        assert got.count("data: [DONE]") == 1 and got[-1] == "data: [DONE]"
        text, objs = _text_of_stream(api, got)
        if api == "chat":
            assert sum(1 for o in objs if "role" in (o["choices"][0].get("delta") or {}) if o.get("choices")) == 1
            assert {o["id"] for o in objs} == {rid}
            assert objs[-1]["choices"][0]["finish_reason"] == "stop"
        elif api == "completions":
            assert {o["id"] for o in objs} == {rid}
        else:
            assert objs[-1]["meta_info"]["completion_tokens"] == n and len(objs[-1]["output_ids"]) == n
            assert objs[-1]["meta_info"]["id"] == rid
        # no finish_reason "abort" reached the client
        assert "abort" not in "".join(got)
    else:
        t = threading.Thread(target=lambda: result.update(r=client.post(PATH[api], json=_body(api, n, False))))
        t.start()
        wait_for(lambda: len(received(a)) == 2, what="request on a")
        rid = received(a)[-1]["rid"]
        on_running(rid)
        t.join(30)
        r = result["r"]
        assert r.status_code == 200 and r.headers["x-lenpred-rid"] == rid
        payload = r.json()
        if api == "generate":
            text = payload["text"]
            assert payload["meta_info"]["completion_tokens"] == n and payload["meta_info"]["lenpred_parts"] == 2
            assert payload["meta_info"]["finish_reason"]["type"] == "stop" and len(payload["output_ids"]) == n
        else:
            text = payload["choices"][0]["message"]["content"]
            assert payload["usage"]["completion_tokens"] == n and payload["id"] == rid
    assert text == "".join(f" t{k}" for k in range(1, n + 1))   # every token exactly once, in order

    view = client.get(f"/v1/lenpred/requests/{rid}").json()["router"]
    assert view["moves"] == 1 and view["replica"] == b.url and view["attempt_rid"] == f"{rid}-m1"
    assert view["state"] == "finished"
    fin = {f["rid"]: f for f in httpx.get(f"{a.url}/emulator/requests").json()["finished"]}
    assert fin[rid]["finish_reason"] == "abort" and 0 < fin[rid]["output_tokens"] < n
    cont = {r["rid"]: r for r in received(b)}
    assert f"{rid}-m1" in cont
    assert 'lenpred_router_preemptions_total 1.0' in client.get("/metrics").text
    filler.join(30)
    wait_for(lambda: all(v["inflight"] == 0 for v in client.get("/health").json()["replicas"].values()),
             what="accounting released")
