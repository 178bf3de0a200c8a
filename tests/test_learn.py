"""Online learning (issue #14) through a real sidecar: real gRPC streams, real Redis, real files.

The vectors are synthetic but learnable (each request's length is a fixed function of its prompt
vector, plus noise): these tests check the plumbing — cold start, recording off the ack path, the
learner's split/train/promote/recalibrate, hot swap on a live stream, the kill switch, export/import
and restart — while `lenpred bench learn` measures accuracy on real traces."""
from __future__ import annotations

import json
import queue
import threading
import time

import grpc
import numpy as np
import pydantic
import pytest
import redis
import torch

from lenpred.bench._thread import SidecarThread
from lenpred.contract import keys, wire
from lenpred.contract.prediction import Prediction
from lenpred.proto.v1 import lenpred_pb2 as pb
from lenpred.proto.v1 import lenpred_pb2_grpc as pb_grpc
from lenpred.sidecar.learn import LearnConfig
from lenpred.sidecar.learn import cli as learn_cli
from lenpred.sidecar.learn.learner import ModelLearner
from lenpred.sidecar.learn.split import split_for, split_group
from lenpred.sidecar.learn.store import Example, ModelStore
from lenpred.sidecar.server import SidecarConfig
from lenpred.train.data import load
from lenpred.harness.waiting import eventually

torch.set_num_threads(1)
D, MODEL, CAP = 16, "test/learn-model", 256
HEAD = pb.HeadSelector(model_id=MODEL, hidden_size=D, layer=-1)
W = torch.randn(D, generator=torch.Generator().manual_seed(7))


def request(i: int, n_prompts: int = 120):
    """Request i: prompt i % n_prompts (so prompts repeat, as K samples do), its last-token vector,
    prompt tokens, decode states and a length that depends on the vector."""
    p = i % n_prompts
    g = torch.Generator().manual_seed(p)
    x = torch.randn(D, generator=g)
    base = float(np.exp(3.0 + 1.8 * torch.tanh(x @ W / 4).item()))
    L = int(min(CAP, max(2, base * float(np.exp(np.random.default_rng(i).normal(0, 0.05))))))
    return {"rid": f"q{i}", "last": x, "prompt_tokens": 20 + p, "length": L, "capped": L >= CAP,
            "steps": [s for s in (8, 16, 32) if s < L]}


def example(i: int) -> Example:
    """Request i as the recorder stores it."""
    r = request(i)
    x = r["last"].numpy().astype(np.float16)
    return Example(rid=r["rid"], group=split_group(r["prompt_tokens"], None), prompt_tokens=r["prompt_tokens"],
                   last=x, pooled=None, length=r["length"], capped=r["capped"], cap=CAP, finish_ts=time.time(),
                   dec_steps=r["steps"], dec_vecs=[x] * len(r["steps"]))


def batches(reqs):
    """prefill, decode, finished messages for a group of requests (as a tap sends them)."""
    pre = pb.IngestBatch(head=HEAD)
    pre.prefill.rids.extend(r["rid"] for r in reqs)
    pre.prefill.prompt_tokens.extend(r["prompt_tokens"] for r in reqs)
    pre.prefill.max_new_tokens.extend([CAP] * len(reqs))
    pre.prefill.last_vectors.CopyFrom(wire.encode(torch.stack([r["last"] for r in reqs]), torch.float16))
    dec = pb.IngestBatch(head=HEAD)
    rows = [(r["rid"], s, r["last"] * (1 - s / 64)) for r in reqs for s in r["steps"]]
    if rows:
        dec.decode.rids.extend(x[0] for x in rows)
        dec.decode.steps.extend(x[1] for x in rows)
        dec.decode.vectors.CopyFrom(wire.encode(torch.stack([x[2] for x in rows]), torch.float16))
    fin = pb.IngestBatch(head=HEAD)
    for r in reqs:
        fin.finished.add(rid=r["rid"], output_tokens=r["length"], prompt_tokens=r["prompt_tokens"],
                         truncated=r["capped"], max_new_tokens=CAP)
    return [pre, dec, fin]


class Stream:
    """One long-lived Ingest stream (like a tap's), fed from a queue."""

    def __init__(self, target):
        self.q: queue.Queue = queue.Queue()
        self.acks = []
        self.ch = grpc.insecure_channel(target)
        self.seq = 0

        def gen():
            while (b := self.q.get()) is not None:
                yield b

        self.t = threading.Thread(target=lambda: self.acks.extend(pb_grpc.LengthPredictorStub(self.ch).Ingest(gen())),
                                  daemon=True)
        self.t.start()

    def send(self, msgs):
        for b in msgs:
            self.seq += 1
            b.seq = self.seq
            self.q.put(b)

    def wait_acks(self, n, timeout=20):
        deadline = time.time() + timeout
        while len(self.acks) < n and time.time() < deadline:
            time.sleep(0.02)
        return self.acks[:n]

    def close(self):
        self.q.put(None)
        self.t.join(10)
        self.ch.close()


