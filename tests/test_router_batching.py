"""Batching stage: batcher plugins via the builders, continuation/merge, and POST /v1/lenpred/batch
over real HTTP (emulated static-batching SGLang replicas, real Redis, the emulator as sidecar)."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from lenpred.harness.emulator import serve_in_thread, start_in_thread
from lenpred.router.app import make_app
from lenpred.router.config import RouterConfig
from lenpred.router.continuation import continuation, merge, part_of
from lenpred.router.testing import make_requests, make_router

HEAD = "apiVersion: lenpred.io/v1alpha1\nkind: RouterPolicy\n"


def batcher_policy(type_name: str, **params) -> str:
    return HEAD + f"""plugins:
  - {{name: b, type: {type_name}, parameters: {json.dumps(params)}}}
profiles:
  default: {{batching: b}}
"""


def plan(type_name, preds, replicas=2, **params):
    sim = make_router(batcher_policy(type_name, **params), replicas=replicas)
    reqs = make_requests(len(preds), p50=preds)
    return sim.profile.batcher.plan(reqs, list(sim.pool.replicas.values())), reqs


def test_fcfs_batcher_cuts_in_order_and_deals_in_turn():
    p, reqs = plan("fcfs-batcher", [5, 500, 50, 7, 300], batch_size=2)
    assert [[r.rid for r in b.requests] for b in p.batches] == [["req0", "req1"], ["req2", "req3"], ["req4"]]
    assert [b.replica for b in p.batches] == ["r0", "r1", "r0"] and p.release == "sequential"
    assert all(b.max_tokens is None for b in p.batches)
    sim = make_router(batcher_policy("fcfs-batcher"))
    assert sim.profile.batcher.needs_predictions is False


def test_length_bucket_groups_similar_lengths_and_balances_with_lpt():
    preds = [400, 10, 390, 12, 20, 410, 15, 380]
    p, _ = plan("length-bucket-batcher", preds, batch_size=2, fcr=False)
    groups = [sorted(r.estimate.p50 for r in b.requests) for b in p.batches]
    assert sorted(groups) == [[10, 12], [15, 20], [380, 390], [400, 410]]
    work = {}
    for b in p.batches:
        work[b.replica] = work.get(b.replica, 0) + b.predicted_cost
    assert set(work) == {"r0", "r1"} and max(work.values()) / min(work.values()) < 1.1  # both finish together


def test_vbs_gives_short_buckets_bigger_batches():
    preds = [10] * 40 + [400] * 4
    p, _ = plan("length-bucket-batcher", preds, batch_size=16, vbs=True, vbs_token_budget=1600, max_batch_size=32)
    sizes = sorted((len(b.requests), max(r.estimate.p50 for r in b.requests)) for b in p.batches)
    assert (32, 10) in sizes and all(n * L <= 1600 or n == 1 for n, L in sizes)
    assert any(L == 400 and n == 4 for n, L in sizes)


def test_fcr_caps_each_batch_at_its_bucket_and_continue_plan_is_uncapped():
    p, reqs = plan("length-bucket-batcher", [40, 45, 300, 310], batch_size=2, fcr=True, fcr_slack=1.2,
                   fcr_bucket_tokens=32)
    caps = sorted(b.max_tokens for b in p.batches)
    assert caps == [64, 384]   # ceil(45*1.2/32)*32, ceil(310*1.2/32)*32
    sim = make_router(batcher_policy("length-bucket-batcher", fcr=True))
    again = sim.profile.batcher.continue_plan(reqs, list(sim.pool.replicas.values()))
    assert all(b.max_tokens is None for b in again.batches)


def test_lpt_batcher_balances_predicted_work_longest_first():
    preds = [500, 400, 300, 200, 100, 100, 90, 10]
    p, _ = plan("lpt-batcher", preds)
    work = {}
    for b in p.batches:
        work[b.replica] = work.get(b.replica, 0) + b.requests[0].estimate.p50
    assert abs(work["r0"] - work["r1"]) <= 100 and p.release == "all"
    assert p.batches[0].requests[0].estimate.p50 == 500      # the long tail starts first


def test_continuation_bodies_and_merge():
    gen = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 10}}
    a = part_of({"text": " t1 t2", "output_ids": [7, 8], "meta_info": {"id": "x", "completion_tokens": 2,
                 "finish_reason": {"type": "length"}, "emulated_timing": {"ttft_s": 0.1, "decode_s": 0.2}}}, "generate")
    c = continuation(gen, "generate", [a], cap=5)
    assert c["input_ids"] == [1, 2, 7, 8] and c["sampling_params"]["max_new_tokens"] == 5
    assert c["custom_params"]["lenpred_prefix_tokens"] == 2 and gen["input_ids"] == [1, 2]
    assert continuation(gen, "generate", [a])["sampling_params"]["max_new_tokens"] == 8
    b = part_of({"text": " t3", "output_ids": [9], "meta_info": {"id": "y", "completion_tokens": 1,
                 "finish_reason": {"type": "stop"}, "emulated_timing": {"ttft_s": 0.05, "decode_s": 0.0}}}, "generate")
    m = merge([a, b], "generate")
    assert m["text"] == " t1 t2 t3" and m["output_ids"] == [7, 8, 9] and m["meta_info"]["completion_tokens"] == 3
    assert m["meta_info"]["id"] == "x" and m["meta_info"]["emulated_timing"]["decode_s"] == pytest.approx(0.25)
    chat = continuation({"messages": [{"role": "user", "content": "q"}], "max_tokens": 9}, "chat",
                        [part_of({"choices": [{"message": {"content": "ab"}, "finish_reason": "length"}],
                                  "usage": {"completion_tokens": 2}}, "chat")])
    assert chat["messages"][-1] == {"role": "assistant", "content": "ab"} and chat["continue_final_message"] is True
    assert chat["max_tokens"] == 7


@pytest.fixture()
def batch_stack(tmp_path, redis_url):
    started = []

    def start(policy: str, n: int = 2, **cfg):
        emus = [start_in_thread(redis_url=redis_url, **cfg) for _ in range(n)]
        started.extend(emus)
        path = tmp_path / "p.yaml"
        path.write_text(policy + "replicas: {poll_interval_s: 0.1}\n")
        router = serve_in_thread(make_app(RouterConfig(backends=[e.url for e in emus], policy_path=str(path),
                                                       redis_url=redis_url)))
        started.append(router)
        client = httpx.Client(base_url=router.url, timeout=60)
        deadline = time.monotonic() + 10   # replicas join on their first good poll (a loaded box: later)
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "no replica joined the pool"
            time.sleep(0.05)
        return client, emus

    yield start
    for s in reversed(started):
        s.stop()


def test_batch_api_probes_groups_caps_and_continues_without_losing_tokens(batch_stack):
    policy = batcher_policy("length-bucket-batcher", batch_size=3, fcr=True, fcr_slack=1.0, fcr_bucket_tokens=4)
    client, emus = batch_stack(policy, static_batching=True, step_base_s=0.001, plp_every=4)
    lengths = [5, 40, 6, 38, 7, 30]
    preds = [5, 4, 6, 38, 7, 30]             # request 1 is underpredicted: its batch cap (8) cuts it short
    bodies = [{"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 100},
               "custom_params": {"emulated_output_len": L, "emulated_prediction": p}}
              for L, p in zip(lengths, preds)]
    r = client.post("/v1/lenpred/batch", json={"api": "generate", "requests": bodies})
    assert r.status_code == 200 and r.headers["x-lenpred-batch-id"].startswith("lpb-")
    lines = [json.loads(x) for x in r.text.splitlines() if x]
    summary = lines[-1]["summary"]
    results = {x["index"]: x for x in lines[:-1]}
    assert sorted(results) == list(range(6)) and all(x["status"] == 200 for x in results.values())
    for i, L in enumerate(lengths):
        out = results[i]["response"]
        assert out["text"] == "".join(f" t{k}" for k in range(1, L + 1))   # nothing lost or repeated
        assert out["meta_info"]["completion_tokens"] == L
    assert results[1]["parts"] >= 2 and summary["continued"] >= 1 and summary["probe_predictions"] == 6
    # probes first (prefill-only), then the micro-batches grouped by predicted length
    got = [x for e in emus for x in httpx.get(f"{e.url}/emulator/requests").json()["received"]]
    assert sum(1 for x in got if x["rid"].endswith("-probe") and x["out_len"] == 1) == 6

    nostream = client.post("/v1/lenpred/batch", json={"requests": bodies[:2], "stream": False}).json()
    assert [x["index"] for x in nostream["results"]] == [0, 1] and nostream["summary"]["requests"] == 2
    assert client.post("/v1/lenpred/batch", json={"requests": "nope"}).status_code == 400


def test_queued_release_sends_every_micro_batch_at_once_and_the_engine_keeps_them_apart(batch_stack):
    """`release: queued`: no router turnaround between micro-batches; the static engine still
    runs them one tagged batch at a time (steps = the sum of each batch's longest answer)."""
    # 0.1 s steps: the six sends must all land before batch 2 ends (1.9 s), even on a loaded CI box
    client, emus = batch_stack(batcher_policy("fcfs-batcher", batch_size=2, release="queued"), n=1,
                               static_batching=True, step_base_s=0.1)
    lengths = [10, 2, 3, 9, 4, 4]
    bodies = [{"input_ids": [7, 8, 9], "sampling_params": {"max_new_tokens": 100},
               "custom_params": {"emulated_output_len": L}} for L in lengths]
    seen: list[tuple[int, int]] = []   # (received, finished) at the engine while the batch runs
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            st = httpx.get(f"{emus[0].url}/emulator/requests").json()
            seen.append((len(st["received"]), len(st["finished"])))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        r = client.post("/v1/lenpred/batch", json={"api": "generate", "requests": bodies, "stream": False}).json()
    finally:
        done.set()
        watcher.join()
    assert [x["response"]["meta_info"]["completion_tokens"] for x in r["results"]] == lengths
    assert min(f for rcv, f in seen if rcv == 6) <= 2      # all six were at the engine before batch 2 ended
    assert httpx.get(f"{emus[0].url}/emulator/requests").json()["steps"] == 10 + 9 + 4
