"""The router over real HTTP: emulated SGLang backends, real Redis, uvicorn on free ports."""
from __future__ import annotations

import json
import math
import os
import threading
import time

import httpx
import pytest
import redis

from lenpred.harness.emulator import serve_in_thread, start_in_thread
from lenpred.contract.keys import channel_for, events_channel, pred_key
from lenpred.contract.keys import rid_tag as keys_tag
from lenpred.router.ids import new_rid, router_tag
from lenpred.contract.prediction import Prediction
from lenpred.harness.redisproc import free_port
from lenpred.router.app import make_app
from lenpred.router.config import RouterConfig

FAST = "replicas: {poll_interval_s: 0.1, timeout_s: 0.5, unhealthy_after: 1}\n"
HEAD = "apiVersion: lenpred.io/v1alpha1\nkind: RouterPolicy\n"
PREDICTED = HEAD + """plugins:
  - {name: srpt, type: predicted-srpt-orderer}
  - {name: future-load, type: predicted-load-scorer}
profiles:
  default: {ordering: srpt, scorers: [{ref: future-load}]}
""" + FAST
SHED = HEAD + """plugins:
  - {name: kv, type: predicted-kv-admitter, parameters: {quantile: 0.9, headroom: 0.85, on_saturation: shed}}
profiles:
  default: {admission: kv}
""" + FAST


