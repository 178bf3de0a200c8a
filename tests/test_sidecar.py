"""The sidecar over real gRPC with a real Redis: happy paths, every bad-input case, and that the
server keeps serving after each one."""
from __future__ import annotations

import json
import math
import time

import grpc
import numpy as np
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lenpred.contract import keys, wire
from lenpred.contract.prediction import Prediction
from lenpred.proto.v1 import lenpred_pb2 as pb
from lenpred.proto.v1 import lenpred_pb2_grpc as pb_grpc
from lenpred.sidecar.server import SidecarConfig
from lenpred.bench._thread import SidecarThread, write_random_heads
from lenpred.harness.waiting import eventually

D = 16
MODEL = "test/model"
HEAD = pb.HeadSelector(model_id=MODEL, hidden_size=D, layer=-1)


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
    return write_random_heads(tmp_path_factory.mktemp("heads"), D, MODEL)


@pytest.fixture()
def sidecar(heads_dir, redis_url):
    s = SidecarThread(SidecarConfig(port=0, redis_url=redis_url, heads=[str(heads_dir)], device="cpu",
                                    max_wait_us=500, max_message_bytes=1 << 20, max_rows_per_message=1000))
    yield s
    s.stop()


@pytest.fixture()
def stub(sidecar):
    ch = grpc.insecure_channel(sidecar.target)
    yield pb_grpc.LengthPredictorStub(ch)
    ch.close()


def vecs(n, d=D, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def ingest(stub, *batches):
    return list(stub.Ingest(iter(batches), timeout=10))




def assert_still_serving(stub):
    r = stub.Predict(pb.PredictRequest(head=HEAD, prompt_vectors=wire.encode(vecs(2))), timeout=5)
    assert len(r.predictions) == 2


# ------------------------------------------------------------------ happy paths
def test_predict_returns_ordered_quantiles_and_writes_redis(stub, redis_url):
    r = stub.Predict(pb.PredictRequest(head=HEAD, prompt_vectors=wire.encode(vecs(3)), rids=["a", "b", "c"]))
    assert [p.rid for p in r.predictions] == ["a", "b", "c"]
    for p in r.predictions:
        assert 0 < p.p50 <= p.p90 and p.source == "egtp" and p.head_version == "t1"
    rr = redis.Redis.from_url(redis_url)
    assert eventually(lambda: rr.exists(keys.pred_key("default", "b")))
    rec = Prediction.from_hash(rr.hgetall(keys.pred_key("default", "b")))
    assert math.isclose(rec.p50, r.predictions[1].p50, rel_tol=1e-5)


def test_ingest_prefill_decode_finished_flow(stub, redis_url):
    r = redis.Redis.from_url(redis_url)
    sub = r.pubsub()
    sub.subscribe(keys.events_channel("default"))
    pre = pb.IngestBatch(head=HEAD, seq=1)
    pre.prefill.rids.extend(["r1", "r2"])
    pre.prefill.prompt_tokens.extend([10, 20])
    pre.prefill.vectors.CopyFrom(wire.encode(vecs(2), torch.float16))
    dec = pb.IngestBatch(head=HEAD, seq=2)
    dec.decode.rids.append("r1")
    dec.decode.steps.append(8)
    dec.decode.vectors.CopyFrom(wire.encode(vecs(1, seed=1), torch.bfloat16))
    fin = pb.IngestBatch(head=HEAD, seq=3)
    fin.finished.add(rid="r1", output_tokens=33, prompt_tokens=10)
    acks = ingest(stub, pre)
    acks += ingest(stub, dec, fin)
    assert {a.seq: (a.accepted, a.rejected, a.code) for a in acks} == {1: (2, 0, 0), 2: (1, 0, 0), 3: (1, 0, 0)}
    assert eventually(lambda: r.hget(keys.pred_key("default", "r1"), "true_len") == b"33"
                      and r.hget(keys.pred_key("default", "r1"), "source") == b"plp")
    rec = Prediction.from_hash(r.hgetall(keys.pred_key("default", "r1")))
    assert rec.source == "plp" and rec.step == 8 and rec.p50 >= 8 and rec.true_len == 33 and rec.prompt_tokens == 10
    assert 0 < r.ttl(keys.pred_key("default", "r1")) <= keys.DEFAULT_TTL_S
    entries = r.xrange(keys.finished_stream("default"))
    assert entries and entries[-1][1][b"rid"] == b"r1" and entries[-1][1][b"output_tokens"] == b"33"
    types = []
    deadline = time.time() + 5
    while time.time() < deadline and "finished" not in types:
        m = sub.get_message(timeout=0.5)
        if m and m["type"] == "message":
            types.append(json.loads(m["data"])["type"])
    assert "prediction" in types and "finished" in types


def test_model_info_health_and_reflection(sidecar, stub):
    info = stub.ModelInfo(pb.ModelInfoRequest())
    assert sorted(h.kind for h in info.heads) == ["egtp", "last", "plp"]
    assert {h.key.model_id for h in info.heads} == {MODEL} and info.device == "cpu"
    ch = grpc.insecure_channel(sidecar.target)
    hc = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="lenpred.v1.LengthPredictor"))
    assert hc.status == health_pb2.HealthCheckResponse.SERVING
    resp = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert "lenpred.v1.LengthPredictor" in names and "grpc.health.v1.Health" in names
    ch.close()


