"""The tap's sender against a real sidecar: delivery, never blocking, drop-and-count while the
sidecar is down, reconnect when it comes back."""
from __future__ import annotations

import time

import redis
import torch

from lenpred.contract import keys, wire
from lenpred.proto.v1 import lenpred_pb2 as pb
from lenpred.harness.redisproc import free_port
from lenpred.sidecar.server import SidecarConfig
from lenpred.tap.config import TapConfig
from lenpred.tap.core import Tap
from lenpred.tap.sender import TapSender
from lenpred.bench._thread import SidecarThread, write_random_heads
from lenpred.harness.waiting import eventually

D = 16


def _batch(rid: str) -> pb.IngestBatch:
    b = pb.IngestBatch(head=pb.HeadSelector(model_id="test/model", hidden_size=D, layer=-1))
    b.prefill.rids.append(rid)
    b.prefill.vectors.CopyFrom(wire.encode(torch.randn(1, D)))
    return b


def _wait(pred, timeout=10.0):
    return eventually(pred, timeout, interval=0.05)


def test_tap_to_sidecar_to_redis(tmp_path, redis_url):
    heads = write_random_heads(tmp_path / "h", D)
    sc = SidecarThread(SidecarConfig(port=0, redis_url=redis_url, heads=[str(heads)], device="cpu"))
    sender = TapSender(sc.target, engine_id="test")
    try:
        tap = Tap(TapConfig(every=4), model_id="test/model", hidden_size=D, sender=sender)
        h, e = torch.randn(7, D), torch.rand(7)
        tap.on_extend(["req-1"], h, e, [7], [7])
        tap.end_step()
        tap.on_decode(["req-1"], [4], torch.randn(1, D))
        tap.end_step()
        tap.on_finished("req-1", output_tokens=9, prompt_tokens=7)
        tap.end_step()
        r = redis.Redis.from_url(redis_url)
        key = keys.pred_key("default", "req-1")
        assert _wait(lambda: r.hget(key, "true_len") == b"9" and r.hget(key, "source") == b"plp")
        assert sender.stats.sent == 3 and sender.stats.dropped == 0
    finally:
        sender.close()
        sc.stop()


def test_dead_sidecar_never_blocks_and_counts_drops():
    sender = TapSender(f"127.0.0.1:{free_port()}", max_queue=8, backoff_initial_s=0.05)
    try:
        t0 = time.perf_counter()
        results = [sender.submit(_batch(f"r{i}")) for i in range(100)]
        elapsed = time.perf_counter() - t0
        assert elapsed < 1.0, f"submit blocked for {elapsed:.2f}s"
        assert results.count(False) >= 100 - 9
        assert sender.stats.dropped == results.count(False)
        assert sender.stats.submitted == 100
    finally:
        sender.close()


def test_reconnects_when_sidecar_comes_back(tmp_path, redis_url):
    heads = write_random_heads(tmp_path / "h", D)
    port = free_port()
    sender = TapSender(f"127.0.0.1:{port}", backoff_initial_s=0.05, backoff_max_s=0.2)
    sc = None
    try:
        sender.submit(_batch("early"))  # queued while down
        time.sleep(0.3)
        sc = SidecarThread(SidecarConfig(port=port, redis_url=redis_url, heads=[str(heads)], device="cpu"))
        r = redis.Redis.from_url(redis_url)
        assert _wait(lambda: r.exists(keys.pred_key("default", "early")))
        sc.stop()
        sc = None
        assert _wait(lambda: not sender.stats.connected)
        sc = SidecarThread(SidecarConfig(port=port, redis_url=redis_url, heads=[str(heads)], device="cpu"))
        sender.submit(_batch("late"))
        assert _wait(lambda: r.exists(keys.pred_key("default", "late")))
        assert sender.stats.reconnects >= 1
    finally:
        sender.close()
        if sc:
            sc.stop()


def test_pool_off_ships_only_the_last_token_state():
    tap = Tap(TapConfig(pool=False), model_id="test/model", hidden_size=D)
    h, e = torch.randn(5, D), torch.rand(5)
    tap.on_extend(["p"], h, e, [5], [5])
    b = tap.end_step()
    assert not b.prefill.HasField("vectors") and not b.prefill.entropy_mean
    assert torch.allclose(wire.decode(b.prefill.last_vectors)[0], h[-1], atol=1e-2)
    assert TapConfig.from_env({"LENPRED_TAP_POOL": "0"}).pool is False