def wait_for(cond, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := cond():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture()
def servers(tmp_path):
    """start(policy_text, backends=N or [urls], **emulator_cfg) -> (router client, [emulators], policy path).
    With emulated_predictor=True the emulators publish stand-in predictions to the router's Redis."""
    started = []

    def start(policy: str = PREDICTED, backends: int | list = 2, redis_url: str | None = None,
              emulated_predictor: bool = False, **cfg):
        if emulated_predictor:
            cfg["redis_url"] = redis_url
        emus = [start_in_thread(**cfg) for _ in range(backends)] if isinstance(backends, int) else []
        started.extend(emus)
        urls = [e.url for e in emus] if isinstance(backends, int) else backends
        path = tmp_path / "policy.yaml"
        path.write_text(policy)
        router = serve_in_thread(make_app(RouterConfig(backends=urls, policy_path=str(path), redis_url=redis_url,
                                                       reload_interval_s=0.1)))
        started.append(router)
        client = httpx.Client(base_url=router.url, timeout=30)
        if emus:   # replicas join the pool on their first good poll: a loaded box may need a second one
            wait_for(lambda: client.get("/ready").status_code == 200, timeout=10, what="a replica in the pool")
        return client, emus, path

    yield start
    routers = [s.server.config.app.state.router for s in started if hasattr(s.server.config.app.state, "router")]
    for s in reversed(started):
        s.stop()
    for router in routers:   # every test also checks that the request state machine refused nothing
        assert router.metrics.registry.get_sample_value("lenpred_router_illegal_transitions_total") == 0


def chat(n_out=8, stream=False, text="hello there", **extra):
    return {"model": "m", "messages": [{"role": "user", "content": text}], "stream": stream,
            "custom_params": {"emulated_output_len": n_out}, **extra}


def received(emu) -> list[dict]:
    return httpx.get(f"{emu.url}/emulator/requests").json()["received"]


def test_chat_stream_and_not_carry_rid_to_backend_and_client(servers):
    client, emus, _ = servers()
    resp = client.post("/v1/chat/completions", json=chat(8))
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 8
    rid = resp.headers["x-lenpred-rid"]
    assert rid.startswith("lp-") and resp.json()["id"] == rid  # SGLang answers with the rid it was given
    assert "source=fallback" in resp.headers["x-lenpred-prediction"]  # no Redis: heuristic, not a failure

    with client.stream("POST", "/v1/chat/completions", json=chat(5, stream=True)) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        srid = s.headers["x-lenpred-rid"]
        events = [line for line in s.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == \
        " t1 t2 t3 t4 t5"
    seen = {r["rid"]: r for e in emus for r in received(e)}
    assert {rid, srid} <= set(seen)
    assert isinstance(seen[rid]["priority"], int)  # srpt maps the queue order onto SGLang priority

    view = client.get(f"/v1/lenpred/requests/{srid}").json()
    assert view["router"]["state"] == "finished" and view["router"]["fallback_used"] is True
    assert view["router"]["generated"] >= 5 and view["prediction"] is None
    assert client.get("/v1/lenpred/requests/lp-nope").status_code == 404


def test_completions_generate_models_and_client_priority(servers):
    client, emus, _ = servers(backends=1)
    r = client.post("/v1/completions", json={"model": "m", "prompt": "abc", "max_tokens": 3, "priority": 7})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert received(emus[0])[-1]["priority"] == 7  # the client's own priority wins
    g = client.post("/generate", json={"text": "abc", "sampling_params": {"max_new_tokens": 4}})
    assert g.status_code == 200 and g.json()["meta_info"]["completion_tokens"] == 4
    assert g.json()["meta_info"]["id"] == g.headers["x-lenpred-rid"]
    assert client.get("/v1/models").json()["data"][0]["id"] == "emulated-model"
    assert client.post("/v1/chat/completions", content=b"{not json").status_code == 400
    bad_profile = client.post("/v1/chat/completions", json=chat(), headers={"x-lenpred-profile": "nope"})
    assert bad_profile.status_code == 400 and "unknown profile" in bad_profile.json()["error"]["message"]


def publish_prediction(url: str, rid: str, p50: float, source="egtp", step=0, ts=None):
    rec = Prediction(rid=rid, p50=p50, p90=p50 * 1.5, mean=p50, remaining_p50=p50 - step,
                           remaining_p90=p50 * 1.5 - step, step=step, source=source, head_version="test",
                           ts=time.time() if ts is None else ts, prompt_tokens=10)
    r = redis.Redis.from_url(url)
    with r.pipeline() as p:
        # the router's rids carry its tag: this goes to its own channel (keys.channel_for)
        p.hset(pred_key("default", rid), mapping=rec.to_hash()).publish(channel_for("default", rid), rec.to_json())
        p.execute()
    r.close()


def test_predictions_pushed_through_redis_are_used(servers, redis_url):
    # a Redis read timeout a loaded CI box meets (the default 50 ms is for a serving router)
    client, emus, _ = servers(PREDICTED + "predictions: {redis_timeout_s: 1.0}\n", redis_url=redis_url, backends=1,
                              step_base_s=0.01)
    wait_for(lambda: client.get("/health").json()["redis"] == "connected", what="subscription")
    # Streaming: the estimate in flight switches from the fallback to the pushed EGTP prediction.
    with client.stream("POST", "/v1/chat/completions", json=chat(40, stream=True)) as s:
        rid = s.headers["x-lenpred-rid"]
        publish_prediction(redis_url, rid, p50=42)
        wait_for(lambda: client.get(f"/v1/lenpred/requests/{rid}").json()["router"]["estimate"]["source"] == "egtp",
                 what="pushed prediction")
        list(s.iter_lines())
    view = client.get(f"/v1/lenpred/requests/{rid}").json()
    assert view["prediction"]["p50"] == 42 and view["prediction_fresh"] and not view["router"]["fallback_used"]

    # Non-streaming: the header carries the latest stored prediction (the sidecar wrote it mid-flight).
    result = {}
    # long enough (3 s) that the record lands before the answer ends, even on a loaded box
    t = threading.Thread(target=lambda: result.update(r=client.post("/v1/chat/completions", json=chat(300))))
    t.start()
    wait_for(lambda: len(received(emus[0])) == 2, what="second request at the backend")
    publish_prediction(redis_url, received(emus[0])[-1]["rid"], p50=77, source="plp", step=5)
    t.join()
    assert result["r"].headers["x-lenpred-prediction"] == "p50=77;p90=116;source=plp;step=5"

    # A stale record is treated as missing.
    r2 = client.post("/v1/chat/completions", json=chat(3))
    publish_prediction(redis_url, r2.headers["x-lenpred-rid"], p50=9, ts=time.time() - 3600)
    assert client.get(f"/v1/lenpred/requests/{r2.headers['x-lenpred-rid']}").json()["prediction_fresh"] is False


def test_redis_down_or_restarted_never_fails_requests(servers, redis_server):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    client, _, _ = servers(redis_url=dead, backends=1)
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json=chat(4, stream=stream))
        assert r.status_code == 200
    assert client.get("/health").json()["redis"] == "disconnected"

    client, _, _ = servers(redis_url=redis_server.url, backends=1)
    wait_for(lambda: client.get("/health").json()["redis"] == "connected", what="subscription")
    redis_server.stop()
    try:
        assert client.post("/v1/chat/completions", json=chat(4)).status_code == 200
        wait_for(lambda: client.get("/health").json()["redis"] == "disconnected", what="loss noticed")
    finally:
        redis_server.restart()  # the server is session-wide: bring it back whatever happened
    wait_for(lambda: client.get("/health").json()["redis"] == "connected", timeout=8, what="reconnect")


def test_admission_sheds_with_429_and_reason(servers):
    client, emus, _ = servers(SHED, backends=1, max_total_num_tokens=1000, step_base_s=0.01)
    long_prompt = "x" * 2400  # ~600 tokens
    with client.stream("POST", "/v1/chat/completions", json=chat(200, stream=True, text=long_prompt,
                                                                 max_tokens=200)) as s:
        lines = s.iter_lines()  # keep a reference: a collected iterator closes the stream
        next(lines)
        r = client.post("/v1/chat/completions", json=chat(200, text=long_prompt, max_tokens=200))
        assert r.status_code == 429
        assert r.headers["x-lenpred-drop-reason"] == "saturated-kv" and r.headers["x-lenpred-rid"]
        assert r.json()["error"]["code"] == 429
        small = client.post("/v1/chat/completions", json=chat(2, text="hi", max_tokens=2))
        assert small.status_code == 200  # still fits beside the long one
    assert 'lenpred_router_dropped_total{reason="saturated-kv"} 1.0' in client.get("/metrics").text
    assert len(received(emus[0])) == 2


def test_dead_replica_leaves_the_pool_and_comes_back(servers):
    client, emus, _ = servers(backends=2)
    a, b = emus
    b.stop()
    # Before or after the poll notices, no request fails: a refused connection is re-placed.
    assert all(client.post("/v1/chat/completions", json=chat(2)).status_code == 200 for _ in range(4))
    wait_for(lambda: not client.get("/health").json()["replicas"][b.url]["healthy"], what="b out")
    assert 'lenpred_router_replica_healthy{replica="%s"} 0.0' % b.url in client.get("/metrics").text
    for _ in range(4):
        assert client.post("/v1/chat/completions", json=chat(2)).headers["x-lenpred-replica"] == a.url
    b2 = start_in_thread(port=b.port)
    try:
        wait_for(lambda: client.get("/health").json()["replicas"][b.url]["healthy"], what="b back")
        replicas = {client.post("/v1/chat/completions", json=chat(2)).headers["x-lenpred-replica"]
                    for _ in range(6)}
        assert b.url in replicas
    finally:
        b2.stop()
    a.stop()
    wait_for(lambda: not client.get("/health").json()["ready"], what="empty pool")
    r = client.post("/v1/chat/completions", json=chat(2))
    assert r.status_code == 503 and r.headers["x-lenpred-drop-reason"] == "no-healthy-replica"
    assert client.get("/ready").status_code == 503


def test_hot_reload_through_the_app_keeps_last_good(servers):
    client, _, path = servers(backends=1)

    def rewrite(text):
        st = path.stat()
        path.write_text(text)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))

    rewrite(PREDICTED.replace("predicted-srpt-orderer", "predicted-srtp-orderer"))
    wait_for(lambda: client.get("/health").json()["policy_error"], what="invalid reload noticed")
    assert "unknown plugin type 'predicted-srtp-orderer'" in client.get("/health").json()["policy_error"]
    assert client.post("/v1/chat/completions", json=chat(2)).status_code == 200  # old policy serves
    rewrite(SHED)
    wait_for(lambda: client.get("/health").json()["policy_error"] is None, what="valid reload")
    metrics = client.get("/metrics").text
    assert 'lenpred_router_policy_reloads_total{result="invalid"} 1.0' in metrics
    assert 'lenpred_router_policy_reloads_total{result="ok"} 1.0' in metrics


