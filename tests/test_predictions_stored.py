"""The bulk stored form (Prediction.stored_after, used by the sidecar's write-behind) is exactly
Prediction.after(...).to_hash() / to_json(), and what the write-behind stores parses back."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis

from lenpred.contract import keys
from lenpred.contract.prediction import Prediction
from lenpred.sidecar.store import PredictionStore

CASES = [("r1", 0, 100.5, 300.25, 150.0, "egtp", "v1", 1_700_000_000.123, 12),
         ('we"ird\\rid\u00e9', 16, 0.001, 1e6, 3.0, "plp", 'ver "2"', 1.0, 0),
         ("r3", 8, 7.0, 9.0, 8.0, "last", "online-160", 2e9, 5000)]


@pytest.mark.parametrize("case", CASES)
def test_stored_after_equals_the_prediction_forms(case):
    rid, step, r50, r90, mean, src, ver, ts, pt = case
    p = Prediction.after(rid, step, r50, r90, mean, source=src, head_version=ver, ts=ts, prompt_tokens=pt)
    vals, js = Prediction.stored_after(*case)
    assert dict(zip(Prediction.HASH_FIELDS, vals)) == p.to_hash()
    assert json.loads(js) == json.loads(p.to_json())
    assert Prediction.from_hash(dict(zip(Prediction.HASH_FIELDS, vals))) == p


def test_write_behind_stores_what_the_router_reads(redis_url):
    async def go():
        st = PredictionStore(redis_url)
        await st.start()
        st.put_many([c[0] for c in CASES], [c[1:] for c in CASES])
        st.put("obj", Prediction.after("obj", 4, 10.0, 20.0, 12.0, source="plp", head_version="x", ts=5.0))
        assert await st.write_now([], [{"rid": "r1", "output_tokens": 99, "prompt_tokens": 12, "truncated": 0,
                                        "aborted": 0, "p50": 100.5, "p90": 300.25}])
        await st.close()
    r = redis.Redis.from_url(redis_url)
    sub = r.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(keys.events_channel("default"))
    asyncio.run(go())
    for c in CASES:
        got = Prediction.from_hash(r.hgetall(keys.pred_key("default", c[0])))
        want = Prediction.after(c[0], c[1], c[2], c[3], c[4], source=c[5], head_version=c[6], ts=c[7], prompt_tokens=c[8])
        if c[0] == "r1":
            want.true_len = 99
        assert got == want and 0 < r.ttl(keys.pred_key("default", c[0])) <= keys.DEFAULT_TTL_S
    assert Prediction.from_hash(r.hgetall(keys.pred_key("default", "obj"))).step == 4
    events, deadline = [], time.monotonic() + 5
    while time.monotonic() < deadline and len(events) < 5:
        m = sub.get_message(timeout=0.5)  # None also for the (ignored) subscribe confirmation
        if m is not None:
            events.append(json.loads(m["data"]))
    preds = [e for e in events if e["type"] == "prediction"]
    assert len(preds) == 4 and {e["rid"] for e in preds} == {c[0] for c in CASES} | {"obj"}
    for e in preds:
        Prediction.from_hash(e)
    assert any(e["type"] == "finished" and e["rid"] == "r1" for e in events)


@pytest.mark.parametrize("rid,tag", [
    ("lp-0a1b2c3d-" + "f" * 32, "0a1b2c3d"),          # a router's rid
    ("lp-0a1b2c3d-" + "f" * 32 + "-r1", "0a1b2c3d"),  # one of its attempts (re-dispatch, move)
    ("lpb-deadbeef-" + "0" * 32, "deadbeef"),         # a batch
    ("lp-" + "f" * 32, ""),                           # an untagged rid (older router)
    ("lp-0A1B2C3D-x", ""),                            # not lower-case hex
    ("lp-0a1b2c3-x", ""),                             # 7 digits
    ("r1", ""), ("", ""), ("-0a1b2c3d-", ""),
])
def test_rid_tag_names_the_router_channel(rid, tag):
    assert keys.rid_tag(rid) == tag
    assert keys.channel_for("ns", rid) == (f"lenpred:ns:events:{tag}" if tag else "lenpred:ns:events")


def test_events_go_to_their_router_channel_only(redis_url):
    """A tagged request's prediction and finished events are published on its router's channel,
    not on the shared one or another router's: a router parses only its own requests' events."""
    mine, other, untagged = "lp-aaaaaaaa-" + "1" * 32, "lp-bbbbbbbb-" + "2" * 32, "lp-" + "3" * 32
    r = redis.Redis.from_url(redis_url)
    subs = {}
    for name, tag in (("mine", "aaaaaaaa"), ("other", "bbbbbbbb"), ("shared", "")):
        subs[name] = r.pubsub(ignore_subscribe_messages=True)
        subs[name].subscribe(keys.events_channel("default", tag))

    async def go():
        st = PredictionStore(redis_url)
        await st.start()
        st.put_many([mine, other, untagged], [(0, 10.0, 20.0, 12.0, "egtp", "v", 1.0, 3)] * 3)
        fin = {"output_tokens": 9, "prompt_tokens": 3, "truncated": 0, "aborted": 0, "p50": 10.0, "p90": 20.0}
        assert await st.write_now([], [{"rid": rid, **fin} for rid in (mine, other, untagged)])
        await st.close()
    asyncio.run(go())
    for name, want in (("mine", mine), ("other", other), ("shared", untagged)):
        got, deadline = [], time.monotonic() + 3
        while time.monotonic() < deadline and len(got) < 3:
            m = subs[name].get_message(timeout=0.2)
            if m is not None:
                got.append(json.loads(m["data"]))
        assert sorted(e["type"] for e in got) == ["finished", "prediction"], (name, got)
        assert {e["rid"] for e in got} == {want}, name
