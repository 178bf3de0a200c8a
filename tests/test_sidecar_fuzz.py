"""Bad gRPC against a real sidecar: a fuzz of >= 10,000 malformed Ingest messages (raw bytes over a
generic stream, so anything can be sent) and a table of hostile-but-well-formed inputs (issue #11).
Every malformed message gets a refusal in its ack (code 3, INVALID_ARGUMENT), the same stream then
serves a valid message, and the sidecar's RSS stays bounded."""
from __future__ import annotations

import math
import time
import random
import struct

import grpc
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lenpred.contract import keys, wire
from lenpred.harness.procs import lenpred_argv, spawn, wait_grpc
from lenpred.harness.redisproc import free_port
from lenpred.proto.v1 import lenpred_pb2 as pb
from lenpred.proto.v1 import lenpred_pb2_grpc as pb_grpc
from lenpred.sidecar.server import SidecarConfig
from lenpred.bench._thread import SidecarThread, write_random_heads

D = 16
MODEL = "test/model"
HEAD = pb.HeadSelector(model_id=MODEL, hidden_size=D, layer=-1)
LIMIT = 1 << 20            # --max-message-bytes of the fuzzed sidecar; the transport refuses 4x this
INGEST = "/lenpred.v1.LengthPredictor/Ingest"
FUZZ_MESSAGES = 10_500
RSS_GROWTH_MAX_KB = 96 * 1024


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
    return write_random_heads(tmp_path_factory.mktemp("heads"), D, MODEL)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# ------------------------------------------------------------------ the malformed corpus
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _valid(rng: random.Random, i: int) -> bytes:
    b = pb.IngestBatch(head=HEAD, seq=i, engine_id="fuzz")
    n = rng.randint(1, 4)
    b.prefill.rids.extend(f"fz{i}-{k}" for k in range(n))
    b.prefill.prompt_tokens.extend([rng.randint(1, 500)] * n)
    b.prefill.vectors.CopyFrom(wire.encode(torch.randn(n, D), torch.float16))
    b.prefill.last_vectors.CopyFrom(wire.encode(torch.randn(n, D), torch.float32))
    b.decode.rids.append(f"fz{i}-0")
    b.decode.steps.append(8)
    b.decode.vectors.CopyFrom(wire.encode(torch.randn(1, D)))
    b.finished.add(rid=f"fz{i - 1}-0", output_tokens=rng.randint(1, 400), prompt_tokens=10, max_new_tokens=512)
    return b.SerializeToString()


def _wrong_type(rng: random.Random) -> bytes:
    """A known field number with a wire type it does not have, at the top or one level down."""
    field = rng.randint(1, 6)
    wt = rng.choice([0, 1, 2, 5, 3, 4, 6, 7])
    payload = {0: _varint(rng.getrandbits(64)), 1: struct.pack("<d", rng.random()),
               2: _varint(8) + rng.randbytes(8), 5: struct.pack("<f", 1.0)}.get(wt, rng.randbytes(rng.randint(0, 8)))
    inner = _varint(field << 3 | wt) + payload
    if rng.random() < 0.5:  # nested: e.g. prefill { rids = <varint> } or a Tensor with a string shape
        return _varint(rng.choice([1, 4, 5, 6]) << 3 | 2) + _varint(len(inner)) + inner
    return inner


def _length_lie(rng: random.Random, valid: bytes) -> bytes:
    """A length-delimited field whose length runs past the end of the message (or is absurd)."""
    field = rng.choice([1, 2, 4, 5, 6])
    return valid[: rng.randint(0, 20)] + _varint(field << 3 | 2) + _varint(rng.choice([len(valid) * 4, 1 << 40, 2**63])) + valid[:10]


