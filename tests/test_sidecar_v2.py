"""lenpred.v2 (columnar) next to lenpred.v1 on one real sidecar, over real gRPC with a real Redis:
the flow, bad input refused in the ack with the stream kept open, the device slab's reuse and
bound, non-finite head outputs refused, finished lengths clamped, the tap's wire choice
(LENPRED_TAP_WIRE), and the Redis write-behind under a frozen Redis."""
from __future__ import annotations

import os
import signal
import time

import grpc
import numpy as np
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lenpred.bench._thread import SidecarThread, write_random_heads
from lenpred.contract import keys, wire, wire_v2
from lenpred.contract.prediction import Prediction
from lenpred.harness.redisproc import RedisServer
from lenpred.proto.v1 import lenpred_pb2 as pb
from lenpred.proto.v1 import lenpred_pb2_grpc as pb_grpc
from lenpred.proto.v2 import lenpred_pb2 as pb2
from lenpred.sidecar.server import SidecarConfig
from lenpred.tap.sender import TapSender
from lenpred.harness.waiting import eventually

D = 16
MODEL = "test/model"
HEAD2 = pb2.HeadSelector(model_id=MODEL, hidden_size=D, layer=-1)
HEAD1 = pb.HeadSelector(model_id=MODEL, hidden_size=D, layer=-1)


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
    return write_random_heads(tmp_path_factory.mktemp("heads"), D, MODEL)


def start(heads_dir, redis_url, **kw):
    cfg = dict(port=0, redis_url=redis_url, heads=[str(heads_dir)], device="cpu", max_wait_us=300,
               max_message_bytes=1 << 20, max_rows_per_message=1000, prefill_head="egtp",
               plp_min_change=0.0)  # every PLP update stored; the skip rule has its own test
    cfg.update(kw)
    return SidecarThread(SidecarConfig(**cfg))


@pytest.fixture()
def sidecar(heads_dir, redis_url):
    s = start(heads_dir, redis_url)
    yield s
    s.stop()


def v2_call(target):
    ch = grpc.insecure_channel(target)
    return ch, ch.stream_stream("/lenpred.v2.LengthPredictor/Ingest", request_serializer=lambda m: m if isinstance(
        m, bytes) else m.SerializeToString(), response_deserializer=pb2.Ack.FromString)


def ingest2(target, *msgs):
    ch, call = v2_call(target)
    try:
        return {a.seq: a for a in call(iter(msgs), timeout=10)}
    finally:
        ch.close()


