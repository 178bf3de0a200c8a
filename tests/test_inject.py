"""The prediction-injection harness (lenpred.harness.inject) and the length control
(lenpred.harness.lengthctl): error model, truth resolution, and the gRPC server writing to a real
Redis exactly as the sidecar does."""
from __future__ import annotations

import json
import math
import time

import grpc
import pytest
import redis
import torch

from lenpred.contract import keys, wire
from lenpred.contract.prediction import Prediction
from lenpred.harness.inject import (ErrorModel, Injector, InjectingSidecar, Item, base_rid,
                                    plp_ratio)
from lenpred.harness.lengthctl import PROCESSOR, ForceLength, answer_tokens_left, controlled
from lenpred.proto.v1 import lenpred_pb2 as pb
from lenpred.proto.v1 import lenpred_pb2_grpc as pb_grpc

CAP_BASE = 2048
ITEMS = [Item("a", 0, 10, 100, CAP_BASE), Item("b", 1, 10, 7, CAP_BASE + 1), Item("c", 2, 25, 300, CAP_BASE + 2)]


@pytest.mark.parametrize("rid,base", [
    ("lp-1", "lp-1"), ("lp-1-probe", "lp-1"), ("lp-1-m1", "lp-1"), ("lp-1-c12", "lp-1"),
    ("lp-1-m1-probe", "lp-1"), ("lp-probe-x", "lp-probe-x"), ("lp-1-mx", "lp-1-mx"),
])
def test_base_rid(rid, base):
    assert base_rid(rid) == base


@pytest.mark.parametrize("t,ratio", [(0, 110 / 122.6), (64, 111 / 121.6), (128, 107 / 116.4), (10_000, 107 / 116.4),
                                     (4, (110 / 122.6 + 122 / 128.7) / 2)])
def test_plp_ratio(t, ratio):
    assert plp_ratio(t) == pytest.approx(ratio)


def test_error_model_from_the_shipped_residuals():
    m = ErrorModel.load("residuals", seed=3)
    res = sorted(m.log_ratio)
    assert len(res) > 1000
    assert m.p90_factor == pytest.approx(math.exp(-res[int(0.1 * len(res))]))
    # p90 = p50 x factor covers 90% of the residuals by construction: true <= p90 <=> r >= -log(factor)
    assert sum(r >= -math.log(m.p90_factor) for r in res) / len(res) == pytest.approx(0.9, abs=0.01)
    assert m.draw("item-7") == m.draw("item-7") == ErrorModel.load("residuals", seed=3).draw("item-7")
    assert {m.draw(f"i{k}") for k in range(50)} <= set(m.log_ratio)
    o = ErrorModel.load("oracle")
    assert o.oracle and o.draw("x") == 0.0 and o.p90_factor == o.mean_factor == 1.0


@pytest.mark.parametrize("spec,err", [("lognormal:0.7", "must be oracle"), ("residuals:/nonexistent.json", "nonexistent")])
def test_error_model_rejects_bad_specs(spec, err):
    with pytest.raises((ValueError, OSError), match=err):
        ErrorModel.load(spec)


# (rid, prompt tokens, max_new_tokens) -> the answer tokens the injector takes as the truth
@pytest.mark.parametrize("rows,truth", [
    ([("lp-1", 10, CAP_BASE + 0)], [100]),                                   # plain: the cap names item a
    ([("lp-1", 10, CAP_BASE + 1)], [7]),                                     # same prompt length, item b
    ([("lp-1-probe", 10, 1), ("lp-2-probe", 10, 1)], [100, 7]),              # probes: same length, in order
    ([("lp-1", 25, CAP_BASE + 2), ("lp-1-m1", 25 + 120, CAP_BASE + 2 - 120)], [300, 180]),   # continuation
    ([("lp-9", 33, 40)], [40]),                                               # unknown: ignore_eos mode
    ([("lp-9", 33, CAP_BASE + 7)], [None]),                                   # a cap naming nothing: no prediction
])
def test_injector_resolves_the_truth(rows, truth):
    inj = Injector(ErrorModel())                    # oracle: p50 is the truth
    inj.register(ITEMS)
    got = [getattr(inj.prefill(*row), "p50", None) for row in rows]
    assert got == truth


def test_injector_counts_a_probe_matched_to_the_wrong_item():
    inj = Injector(ErrorModel())
    inj.register(ITEMS)
    inj.prefill("lp-1-probe", 10, 1)                # taken as item a (first of length 10)
    rec = inj.prefill("lp-1", 10, CAP_BASE + 1)     # the real request says item b
    assert rec.p50 == 7 and inj.stats.probe_mismatch == 1


def test_injector_plp_shrinks_the_prefill_error():
    m = ErrorModel.load("residuals", seed=0)
    inj = Injector(m)
    inj.register(ITEMS)
    pre = inj.prefill("lp-1", 25, CAP_BASE + 2)
    err0 = pre.p50 - 300
    assert pre.source == "last" and pre.step == 0 and pre.p90 == pytest.approx(pre.p50 * m.p90_factor)
    dec = inj.decode("lp-1", 64)
    assert dec.source == "plp" and dec.step == 64
    assert dec.remaining_p50 == pytest.approx(max(300 - 64 + plp_ratio(64) * err0, 1.0))
    assert dec.p50 == pytest.approx(64 + dec.remaining_p50)
    assert inj.decode("lp-unknown", 8) is None and inj.stats.unknown_decode == 1