def test_client_disconnect_mid_stream_releases_and_aborts(servers):
    client, emus, _ = servers(backends=1, step_base_s=0.01)
    with client.stream("POST", "/v1/chat/completions", json=chat(500, stream=True)) as s:
        rid = s.headers["x-lenpred-rid"]
        lines = s.iter_lines()
        next(lines)
        assert client.get("/health").json()["replicas"][emus[0].url]["inflight"] == 1
    wait_for(lambda: client.get("/health").json()["replicas"][emus[0].url]["inflight"] == 0, what="release")
    assert client.get(f"/v1/lenpred/requests/{rid}").json()["router"]["state"] == "failed"
    wait_for(lambda: httpx.get(f"{emus[0].url}/v1/loads").json()["loads"][0]["num_running_reqs"] == 0,
             what="engine-side abort")


def test_client_disconnect_aborts_non_streamed_requests_too(servers):
    client, emus, _ = servers(backends=1, step_base_s=0.01)
    with pytest.raises(httpx.ReadTimeout):      # the client gives up long before the 5 s answer
        httpx.post(f"{client.base_url}/v1/chat/completions", json=chat(500), timeout=httpx.Timeout(5, read=0.5))
    rid = received(emus[0])[-1]["rid"]
    wait_for(lambda: client.get("/health").json()["replicas"][emus[0].url]["inflight"] == 0, what="release")
    wait_for(lambda: httpx.get(f"{emus[0].url}/v1/loads").json()["loads"][0]["num_running_reqs"] == 0,
             what="engine-side abort")
    fin = {f["rid"]: f for f in httpx.get(f"{emus[0].url}/emulator/requests").json()["finished"]}
    assert fin[rid]["finish_reason"] == "abort" and fin[rid]["output_tokens"] < 500
    assert client.get(f"/v1/lenpred/requests/{rid}").json()["router"]["state"] == "failed"