def vecs(n, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def wait(pred, timeout=10.0):
    return eventually(pred, timeout)


def stored(r, rid):
    h = r.hgetall(keys.pred_key("default", rid))
    return Prediction.from_hash(h) if h else None


def test_v1_and_v2_side_by_side(sidecar, redis_url):
    r = redis.Redis.from_url(redis_url)
    pre = wire_v2.encode(HEAD2, 1, binds=([10, 11], ["v2-a", "v2-b"]), prefill_handles=[10, 11],
                         prompt_tokens=[3, 4], prefill={"pooled": vecs(2)}, dtype=torch.bfloat16)
    dec = wire_v2.encode(HEAD2, 2, decode_handles=[10, 11], decode_steps=[8, 8], decode=vecs(2, 1))
    fin = wire_v2.encode(HEAD2, 3, finished_handles=[10], output_tokens=[12], finished_prompt_tokens=[3])
    acks = ingest2(sidecar.target, pre, dec, fin)
    assert [(acks[i].code, acks[i].accepted) for i in (1, 2, 3)] == [(0, 2), (0, 2), (0, 1)], acks
    assert wait(lambda: (p := stored(r, "v2-b")) is not None and p.source == "plp" and p.step == 8)
    assert wait(lambda: r.hget(keys.pred_key("default", "v2-a"), "true_len") == b"12")
    # the same sidecar still speaks v1
    b = pb.IngestBatch(head=HEAD1, seq=5)
    b.prefill.rids.append("v1-a")
    b.prefill.vectors.CopyFrom(wire.encode(vecs(1)))
    (ack,) = pb_grpc.LengthPredictorStub(grpc.insecure_channel(sidecar.target)).Ingest(iter([b]), timeout=10)
    assert ack.code == 0 and ack.accepted == 1
    assert wait(lambda: stored(r, "v1-a") is not None)
    ch = grpc.insecure_channel(sidecar.target)
    hs = health_pb2_grpc.HealthStub(ch)
    for svc in ("lenpred.v1.LengthPredictor", "lenpred.v2.LengthPredictor", "lenpred.store"):
        assert hs.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    ch.close()


def test_plp_updates_that_barely_move_are_not_stored(heads_dir, redis_url):
    s = start(heads_dir, redis_url, plp_min_change=100.0)  # nothing moves by 100x: every update skipped
    try:
        r = redis.Redis.from_url(redis_url)
        pre = wire_v2.encode(HEAD2, 1, binds=([1], ["skip"]), prefill_handles=[1], prefill={"pooled": vecs(1)})
        dec = wire_v2.encode(HEAD2, 2, decode_handles=[1], decode_steps=[4], decode=vecs(1, 1))
        assert ingest2(s.target, pre)[1].code == 0 and ingest2(s.target, dec)[2].code == 3  # new stream: unbound
        ch, call = v2_call(s.target)
        acks = list(call(iter([wire_v2.encode(HEAD2, 1, binds=([1], ["skip"]), decode_handles=[1], decode_steps=[4],
                                              decode=vecs(1, 1))]), timeout=10))
        ch.close()
        assert acks[0].code == 0 and acks[0].accepted == 1
        assert wait(lambda: s.running.service.skipped_writes == 1)
        assert wait(lambda: stored(r, "skip") is not None) and stored(r, "skip").source == "egtp"
    finally:
        s.stop()


def _bad_dtype():
    m = wire_v2.encode(HEAD2, 2, binds=([1], ["x"]), prefill_handles=[1], prefill={"pooled": vecs(1)})
    m.dtype = 7
    return m


def _nan():
    x = vecs(2)
    x[0, 3] = float("nan")
    return wire_v2.encode(HEAD2, 2, binds=([1, 2], ["nan-1", "nan-2"]), prefill_handles=[1, 2], prefill={"pooled": x})


BAD = [  # (name, message, reason in the ack, accepted)
    ("bad dtype", _bad_dtype, "unsupported dtype", 0),
    ("truncated blob", lambda: (lambda m: (setattr(m, "vectors", m.vectors[:-1]), m)[1])(
        wire_v2.encode(HEAD2, 2, binds=([1], ["t"]), prefill_handles=[1], prefill={"pooled": vecs(1)})), "vectors are", 0),
    ("unbound prefill handle", lambda: wire_v2.encode(HEAD2, 2, prefill_handles=[99], prefill={"pooled": vecs(1)}),
     "not bound", 0),
    ("unknown decode handle", lambda: wire_v2.encode(HEAD2, 2, decode_handles=[98], decode_steps=[4], decode=vecs(1)),
     "unbound handle", 0),
    ("non-finite input", _nan, "NaN/Inf", 1),
    ("finite 3e38 input", lambda: wire_v2.encode(HEAD2, 2, binds=([3], ["huge"]), prefill_handles=[3],
                                                  prefill={"pooled": torch.full((1, D), 3e38)}, dtype=torch.float32),
     "not finite", 0),
    ("oversized rid", lambda: wire_v2.encode(HEAD2, 2, binds=([4], ["r" * 300]), prefill_handles=[4],
                                              prefill={"pooled": vecs(1)}), "request id of 300", 0),
    ("unknown model", lambda: wire_v2.encode(pb2.HeadSelector(model_id="nope", hidden_size=D, layer=-1), 2,
                                             binds=([5], ["u"]), prefill_handles=[5], prefill={"pooled": vecs(1)}),
     "unknown model", 0),
    ("wrong width", lambda: wire_v2.encode(pb2.HeadSelector(model_id=MODEL, hidden_size=D + 1, layer=-1), 2,
                                           binds=([6], ["w"]), prefill_handles=[6],
                                           prefill={"pooled": torch.randn(1, D + 1)}), "hidden size", 0),
    ("garbage bytes", lambda: b"\xff\xff\xff\xff\x0f", "could not parse", 0),
]


@pytest.mark.parametrize("name,make,reason,accepted", BAD, ids=[b[0] for b in BAD])
def test_v2_bad_input_is_refused_in_the_ack_and_the_stream_stays_open(sidecar, redis_url, name, make, reason, accepted):
    first = wire_v2.encode(HEAD2, 1, binds=([0], ["before"]), prefill_handles=[0], prefill={"pooled": vecs(1)})
    after = wire_v2.encode(HEAD2, 3, binds=([7], ["after"]), prefill_handles=[7], prefill={"pooled": vecs(1)})
    ch, call = v2_call(sidecar.target)
    acks = list(call(iter([first, make(), after]), timeout=10))
    ch.close()
    by_seq = {a.seq: a for a in acks}
    assert by_seq[1].code == 0 and by_seq[3].code == 0, acks
    bad = [a for a in acks if a.seq not in (1, 3)]
    assert len(bad) == 1 and bad[0].code == 3 and reason in bad[0].message, bad
    assert bad[0].accepted == accepted
    r = redis.Redis.from_url(redis_url)
    assert wait(lambda: stored(r, "after") is not None)
    for k in r.scan_iter("lenpred:default:pred:*"):  # whatever was stored parses: no NaN record
        Prediction.from_hash(r.hgetall(k))
    assert not r.exists(keys.pred_key("default", "huge")) and not r.exists(keys.pred_key("default", "nan-1"))


def test_slab_reuses_slots_and_stays_bounded(heads_dir, redis_url):
    s = start(heads_dir, redis_url, slab_slots=64)
    try:
        ch, call = v2_call(s.target)
        for rnd in range(5):  # 5 rounds of 32 requests, one stream each: prefill, decode, finish
            hs = list(range(rnd * 32, rnd * 32 + 32))
            for m in (wire_v2.encode(HEAD2, 1, binds=(hs, [f"s{h}" for h in hs]), prefill_handles=hs,
                                     prefill={"pooled": vecs(32, rnd)}),
                      wire_v2.encode(HEAD2, 2, binds=(hs, [f"s{h}" for h in hs]), decode_handles=hs,
                                     decode_steps=[4] * 32, decode=vecs(32, 9)),
                      wire_v2.encode(HEAD2, 3, binds=(hs, [f"s{h}" for h in hs]), finished_handles=hs,
                                     output_tokens=[7] * 32)):
                # one message per call: each is applied before the next (a group would apply all
                # prefill rows before all finished rows, see sidecar/columnar.py)
                acks = list(call(iter([m]), timeout=20))
                assert all(a.code == 0 for a in acks), [(a.seq, a.message[:60]) for a in acks if a.code]
        slab = next(iter(s.running.service.columnar.slabs.values()))
        assert len(slab) == 0 and slab.vecs.shape[0] <= 64 and slab.evicted == 0  # freed on finish, reused
        # more live requests than slots: the oldest are evicted, the slab never grows past its bound
        hs = list(range(1000, 1100))
        acks = list(call(iter([wire_v2.encode(HEAD2, 1, binds=(hs, [f"e{h}" for h in hs]), prefill_handles=hs,
                                              prefill={"pooled": vecs(100)}),
                               wire_v2.encode(HEAD2, 2, decode_handles=hs, decode_steps=[4] * 100,
                                              decode=vecs(100))]), timeout=10))
        assert len(slab) == 64 and slab.vecs.shape[0] == 64 and slab.evicted == 36
        dec = [a for a in acks if a.seq == 2][0]
        assert dec.accepted == 64 and dec.rejected == 36 and "no prefill" in dec.message
        ch.close()
    finally:
        s.stop()


def test_finished_length_clamped_to_max_new_tokens(sidecar, redis_url):
    r = redis.Redis.from_url(redis_url)
    msg = wire_v2.encode(HEAD2, 1, binds=([1, 2], ["c1", "c2"]), finished_handles=[1, 2],
                         output_tokens=[4_000_000, 50], finished_max_new=[100, 0])
    assert ingest2(sidecar.target, msg)[1].code == 0
    assert wait(lambda: r.hget(keys.pred_key("default", "c1"), "true_len") == b"100")
    assert wait(lambda: r.hget(keys.pred_key("default", "c2"), "true_len") == b"50")
    b = pb.IngestBatch(head=HEAD1, seq=1)
    b.finished.add(rid="c3", output_tokens=4_000_000_000, max_new_tokens=0)
    list(pb_grpc.LengthPredictorStub(grpc.insecure_channel(sidecar.target)).Ingest(iter([b]), timeout=10))
    assert wait(lambda: r.hget(keys.pred_key("default", "c3"), "true_len") == str(1 << 20).encode())


def _tap_batches(prefix):
    out = []
    b = pb.IngestBatch(head=HEAD1)
    b.prefill.rids.extend([f"{prefix}-0", f"{prefix}-1"])
    b.prefill.prompt_tokens.extend([5, 6])
    b.prefill.vectors.CopyFrom(wire.encode(vecs(2), torch.float16))
    out.append(b)
    b = pb.IngestBatch(head=HEAD1)
    b.decode.rids.extend([f"{prefix}-0", f"{prefix}-1"])
    b.decode.steps.extend([4, 4])
    b.decode.vectors.CopyFrom(wire.encode(vecs(2, 3), torch.float16))
    out.append(b)
    b = pb.IngestBatch(head=HEAD1)
    b.finished.add(rid=f"{prefix}-0", output_tokens=9, prompt_tokens=5, max_new_tokens=100)
    out.append(b)
    return out


@pytest.mark.parametrize("mode,serve_v2,speaks", [("v2", True, "v2"), ("v1", True, "v1"), ("auto", True, "v2"),
                                                  ("auto", False, "v1")])
def test_tap_wire_choice_against_a_real_sidecar(heads_dir, redis_url, monkeypatch, mode, serve_v2, speaks):
    monkeypatch.setenv("LENPRED_TAP_WIRE", mode)
    s = start(heads_dir, redis_url, serve_v2=serve_v2)
    sender = TapSender(s.target, engine_id="t", backoff_initial_s=0.05)
    try:
        for b in _tap_batches(mode):
            sender.submit(b)
        r = redis.Redis.from_url(redis_url)
        assert wait(lambda: (p := stored(r, f"{mode}-1")) is not None and p.source == "plp"), (sender.stats, stored(r, f"{mode}-1"))
        assert wait(lambda: r.hget(keys.pred_key("default", f"{mode}-0"), "true_len") == b"9")
        assert wait(lambda: sender.stats.sent == 5), sender.stats
        assert sender.stats.wire == speaks and sender.stats.rejected == 0 and sender.stats.lost == 0
    finally:
        sender.close()
        s.stop()


def test_tap_v2_only_against_a_v1_sidecar_says_why(heads_dir, redis_url, monkeypatch):
    monkeypatch.setenv("LENPRED_TAP_WIRE", "v2")
    s = start(heads_dir, redis_url, serve_v2=False)
    sender = TapSender(s.target, backoff_initial_s=0.05, backoff_max_s=0.1)
    try:
        sender.submit(_tap_batches("only")[0])
        assert wait(lambda: "UNIMPLEMENTED" in sender.stats.last_error)
        assert sender.stats.sent == 0
    finally:
        sender.close()
        s.stop()


def test_write_behind_keeps_acks_flowing_while_redis_is_frozen(heads_dir):
    own = RedisServer.start()
    s = start(heads_dir, own.url, store_max_pending=100)
    r = redis.Redis.from_url(own.url, socket_timeout=5)
    try:
        assert ingest2(s.target, wire_v2.encode(HEAD2, 1, binds=([0], ["warm"]), prefill_handles=[0],
                                                prefill={"pooled": vecs(1)}))[1].code == 0
        assert wait(lambda: stored(r, "warm") is not None)
        os.kill(own.proc.pid, signal.SIGSTOP)
        store = s.running.service.store
        ch, call = v2_call(s.target)

        def msgs():
            for i in range(40):  # 40 x 16 new requests: far more than the 100 the write-behind holds
                hs = list(range(i * 16 + 1, i * 16 + 17))
                yield wire_v2.encode(HEAD2, i + 1, binds=(hs, [f"f{h}" for h in hs]), prefill_handles=hs,
                                     prefill={"pooled": vecs(16, i)})
        t0 = time.monotonic()
        acks = list(call(msgs(), timeout=20))
        elapsed = time.monotonic() - t0
        ch.close()
        assert len(acks) == 40 and all(a.accepted == 16 for a in acks)
        # acks never waited on the frozen Redis (each flush attempt there takes its 0.5 s timeout)
        assert elapsed < 5, elapsed
        # bounded: 100 waiting + at most 100 in the stuck pipeline; the rest dropped and counted
        assert store.pending <= 100 and store.in_flight <= 100 and store.dropped >= 40 * 16 - 200
        assert wait(lambda: not store.healthy, 5)
        os.kill(own.proc.pid, signal.SIGCONT)
        assert wait(lambda: store.healthy and store.pending == 0, 15)
        assert wait(lambda: stored(r, "f640") is not None)  # the newest survived the freeze
        assert store.alive
    finally:
        try:
            os.kill(own.proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        s.stop()
        own.stop()


def test_stream_handles_are_bounded_oldest_dropped(heads_dir, redis_url):
    s = start(heads_dir, redis_url, max_stream_handles=8)
    try:
        a, b = list(range(6)), list(range(6, 12))
        pre = wire_v2.encode(HEAD2, 1, binds=(a, [f"b{h}" for h in a]), prefill_handles=a, prefill={"pooled": vecs(6)})
        pre2 = wire_v2.encode(HEAD2, 4, binds=(b, [f"b{h}" for h in b]), prefill_handles=b, prefill={"pooled": vecs(6)})
        old = wire_v2.encode(HEAD2, 2, decode_handles=[0], decode_steps=[4], decode=vecs(1))   # dropped binding
        new = wire_v2.encode(HEAD2, 3, decode_handles=[11], decode_steps=[4], decode=vecs(1))  # kept
        ch, call = v2_call(s.target)
        acks = {a.seq: a for a in call(iter([pre, pre2, old, new]), timeout=10)}  # one stream, one handle map
        ch.close()
        assert acks[1].code == 0 and acks[4].code == 0  # 12 bindings, 8 kept: the oldest 4 dropped
        assert acks[2].rejected == 1 and "unbound" in acks[2].message
        assert acks[3].code == 0
    finally:
        s.stop()


def test_a_dead_flusher_says_so(heads_dir, redis_url):
    """A record the write-behind cannot encode is a bug: the flusher dies and says so (log, metric,
    gRPC health `lenpred.store`), while ingest and acks go on."""
    import httpx

    s = start(heads_dir, redis_url, metrics_port=0)
    try:
        store = s.running.service.store
        s.loop.call_soon_threadsafe(store.put, "bad", ("not", "a", "record"))
        assert wait(lambda: not store.alive, 5) and store.flusher_error
        ch = grpc.insecure_channel(s.target)
        st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="lenpred.store"), timeout=5)
        assert st.status == health_pb2.HealthCheckResponse.NOT_SERVING
        ch.close()
        body = httpx.get(f"http://127.0.0.1:{s.running.metrics_port}/metrics", timeout=5).text
        assert "lenpred_sidecar_store_flusher_alive 0.0" in body
        assert ingest2(s.target, wire_v2.encode(HEAD2, 1, binds=([0], ["still"]), prefill_handles=[0],
                                                prefill={"pooled": vecs(1)}))[1].accepted == 1
    finally:
        s.stop()