def test_injector_rejects_duplicate_caps():
    with pytest.raises(ValueError, match="distinct"):
        Injector(ErrorModel()).register([Item("a", 0, 5, 5, 3000), Item("b", 1, 6, 6, 3000)])


class _Req:
    """The parts of SGLang's Req the processor reads (rid, prompt ids, chunked flag)."""

    def __init__(self, rid, prompt, chunked=0):
        self.rid, self.origin_input_ids, self.is_chunked = rid, list(range(prompt)), chunked


def _forced(row) -> bool:
    return bool(row[2] == 0 and (row == -math.inf).sum() == len(row) - 1)


def test_force_length_bans_then_forces_eos():
    ForceLength.counts.clear()
    fresh, cont = _Req("r1", 5), _Req("r2", 8)      # r2: a continuation, 3 answer tokens already in its prompt
    params = [{"lenpred_len": 3, "lenpred_prompt": 5, "lenpred_eos": 2, "__req__": fresh},
              {"lenpred_len": 5, "lenpred_prompt": 5, "lenpred_eos": 2, "__req__": cont},
              {}]                                     # a request without length control: untouched
    steps = [ForceLength()(torch.zeros(3, 10), params) for _ in range(3)]
    # r1: EOS banned at answer tokens 1 and 2, the only choice at 3; r2 has 2 tokens left
    assert [_forced(s[0]) for s in steps] == [False, False, True]
    assert [bool(s[0][2] == -math.inf) for s in steps] == [True, True, False]
    assert [_forced(s[1]) for s in steps[:2]] == [False, True]
    assert all(torch.equal(s[2], torch.zeros(10)) for s in steps)
    assert answer_tokens_left({"lenpred_len": 4, "lenpred_prompt": 5, "__req__": _Req("x", 50)}) == 1
    assert answer_tokens_left({"temperature": 0}) is None


def test_force_length_skips_chunked_prefill_rows():
    ForceLength.counts.clear()
    req = _Req("r3", 4, chunked=1)
    params = [{"lenpred_len": 1, "lenpred_prompt": 4, "__req__": req}]
    assert torch.equal(ForceLength()(torch.zeros(1, 4), params), torch.zeros(1, 4))
    req.is_chunked = 0
    assert ForceLength()(torch.zeros(1, 4), params)[0, 2] == 0


def test_controlled_body_hides_the_length():
    b = controlled({"input_ids": [1, 2, 3]}, length=17, prompt_tokens=3, cap=4100, eos=2)
    assert b["sampling_params"]["max_new_tokens"] == 4100 and b["sampling_params"]["ignore_eos"] is False
    assert b["sampling_params"]["custom_params"] == {"lenpred_len": 17, "lenpred_prompt": 3, "lenpred_eos": 2}
    assert json.loads(PROCESSOR)["callable"] and b["custom_logit_processor"] == PROCESSOR


def _batch(seq, prefill=(), decode=(), finished=()):
    b = pb.IngestBatch(seq=seq, head=pb.HeadSelector(model_id="m", hidden_size=4))
    if prefill:
        b.prefill.rids.extend(r for r, _, _ in prefill)
        b.prefill.prompt_tokens.extend(p for _, p, _ in prefill)
        b.prefill.max_new_tokens.extend(c for _, _, c in prefill)
        b.prefill.last_vectors.CopyFrom(wire.encode(torch.zeros(len(prefill), 4)))
    if decode:
        b.decode.rids.extend(r for r, _ in decode)
        b.decode.steps.extend(s for _, s in decode)
        b.decode.vectors.CopyFrom(wire.encode(torch.zeros(len(decode), 4)))
    b.finished.extend(finished)
    return b


def test_injecting_sidecar_writes_the_sidecar_records(redis_url):
    ns = "inj"
    srv = InjectingSidecar(redis_url, ns, ErrorModel.load("oracle"))
    r = redis.Redis.from_url(redis_url)
    sub = r.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(keys.events_channel(ns))
    try:
        srv.set(items=ITEMS)
        batches = [_batch(1, prefill=[("lp-a", 10, CAP_BASE + 0)]),
                   _batch(2, decode=[("lp-a", 16)]),
                   _batch(3, finished=[pb.Finished(rid="lp-a", output_tokens=100, prompt_tokens=10)])]
        with grpc.insecure_channel(srv.target) as ch:
            acks = list(pb_grpc.LengthPredictorStub(ch).Ingest(iter(batches), timeout=10))
        assert [(a.seq, a.accepted, a.code) for a in acks] == [(1, 1, 0), (2, 1, 0), (3, 1, 0)]
        rec = Prediction.from_hash(r.hgetall(keys.pred_key(ns, "lp-a")))
        assert (rec.source, rec.step, rec.p50, rec.remaining_p50, rec.true_len) == ("plp", 16, 100.0, 84.0, 100)
        assert rec.head_version == "injected" and r.ttl(keys.pred_key(ns, "lp-a")) > 0
        events, deadline = [], time.monotonic() + 5
        while len(events) < 3 and time.monotonic() < deadline:
            m = sub.get_message(timeout=0.2)
            if m:
                events.append(json.loads(m["data"]))
        assert [(e["type"], e.get("step")) for e in events] == [("prediction", 0), ("prediction", 16), ("finished", None)]
        assert events[2]["p50"] == 100.0 and r.xlen(keys.finished_stream(ns)) == 1
        stats = srv.stats()
        assert (stats["prefill"], stats["decode"], stats["finished"], stats["by_cap"]) == (1, 1, 1, 1)
        assert stats["length_mismatch"] == 0
    finally:
        sub.close()
        srv.stop()