def learn_cfg(tmp_path, **kw) -> dict:
    return {"dir": str(tmp_path / "store"), "min_finished": 60, "retrain_every": 60, "flush_s": 0.2,
            "poll_s": 0.2, "segment_requests": 32, "spawn_learner": False, "epochs": 200, "plp_epochs": 5,
            "calib_every": 20, "keep_steps": [8, 16, 32], "coverage_band": (0.6, 1.0), **kw}


@pytest.fixture()
def sidecar(tmp_path, redis_url):
    empty = tmp_path / "no-heads"
    empty.mkdir()
    s = SidecarThread(SidecarConfig(port=0, redis_url=redis_url, heads=[str(empty)], device="cpu", max_wait_us=500,
                                    learn=learn_cfg(tmp_path)))
    yield s
    s.stop()


def wait(pred, timeout=20):
    return eventually(pred, timeout, interval=0.05)


# ------------------------------------------------------------------ config, split, store
@pytest.mark.parametrize("kw, ok", [
    ({}, True),
    ({"split_frac": (0.5, 0.5, 0.0)}, False),
    ({"split_frac": (0.6, 0.3, 0.3)}, False),
    ({"coverage_band": (0.95, 0.85)}, False),
    ({"min_finished": 1}, False),
    ({"no_such_setting": 1}, False),
])
def test_config_validation(tmp_path, kw, ok):
    if ok:
        LearnConfig(dir=str(tmp_path), **kw)
    else:
        with pytest.raises(pydantic.ValidationError):
            LearnConfig(dir=str(tmp_path), **kw)


@pytest.mark.parametrize("a, b, same", [
    (dict(prompt_tokens=50, last=np.ones(8)), dict(prompt_tokens=50, last=-np.ones(8)), True),   # bits=0: length only
    (dict(prompt_tokens=50, last=np.ones(8), bits=4), dict(prompt_tokens=50, last=-np.ones(8), bits=4), False),
    (dict(prompt_tokens=50, last=np.ones(8), prompt_hash=7), dict(prompt_tokens=9, last=None, prompt_hash=7), True),
])
def test_split_group(a, b, same):
    assert (split_group(**a) == split_group(**b)) == same
    assert split_for(split_group(**a)) in ("train", "val", "test")


def test_store_roundtrip_bounds_and_train_format(tmp_path):
    st = ModelStore(tmp_path, MODEL, D, -1).ensure()
    for s in range(5):
        st.write_segment([example(i) for i in range(s * 20, s * 20 + 20)])
    assert st.n_requests() == 100
    assert st.evict(50) == 3 and st.n_requests() == 40  # oldest segments go first
    tr = load([str(st.segments)])
    assert len(tr.length) == 40 and tr.pooled is None and tr.mean is None
    assert set(tr.split_keys.tolist()) <= {f"n{20 + p}" for p in range(120)}
    assert (tr.cap == CAP).all() and tr.finish_ts is not None
    assert (tr.length[tr.dec_req] > tr.dec_step).all()