def corpus(n: int, seed: int = 1234) -> list[bytes]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    valids = [_valid(rng, i) for i in range(64)]
    msgs: list[bytes] = [b""] * 10                                                   # empty
    big_rids = pb.IngestBatch(head=HEAD)
    big_rids.prefill.rids.extend(f"r{k}" for k in range(120_000))                    # ~0.8 MB: too many rows
    steps = pb.IngestBatch(head=HEAD)
    steps.decode.steps.extend(range(200_000))                                        # a huge packed field
    fin = pb.IngestBatch()
    for k in range(9_000):
        fin.finished.add(rid=f"big{k}", output_tokens=4_000_000_000)                  # rows > the per-message limit
    over = pb.IngestBatch(head=HEAD, engine_id="x" * (3 * LIMIT))                     # 3 MB: over the limit, under the transport's
    msgs += [big_rids.SerializeToString(), steps.SerializeToString(), fin.SerializeToString(),
             over.SerializeToString()] * 3
    while len(msgs) < n:
        kind = rng.random()
        v = rng.choice(valids)
        if kind < 0.30:
            msgs.append(rng.randbytes(rng.randint(1, 300)))                          # random bytes
        elif kind < 0.60:
            msgs.append(v[: rng.randint(1, len(v) - 1)])                              # truncated valid proto
        elif kind < 0.75:
            m = bytearray(v)                                                          # a few flipped bytes
            for _ in range(rng.randint(1, 4)):
                m[rng.randrange(len(m))] = rng.randrange(256)
            msgs.append(bytes(m))
        elif kind < 0.90:
            msgs.append(_wrong_type(rng))                                             # wrong field types
        else:
            msgs.append(_length_lie(rng, v))                                          # lengths that lie
    return msgs


def parses(raw: bytes) -> bool:
    if len(raw) > LIMIT:
        return False
    try:
        pb.IngestBatch.FromString(raw)
        return True
    except Exception:  # noqa: BLE001 — any parse failure is what we want to count
        return False


def test_corpus_is_mostly_unparseable():
    msgs = corpus(FUZZ_MESSAGES)
    assert len(msgs) >= 10_000
    assert sum(not parses(m) for m in msgs) > 5_000


# ------------------------------------------------------------------ the fuzz, against a real process
@pytest.fixture(scope="module")
def sidecar_proc(heads_dir, redis_server, tmp_path_factory):
    port = free_port()
    child = spawn("sidecar-fuzz", lenpred_argv(
        "sidecar", "--port", str(port), "--heads", str(heads_dir), "--device", "cpu",
        "--redis-url", redis_server.url, "--max-message-bytes", str(LIMIT)), tmp_path_factory.mktemp("logs"))
    target = f"127.0.0.1:{port}"
    try:
        wait_grpc(child, target, 90)
        yield child, target
    finally:
        child.stop()


def _raw_ingest(ch: grpc.Channel, msgs, timeout: float) -> list[pb.IngestAck]:
    call = ch.stream_stream(INGEST, request_serializer=None, response_deserializer=pb.IngestAck.FromString)
    return list(call(iter(msgs), timeout=timeout))


def test_grpc_fuzz_10k_malformed_messages(sidecar_proc):
    child, target = sidecar_proc
    opts = [("grpc.max_send_message_length", 4 * LIMIT - 1024)]
    rng = random.Random(7)
    with grpc.insecure_channel(target, options=opts) as ch:
        warm = [_valid(rng, 10_000 + i) for i in range(200)]
        assert all(a.code == 0 for a in _raw_ingest(ch, warm, 60))
        # warm the refusal paths too, so the baseline holds what any steady state holds
        _raw_ingest(ch, corpus(500, seed=99), 60)
        before = rss_kb(child.proc.pid)

        msgs = corpus(FUZZ_MESSAGES)
        final = pb.IngestBatch(head=HEAD, seq=10**9)
        final.prefill.rids.append("after-fuzz")
        final.prefill.vectors.CopyFrom(wire.encode(torch.randn(1, D)))
        acks = _raw_ingest(ch, msgs + [final.SerializeToString()], 120)

        after = rss_kb(child.proc.pid)
        assert len(acks) == len(msgs) + 1, "every message gets exactly one ack"
        last = [a for a in acks if a.seq == 10**9]
        assert len(last) == 1 and last[0].code == 0 and last[0].accepted == 1, last
        unparseable = sum(not parses(m) for m in msgs)
        refused = [a for a in acks if a.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]]
        assert all(a.code in (0, 3) for a in acks)
        assert len(refused) >= unparseable, (len(refused), unparseable)
        assert all(a.message for a in refused)
        # what parsed (an empty batch, a truncated batch that still decodes) is judged as data:
        # accepted rows must come from messages that parse
        assert sum(1 for a in acks if a.accepted) <= len(msgs) - unparseable + 1
        # the process is alive, healthy and serves a new stream and Predict
        assert child.alive()
        stub = pb_grpc.LengthPredictorStub(ch)
        assert len(stub.Predict(pb.PredictRequest(head=HEAD, prompt_vectors=wire.encode(torch.randn(2, D))),
                                timeout=10).predictions) == 2
        hc = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert hc.status == health_pb2.HealthCheckResponse.SERVING
        print(f"fuzz: {len(msgs)} messages, {unparseable} unparseable, {len(refused)} refused; "
              f"RSS {before / 1024:.0f} -> {after / 1024:.0f} MiB")
        assert after - before < RSS_GROWTH_MAX_KB, f"RSS grew {(after - before) / 1024:.0f} MiB"