def test_emulated_predictor_drives_the_router_end_to_end(servers, redis_url):
    """Emulator as stand-in sidecar (oracle, sigma 0): EGTP then PLP reach the router via Redis."""
    client, emus, _ = servers(redis_url=redis_url, backends=1, emulated_predictor=True, step_base_s=0.005,
                              prediction_sigma=0.0, plp_every=10)
    wait_for(lambda: client.get("/health").json()["redis"] == "connected", what="subscription")
    r = client.post("/v1/chat/completions", json=chat(30))
    # the newest record when the answer ended: PLP at 30 is written as the answer ends, so it may
    # still be on its way and the header then shows the one at 20: the same oracle length, and a
    # p90 of 20 + 10 x the emulator's spread (exp(z90 x 0.5) when sigma is 0)
    p90_at_20 = round(20 + 10 * math.exp(1.2816 * 0.5))
    assert r.headers["x-lenpred-prediction"] in ("p50=30;p90=30;source=plp;step=30",
                                                 f"p50=30;p90={p90_at_20};source=plp;step=20")
    rid = r.headers["x-lenpred-rid"]
    view = wait_for(lambda: (v := client.get(f"/v1/lenpred/requests/{rid}").json())["prediction"]["step"] == 30 and v,
                    what="the PLP record at step 30")
    assert view["router"]["estimate_at_dispatch"].endswith("source=fallback;step=0")  # none before prefill
    assert view["prediction"]["source"] == "plp" and view["prediction"]["remaining_p50"] == 0
    received_total = next(float(line.split()[-1]) for line in client.get("/metrics").text.splitlines()
                          if line.startswith("lenpred_router_predictions_received_total"))
    assert received_total >= 3  # EGTP + PLP at 10 and 20 in flight; the one at 30 may land after the end


PROBE = HEAD + """plugins:
  - {name: srpt, type: predicted-srpt-orderer}
  - {name: prefix, type: prefix-affinity-scorer}
profiles:
  default: {ordering: srpt, scorers: [{ref: prefix}], probe: {enabled: true, timeout_ms: %s}}
""" + FAST