# ------------------------------------------------------------------ the sidecar, end to end
def test_cold_start_learn_promote_hot_swap_and_kill_switch(sidecar, tmp_path, redis_url):
    cfg = LearnConfig(**learn_cfg(tmp_path))
    r = redis.Redis.from_url(redis_url)
    s = Stream(sidecar.target)
    try:
        # 1. cold start: no heads, rows accepted and recorded, nothing published
        reqs = [request(i) for i in range(160)]
        for g in range(0, 160, 16):
            s.send(batches(reqs[g:g + 16]))
        acks = s.wait_acks(30)
        assert len(acks) == 30 and all(a.code == 0 and a.rejected == 0 for a in acks), [a.message for a in acks]
        assert r.hget(keys.pred_key("default", "q0"), "p50") is None  # only the finished event's true_len
        st = ModelStore(cfg.dir, MODEL, D, -1)
        assert wait(lambda: st.n_requests() == 160)
        tr = load([str(st.segments)])
        assert sorted(set(tr.dec_step.tolist())) == [8, 16, 32]
        # 2. the learner trains, evaluates on the test slice, promotes
        ml = ModelLearner(st, cfg)
        assert ml.step() == "promoted", ml.state
        sv = st.read("serving.json")
        assert sv["version"].startswith("online-160") and 0.6 <= sv["metrics"]["test_p90_coverage"] <= 1.0
        # 3. the sidecar swaps it in while the same stream stays open; predictions carry the version
        assert wait(lambda: sidecar.running.service.learning.loaded.get((MODEL, D, -1), ("",))[0] == sv["version"])
        more = [request(i) for i in range(160, 176)]
        s.send(batches(more))
        acks = s.wait_acks(33)
        assert all(a.code == 0 for a in acks)
        # Redis writes are write-behind: the record lands shortly after the ack
        assert wait(lambda: r.hget(keys.pred_key("default", "q160"), "head_version") == sv["version"].encode())
        rec = Prediction.from_hash(r.hgetall(keys.pred_key("default", "q160")))
        assert rec.head_version == sv["version"] and rec.source in ("last", "plp")
        assert wait(lambda: not np.isnan(sidecar.running.service.learning.recorder.live[(MODEL, D, -1)].mae()))
        # 4. recalibration follows the newest requests the head never saw
        s.send([b for g in range(176, 240, 16) for b in batches([request(i) for i in range(g, g + 16)])])
        s.wait_acks(45)
        assert wait(lambda: st.n_requests() == 240)
        assert ml.step() in ("recalibrated", "promoted", "rejected")
        # 5. kill switch with revert: learned heads leave, recording stops
        assert learn_cli.main(["disable", "--dir", cfg.dir, "--model", MODEL, "--revert"]) == 0
        assert wait(lambda: not [k for k in sidecar.running.service.heads.pairs if k[0] == MODEL])
        time.sleep(cfg.poll_s * 2)
        n = st.n_requests()
        s.send(batches([request(i) for i in range(240, 256)]))
        s.wait_acks(48)
        time.sleep(cfg.flush_s * 3)
        assert st.n_requests() == n
    finally:
        s.close()


def test_restart_resumes_serving_and_cli(tmp_path, redis_url, capsys):
    cfg = LearnConfig(**learn_cfg(tmp_path))
    empty = tmp_path / "no-heads"
    empty.mkdir()
    sc = SidecarThread(SidecarConfig(port=0, redis_url=redis_url, heads=[str(empty)], device="cpu",
                                     learn=cfg.model_dump()))
    s = Stream(sc.target)
    try:
        for g in range(0, 128, 16):
            s.send(batches([request(i) for i in range(g, g + 16)]))
        s.wait_acks(24)
        st = ModelStore(cfg.dir, MODEL, D, -1)
        assert wait(lambda: st.n_requests() == 128)
        assert ModelLearner(st, cfg).step() == "promoted"
    finally:
        s.close()
        sc.stop()
    # a new sidecar process on the same store serves the promoted heads at once
    sc = SidecarThread(SidecarConfig(port=0, redis_url=redis_url, heads=[str(empty)], device="cpu",
                                     learn=cfg.model_dump()))
    try:
        with grpc.insecure_channel(sc.target) as ch:
            info = pb_grpc.LengthPredictorStub(ch).ModelInfo(pb.ModelInfoRequest())
        assert {h.kind for h in info.heads if h.key.model_id == MODEL} == {"last", "plp"}
    finally:
        sc.stop()
    # operator CLI: status, export -> `lenpred train` format, import back under another id
    capsys.readouterr()
    assert learn_cli.main(["status", "--dir", cfg.dir]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["stored_requests"] == 128 and rows[0]["serving"].startswith("online-")
    out = tmp_path / "export"
    assert learn_cli.main(["export", "--dir", cfg.dir, "--model", MODEL, "--out", str(out)]) == 0
    assert len(load(str(out)).length) == 128
    assert learn_cli.main(["import", "--dir", cfg.dir, "--data", str(out), "--model-id", "test/imported"]) == 0
    assert ModelStore.find(cfg.dir, "test/imported").n_requests() == 128
    assert learn_cli.main(["export", "--dir", cfg.dir, "--model", "nope", "--out", str(tmp_path / "x")]) == 2


def test_shipped_heads_are_the_reference_of_a_first_candidate(tmp_path):
    """A model the sidecar already has heads for keeps them until a learned candidate beats them."""
    from lenpred.bench._thread import write_random_heads

    shipped = write_random_heads(tmp_path / "shipped", D, MODEL, version="shipped")
    cfg = LearnConfig(**learn_cfg(tmp_path, reference_heads=[str(shipped)]))
    st = ModelStore(cfg.dir, MODEL, D, -1).ensure()
    st.write_segment([example(i) for i in range(160)])
    ml = ModelLearner(st, cfg)
    assert ml.serving_heads()["last"].meta.version == "shipped"
    what = ml.step()
    rec = (ml.state["promotions"] + ml.state["rejections"])[-1]
    assert rec["reference"] == "serving shipped" and what in ("promoted", "rejected")