def test_grpc_fuzz_predict_raw_bytes(sidecar_proc):
    """1,000 malformed unary Predict calls: each INVALID_ARGUMENT with a reason."""
    _, target = sidecar_proc
    rng = random.Random(5)
    with grpc.insecure_channel(target) as ch:
        raw = ch.unary_unary("/lenpred.v1.LengthPredictor/Predict", request_serializer=None,
                             response_deserializer=pb.PredictResponse.FromString)
        codes = {}
        for m in corpus(1_000, seed=3):
            m = m if len(m) <= LIMIT else m[:100]
            try:
                raw(m, timeout=10)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as e:
                codes[e.code().name] = codes.get(e.code().name, 0) + 1
                assert e.details()
        assert codes == {"INVALID_ARGUMENT": 1_000}, codes
        good = pb.PredictRequest(head=HEAD, prompt_vectors=wire.encode(torch.randn(1, D)), rids=[f"p{rng.random()}"])
        assert len(pb_grpc.LengthPredictorStub(ch).Predict(good, timeout=10).predictions) == 1


def test_message_over_the_transport_limit_ends_only_that_stream(sidecar_proc):
    _, target = sidecar_proc
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        huge = pb.IngestBatch(head=HEAD, engine_id="x" * (5 * LIMIT)).SerializeToString()
        with pytest.raises(grpc.RpcError) as ei:
            _raw_ingest(ch, [huge], 30)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        ok = pb.IngestBatch(head=HEAD, seq=1)
        ok.prefill.rids.append("after-huge")
        ok.prefill.vectors.CopyFrom(wire.encode(torch.randn(1, D)))
        assert [(a.seq, a.code) for a in _raw_ingest(ch, [ok.SerializeToString()], 30)] == [(1, 0)]


# ------------------------------------------------------------------ hostile but well-formed input (table)
@pytest.fixture(scope="module")
def sidecar(heads_dir, redis_server):
    s = SidecarThread(SidecarConfig(port=0, redis_url=redis_server.url, heads=[str(heads_dir)], device="cpu",
                                    max_wait_us=500))
    yield s
    s.stop()


@pytest.fixture()
def stub(sidecar, redis_url):
    with grpc.insecure_channel(sidecar.target) as ch:
        yield pb_grpc.LengthPredictorStub(ch)