def test_probe_then_dispatch_orders_on_the_probe_prediction_on_the_same_replica(servers, redis_url):
    """The probe (prefill-only, `<rid>-probe`) and the real request land on the same replica; the
    real request is queued and dispatched on the probe's EGTP, in the view and the headers."""
    client, emus, _ = servers(PROBE % 2000, redis_url=redis_url, emulated_predictor=True, step_base_s=0.005,
                              prediction_sigma=0.5)
    wait_for(lambda: client.get("/health").json()["redis"] == "connected", what="subscription")
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json=chat(12, stream=stream, text=f"probe me {stream}"))
        assert r.status_code == 200
        rid = r.headers["x-lenpred-rid"]
        if stream:
            assert r.text.count("data:") >= 13 and "[DONE]" in r.text   # 12 tokens + finish (+ [DONE])
        else:
            assert r.json()["usage"]["completion_tokens"] == 12
        assert r.headers["x-lenpred-probe"].startswith(f"replica={r.headers['x-lenpred-replica']};outcome=prediction")
        seen = {e.url: {x["rid"]: x for x in received(e)} for e in emus}
        where = [u for u, rids in seen.items() if f"{rid}-probe" in rids]
        assert where == [r.headers["x-lenpred-replica"]] and rid in seen[where[0]]   # same replica
        assert seen[where[0]][f"{rid}-probe"]["out_len"] == 1 and not seen[where[0]][f"{rid}-probe"]["stream"]
        view = client.get(f"/v1/lenpred/requests/{rid}").json()["router"]
        probe_rec = client.get(f"/v1/lenpred/requests/{rid}-probe").json()["prediction"]
        assert probe_rec["source"] == "egtp" and probe_rec["step"] == 0
        expected = f"p50={probe_rec['p50']:.0f};p90={probe_rec['p90']:.0f};source=egtp;step=0"
        assert view["estimate_at_dispatch"] == expected
        assert view["probe"]["outcome"] == "prediction" and view["probe"]["estimate"] == expected
        assert view["probe"]["replica"] == view["replica"] and view["fallback_used"] is False
    metrics = client.get("/metrics").text
    assert 'lenpred_router_probes_total{outcome="prediction"} 2.0' in metrics


def test_probe_timeout_falls_back_without_failing(servers, redis_url):
    """Nobody publishes predictions: the wait ends at timeout_ms, the request is served on the
    fallback estimate, still on the probed replica."""
    client, emus, _ = servers(PROBE % 30, redis_url=redis_url, backends=1)
    for stream in (False, True):
        t0 = time.monotonic()
        r = client.post("/v1/chat/completions", json=chat(5, stream=stream))
        assert r.status_code == 200 and time.monotonic() - t0 < 5
        view = client.get(f"/v1/lenpred/requests/{r.headers['x-lenpred-rid']}").json()["router"]
        assert view["probe"]["outcome"] == "timeout" and view["probe"]["wait_ms"] >= 29   # event-loop timers may fire <1 ms early
        assert view["estimate_at_dispatch"].endswith("source=fallback;step=0") and view["state"] == "finished"
    assert 'lenpred_router_probes_total{outcome="timeout"} 2.0' in client.get("/metrics").text


def test_probe_needs_redis_and_is_off_by_default(servers):
    client, emus, _ = servers(PROBE % 50, backends=1)     # no Redis: no probe, no wait
    r = client.post("/v1/chat/completions", json=chat(3))
    assert r.status_code == 200 and "x-lenpred-probe" not in r.headers
    assert [x["rid"] for x in received(emus[0])] == [r.headers["x-lenpred-rid"]]


def test_a_router_follows_its_own_channel_and_the_shared_one_only(servers, redis_url):
    """Events of another router's requests (its tag in the rid, its channel) never reach this one;
    its own and untagged ones (the shared channel) do."""
    client, _, _ = servers(redis_url=redis_url, backends=1)
    wait_for(lambda: client.get("/health").json()["redis"] == "connected", what="subscription")

    def received_total() -> int:   # every prediction event the router parsed, for any request
        return client.get("/health").json()["redis_events_received"]

    own = new_rid()
    before = received_total()
    for rid in ("lp-00000000-" + "1" * 32, "lp-ffffffff-" + "2" * 32):   # other routers' requests
        if keys_tag(rid) != router_tag():
            publish_prediction(redis_url, rid, p50=10)
    publish_prediction(redis_url, own, p50=10)                 # this router's channel
    publish_prediction(redis_url, "lp-" + "3" * 32, p50=10)   # untagged: the shared channel
    wait_for(lambda: received_total() >= before + 2, what="own and shared events")
    time.sleep(0.3)
    assert received_total() == before + 2