# ------------------------------------------------------------------ bad input: Predict
@pytest.mark.parametrize("case", ["wrong_width", "nan", "inf", "unknown_model", "wrong_hidden_size", "garbage_tensor", "empty"])
def test_predict_bad_input_is_invalid_argument(stub, case):
    head, t = HEAD, wire.encode(vecs(2))
    if case == "wrong_width":
        t = wire.encode(vecs(2, d=D + 1))
    elif case in ("nan", "inf"):
        x = vecs(2)
        x[1, 3] = float("nan") if case == "nan" else float("inf")
        t = wire.encode(x)
    elif case == "unknown_model":
        head = pb.HeadSelector(model_id="nope/model", hidden_size=D, layer=-1)
    elif case == "wrong_hidden_size":
        head = pb.HeadSelector(model_id=MODEL, hidden_size=D * 2, layer=-1)
        t = wire.encode(vecs(2, d=D * 2))
    elif case == "garbage_tensor":
        t = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, D], data=b"\x01\x02\x03")
    elif case == "empty":
        t = pb.Tensor()
    with pytest.raises(grpc.RpcError) as ei:
        stub.Predict(pb.PredictRequest(head=head, prompt_vectors=t), timeout=5)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.details()
    assert_still_serving(stub)


def test_predict_garbage_bytes_and_oversize(sidecar, stub):
    ch = grpc.insecure_channel(sidecar.target)
    raw = ch.unary_unary("/lenpred.v1.LengthPredictor/Predict", request_serializer=lambda b: b,
                         response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as ei:
        raw(b"\xff\xff\xff\xff\x0f garbage", timeout=5)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "could not parse" in ei.value.details()
    big = wire.encode(torch.zeros(800, 512))  # 1.6 MB > the 1 MiB limit configured above
    with pytest.raises(grpc.RpcError) as ei:
        stub.Predict(pb.PredictRequest(head=HEAD, prompt_vectors=big), timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exceeds the limit" in ei.value.details()
    ch.close()
    assert_still_serving(stub)


# ------------------------------------------------------------------ bad input: Ingest keeps the stream
def test_ingest_bad_batches_are_refused_in_ack_and_stream_continues(stub, redis_url):
    good = pb.IngestBatch(head=HEAD, seq=1)
    good.prefill.rids.append("ok1")
    good.prefill.vectors.CopyFrom(wire.encode(vecs(1)))
    wrong_width = pb.IngestBatch(head=HEAD, seq=2)
    wrong_width.prefill.rids.append("w")
    wrong_width.prefill.vectors.CopyFrom(wire.encode(vecs(1, d=D + 3)))
    nan = pb.IngestBatch(head=HEAD, seq=3)
    nan.prefill.rids.extend(["n1", "n2"])
    x = vecs(2)
    x[0, 0] = float("nan")
    nan.prefill.vectors.CopyFrom(wire.encode(x))
    unknown = pb.IngestBatch(head=pb.HeadSelector(model_id="other", hidden_size=D, layer=-1), seq=4)
    unknown.prefill.rids.append("u")
    unknown.prefill.vectors.CopyFrom(wire.encode(vecs(1)))
    orphan = pb.IngestBatch(head=HEAD, seq=5)  # decode for a rid whose prefill was never seen
    orphan.decode.rids.append("ghost")
    orphan.decode.steps.append(8)
    orphan.decode.vectors.CopyFrom(wire.encode(vecs(1)))
    too_many = pb.IngestBatch(head=HEAD, seq=6)
    for i in range(1001):
        too_many.finished.add(rid=f"f{i}", output_tokens=1)
    last = pb.IngestBatch(head=HEAD, seq=7)
    last.prefill.rids.append("ok2")
    last.prefill.vectors.CopyFrom(wire.encode(vecs(1)))
    acks = {a.seq: a for a in ingest(stub, good, wrong_width, nan, unknown, orphan, too_many, last)}
    assert len(acks) == 7
    assert acks[1].code == 0 and acks[7].code == 0
    assert acks[2].code == 3 and "width" in acks[2].message
    assert acks[3].code == 3 and acks[3].accepted == 1 and acks[3].rejected == 1 and "NaN" in acks[3].message
    assert acks[4].code == 3 and "unknown model" in acks[4].message
    assert acks[5].code == 3 and "no prefill vector" in acks[5].message
    assert acks[6].code == 3 and "exceed" in acks[6].message
    r = redis.Redis.from_url(redis_url)
    assert eventually(lambda: all(r.exists(keys.pred_key("default", k)) for k in ("ok1", "ok2", "n2")))
    assert not r.exists(keys.pred_key("default", "n1"))


def test_ingest_garbage_bytes_on_stream(sidecar, stub):
    ch = grpc.insecure_channel(sidecar.target)
    raw = ch.stream_stream("/lenpred.v1.LengthPredictor/Ingest", request_serializer=lambda b: b,
                           response_deserializer=pb.IngestAck.FromString)
    good = pb.IngestBatch(head=HEAD, seq=9)
    good.prefill.rids.append("after-garbage")
    good.prefill.vectors.CopyFrom(wire.encode(vecs(1)))
    acks = list(raw(iter([b"\xff\xff\xff\xff\x0f", good.SerializeToString()]), timeout=10))
    assert any(a.code == 3 and "could not parse" in a.message for a in acks)
    assert any(a.seq == 9 and a.code == 0 for a in acks)
    ch.close()


def test_redis_down_keeps_predicting(heads_dir):
    from lenpred.harness.redisproc import free_port

    s = SidecarThread(SidecarConfig(port=0, redis_url=f"redis://127.0.0.1:{free_port()}/0", heads=[str(heads_dir)],
                                    device="cpu"))
    try:
        ch = grpc.insecure_channel(s.target)
        st = pb_grpc.LengthPredictorStub(ch)
        b = pb.IngestBatch(head=HEAD, seq=1)
        b.prefill.rids.append("x")
        b.prefill.vectors.CopyFrom(wire.encode(vecs(1)))
        (ack,) = ingest(st, b)
        assert ack.accepted == 1 and "redis unavailable" in ack.message
        assert_still_serving(st)
        ch.close()
    finally:
        s.stop()


def test_wire_roundtrip_dtypes():
    x = vecs(3)
    for dt, tol in ((torch.float32, 0), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)):
        y = wire.decode(wire.encode(x, dt))
        assert y.dtype == torch.float32 and np.allclose(x.numpy(), y.numpy(), atol=tol * 4)


def test_generated_stubs_are_up_to_date(tmp_path):
    import pathlib

    from lenpred.proto import gen

    gen.generate(tmp_path)
    committed = pathlib.Path(gen.__file__).parent / "v1"
    for name in gen.GENERATED:
        assert (tmp_path / name).read_text() == (committed / name).read_text(), f"{name} is stale: run python proto/gen.py"


def test_prometheus_metrics_count_rows_and_rejections(heads_dir, redis_url):
    import httpx

    s = SidecarThread(SidecarConfig(port=0, metrics_port=0, redis_url=redis_url, heads=[str(heads_dir)],
                                    device="cpu"))
    try:
        ch = grpc.insecure_channel(s.target)
        st = pb_grpc.LengthPredictorStub(ch)
        ok = pb.IngestBatch(head=HEAD, seq=1)
        ok.prefill.rids.extend(["m1", "m2"])
        ok.prefill.vectors.CopyFrom(wire.encode(vecs(2)))
        bad = pb.IngestBatch(head=HEAD, seq=2)
        bad.prefill.rids.append("m3")
        bad.prefill.vectors.CopyFrom(wire.encode(vecs(1, d=D + 1)))
        ingest(st, ok, bad)
        ch.close()
        text = httpx.get(f"http://127.0.0.1:{s.running.metrics_port}/metrics", timeout=5).text
        assert 'lenpred_sidecar_rows_total{kind="prefill",outcome="accepted"} 2.0' in text
        assert 'lenpred_sidecar_rows_total{kind="any",outcome="rejected"} 1.0' in text
        assert "lenpred_sidecar_forward_seconds_bucket" in text and "lenpred_sidecar_streams" in text
    finally:
        s.stop()


@pytest.mark.parametrize("choice,expected", [("auto", "last"), ("egtp", "egtp"), ("last", "last")])
def test_prefill_head_choice(heads_dir, redis_url, choice, expected):
    """Both prefill features arrive; the configured head answers (auto: lower recorded MAE; the
    random test heads record none, so the tie goes to the last-token head)."""
    s = SidecarThread(SidecarConfig(port=0, redis_url=redis_url, heads=[str(heads_dir)], device="cpu",
                                    prefill_head=choice))
    try:
        ch = grpc.insecure_channel(s.target)
        st = pb_grpc.LengthPredictorStub(ch)
        b = pb.IngestBatch(head=HEAD, seq=1)
        b.prefill.rids.append(f"choice-{choice}")
        b.prefill.vectors.CopyFrom(wire.encode(vecs(1)))
        b.prefill.last_vectors.CopyFrom(wire.encode(vecs(1, seed=5)))
        (ack,) = ingest(st, b)
        assert ack.code == 0, ack.message
        src = redis.Redis.from_url(redis_url).hget(keys.pred_key("default", f"choice-{choice}"), "source")
        assert src.decode() == expected
        # PLP still reads the pooled vector, whatever answered at prefill
        d = pb.IngestBatch(head=HEAD, seq=2)
        d.decode.rids.append(f"choice-{choice}")
        d.decode.steps.append(8)
        d.decode.vectors.CopyFrom(wire.encode(vecs(1, seed=6)))
        (ack,) = ingest(st, d)
        assert ack.code == 0 and ack.accepted == 1
        ch.close()
    finally:
        s.stop()


def test_last_vectors_bad_width_and_predict_feature(stub):
    b = pb.IngestBatch(head=HEAD, seq=1)
    b.prefill.rids.append("lw")
    b.prefill.vectors.CopyFrom(wire.encode(vecs(1)))
    b.prefill.last_vectors.CopyFrom(wire.encode(vecs(1, d=D + 2)))
    (ack,) = ingest(stub, b)
    assert ack.code == 3 and "last_vectors" in ack.message and "width" in ack.message
    r = stub.Predict(pb.PredictRequest(head=HEAD, prompt_vectors=wire.encode(vecs(2)), prompt_feature="last"))
    assert {p.source for p in r.predictions} == {"last"}
    with pytest.raises(grpc.RpcError) as ei:
        stub.Predict(pb.PredictRequest(head=HEAD, prompt_vectors=wire.encode(vecs(2)), prompt_feature="middle"))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_feature" in ei.value.details()


def test_pool_off_last_only_prefill_and_plp_over_last(tmp_path, redis_url):
    """The tap with LENPRED_TAP_POOL=0 ships only the last prompt token's state: the last-token head
    answers at prefill and a PLP head trained on [h_last ; h_t] keeps working; a PLP head that needs
    the entropy pool refuses decode rows with a reason instead of guessing."""
    from lenpred.sidecar.heads import random_head, save_head

    for kind, feature in (("last", "pooled"), ("plp", "last")):
        h = random_head(kind, D, model_id=MODEL, version="t2")
        h.meta.prompt_feature = feature
        save_head(h, tmp_path / f"{kind}.safetensors")
    s = SidecarThread(SidecarConfig(port=0, redis_url=redis_url, heads=[str(tmp_path)], device="cpu"))
    try:
        ch = grpc.insecure_channel(s.target)
        st = pb_grpc.LengthPredictorStub(ch)
        pre = pb.IngestBatch(head=HEAD, seq=1)
        pre.prefill.rids.append("lastonly")
        pre.prefill.last_vectors.CopyFrom(wire.encode(vecs(1)))
        dec = pb.IngestBatch(head=HEAD, seq=2)
        dec.decode.rids.append("lastonly")
        dec.decode.steps.append(16)
        dec.decode.vectors.CopyFrom(wire.encode(vecs(1, seed=2)))
        acks = {a.seq: a for a in ingest(st, pre)}
        acks.update({a.seq: a for a in ingest(st, dec)})
        assert acks[1].code == 0 and acks[2].code == 0, (acks[1].message, acks[2].message)
        rec = redis.Redis.from_url(redis_url).hgetall(keys.pred_key("default", "lastonly"))
        assert rec[b"source"] == b"plp" and rec[b"step"] == b"16"
        empty = pb.IngestBatch(head=HEAD, seq=3)
        empty.prefill.rids.append("nofeatures")
        (ack,) = ingest(st, empty)
        assert ack.code == 3 and "last_vectors" in ack.message
        ch.close()
    finally:
        s.stop()


def test_plp_needing_pool_rejects_decode_when_pool_is_off(stub):
    pre = pb.IngestBatch(head=HEAD, seq=1)
    pre.prefill.rids.append("nopool")
    pre.prefill.last_vectors.CopyFrom(wire.encode(vecs(1)))
    dec = pb.IngestBatch(head=HEAD, seq=2)
    dec.decode.rids.append("nopool")
    dec.decode.steps.append(8)
    dec.decode.vectors.CopyFrom(wire.encode(vecs(1)))
    acks = {a.seq: a for a in ingest(stub, pre)}
    acks.update({a.seq: a for a in ingest(stub, dec)})
    assert acks[1].code == 0
    assert acks[2].code == 3 and acks[2].rejected == 1 and "no prefill vector" in acks[2].message