def _eventually(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def _ingest(stub, *batches) -> list[pb.IngestAck]:
    return list(stub.Ingest(iter(batches), timeout=60))


def _fields(r: redis.Redis, rid: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(keys.pred_key("default", rid)).items()}


def _all_finite(h: dict[str, str]) -> bool:
    out = True
    for k, v in h.items():
        try:
            out &= math.isfinite(float(v))
        except ValueError:
            continue  # text fields (source, head_version)
    return out


def case_fake_finished(stub, r):
    """23,100 fake finished rows of 4e9 tokens: every recorded length is clamped to the request's
    max_new_tokens, or to the sidecar's ceiling when none is given."""
    rows = 23_100
    batches = []
    for m in range(4):
        b = pb.IngestBatch(head=HEAD, seq=m + 1)
        for k in range(m * rows // 4, (m + 1) * rows // 4):
            b.finished.add(rid=f"fake{k}", output_tokens=4_000_000_000, prompt_tokens=10,
                           max_new_tokens=512 if k % 2 == 0 else 0)
        batches.append(b)
    acks = _ingest(stub, *batches)
    assert sum(a.accepted + a.rejected for a in acks) == rows
    _eventually(lambda: r.xlen(keys.finished_stream("default")) >= rows, 30)  # Redis is write-behind
    _eventually(lambda: "true_len" in _fields(r, "fake198"), 10)
    entries = r.xrange(keys.finished_stream("default"))
    lens = {e[b"rid"].decode(): int(e[b"output_tokens"]) for _, e in entries}
    assert lens, "finished rows are recorded (clamped), not dropped silently"
    ceiling = getattr(SidecarConfig(), "max_output_tokens", 1 << 20)  # the default ceiling (branch rate)
    assert max(lens.values()) <= ceiling
    assert all(v <= 512 for rid, v in lens.items() if int(rid[4:]) % 2 == 0)
    assert all(int(_fields(r, f"fake{k}").get("true_len", 0)) <= 512 for k in range(0, 200, 2))


def _huge_vectors(n: int) -> torch.Tensor:
    return torch.full((n, D), 3e38) * torch.tensor([1.0, -1.0]).repeat(D // 2)


def case_huge_finite_vectors_ingest(stub, r):
    """Finite float32 vectors of 3e38: whatever the heads make of them, no NaN/Inf is stored."""
    b = pb.IngestBatch(head=HEAD, seq=1)
    b.prefill.rids.extend(["huge0", "huge1"])
    b.prefill.vectors.CopyFrom(wire.encode(_huge_vectors(2), torch.float32))
    b.prefill.last_vectors.CopyFrom(wire.encode(_huge_vectors(2), torch.float32))
    d = pb.IngestBatch(head=HEAD, seq=2)
    d.decode.rids.append("huge0")
    d.decode.steps.append(8)
    d.decode.vectors.CopyFrom(wire.encode(_huge_vectors(1), torch.float32))
    acks = _ingest(stub, b)
    acks += _ingest(stub, d)
    assert all(a.code in (0, 3) for a in acks)
    for rid in ("huge0", "huge1"):
        h = _fields(r, rid)
        assert _all_finite(h), h
    for _, e in r.xrange(keys.finished_stream("default")):
        assert _all_finite({k.decode(): v.decode() for k, v in e.items()})


def case_huge_finite_vectors_predict(stub, r):
    req = pb.PredictRequest(head=HEAD, prompt_vectors=wire.encode(_huge_vectors(2), torch.float32), rids=["hp0", "hp1"])
    try:
        resp = stub.Predict(req, timeout=10)
    except grpc.RpcError as e:  # refusing is fine; a 500-like error or NaN is not
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        resp = None
    if resp is not None:
        for p in resp.predictions:
            assert all(math.isfinite(x) for x in (p.mean, p.p50, p.p90, p.remaining_p50, p.remaining_p90)), p
    for rid in ("hp0", "hp1"):
        assert _all_finite(_fields(r, rid))


def case_long_rid(stub, r):
    """A 64 KiB request id: refused (bounded), never stored as a Redis key."""
    rid = "R" * (64 << 10)
    b = pb.IngestBatch(head=HEAD, seq=1)
    b.prefill.rids.append(rid)
    b.prefill.vectors.CopyFrom(wire.encode(torch.randn(1, D)))
    f = pb.IngestBatch(head=HEAD, seq=2)
    f.finished.add(rid=rid, output_tokens=5)
    acks = _ingest(stub, b, f)
    assert all(a.code == 3 and a.rejected == 1 for a in acks), acks
    assert not r.exists(keys.pred_key("default", rid))


def _needs_rate(attr: str | None):
    """xfail(strict) until branch rate's bound is merged; keyed on its config field when it has one,
    so the case flips to a plain test by itself. No field (non-finite head outputs): flip by hand."""
    missing = True if attr is None else not hasattr(SidecarConfig(), attr)
    return pytest.mark.xfail(missing, strict=True, reason=f"needs branch rate bounds ({attr or 'non-finite head outputs'})")


BAD_GRPC = [
    pytest.param(case_fake_finished, id="23100-fake-finished-4e9-tokens", marks=_needs_rate("max_output_tokens")),
    pytest.param(case_huge_finite_vectors_ingest, id="finite-3e38-vectors-ingest"),
    pytest.param(case_huge_finite_vectors_predict, id="finite-3e38-vectors-predict"),
    pytest.param(case_long_rid, id="64KiB-rid", marks=_needs_rate("max_rid_bytes")),
]


@pytest.mark.parametrize("case", BAD_GRPC)
def test_bad_grpc_table(stub, redis_url, case):
    r = redis.Redis.from_url(redis_url)
    case(stub, r)
    # the sidecar keeps serving a valid client afterwards
    ok = pb.IngestBatch(head=HEAD, seq=99)
    ok.prefill.rids.append("still-ok")
    ok.prefill.vectors.CopyFrom(wire.encode(torch.randn(1, D)))
    assert [(a.seq, a.code) for a in _ingest(stub, ok)] == [(99, 0)]
    assert _eventually(lambda: r.exists(keys.pred_key("default", "still-ok")))  # Redis is write-behind
