"""Bench client streams for `lenpred bench sidecar` (no torch import: client processes start fast).

Messages are serialized once, up front: P templates per stream, message k carries prefill rows for
request set k % P and decode rows for set (k-1) % P (as a tap would: new requests prefill while
earlier ones decode). The per-message seq is appended as one more protobuf field 3 (a later
occurrence of a scalar field wins), so sending costs one bytes concatenation, and what is measured
is the server, not the client's serializer. v1 and v2 carry the same rows and the same vectors.
"""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np

from lenpred.proto.v1 import lenpred_pb2 as pb
from lenpred.proto.v2 import lenpred_pb2 as pb2

PATHS = {"v1": "/lenpred.v1.LengthPredictor/Ingest", "v2": "/lenpred.v2.LengthPredictor/Ingest"}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def templates(wire: str, model_id: str, d: int, rows: int, sid: int, sets: int = 16, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed + sid)
    vec = rng.standard_normal((rows, d), dtype=np.float32).astype("<f2").tobytes()
    rids = [[f"s{sid}-{k}-{i}" for i in range(rows)] for k in range(sets)]
    out = []
    for k in range(sets):
        prev = (k - 1) % sets
        if wire == "v1":
            b = pb.IngestBatch(head=pb.HeadSelector(model_id=model_id, hidden_size=d, layer=-1))
            b.prefill.rids.extend(rids[k])
            b.prefill.prompt_tokens.extend([64] * rows)
            b.prefill.vectors.CopyFrom(pb.Tensor(dtype=pb.DTYPE_FLOAT16, shape=[rows, d], data=vec))
            b.decode.rids.extend(rids[prev])
            b.decode.steps.extend([8] * rows)
            b.decode.vectors.CopyFrom(pb.Tensor(dtype=pb.DTYPE_FLOAT16, shape=[rows, d], data=vec))
        else:
            hk = np.arange(k * rows, (k + 1) * rows, dtype="<i4")
            hp = np.arange(prev * rows, (prev + 1) * rows, dtype="<i4")
            b = pb2.Batch(head=pb2.HeadSelector(model_id=model_id, hidden_size=d, layer=-1),
                          dtype=pb2.DTYPE_FLOAT16, prefill_features=pb2.FEATURE_POOLED)
            b.bind_handles = hk.tobytes()  # a tap binds each request once; here every round re-binds
            b.bind_rids.extend(rids[k])
            b.prefill_handles = hk.tobytes()
            b.prompt_tokens = np.full(rows, 64, "<i4").tobytes()
            b.decode_handles = hp.tobytes()
            b.decode_steps = np.full(rows, 8, "<i4").tobytes()
            b.vectors = vec + vec
        out.append(b.SerializeToString())
    return out


def stream(target: str, wire: str, model_id: str, d: int, sid: int, rows: int, window: int, start_at: float,
           stop_at: float, out) -> None:
    """One engine stream: up to `window` messages in flight; reports (rows acked, ack latencies)."""
    tpl = templates(wire, model_id, d, rows, sid)
    sem = threading.Semaphore(window)
    sent_at: dict[int, float] = {}
    lat: list[float] = []
    accepted = 0

    def gen():
        seq = 0
        time.sleep(max(0.0, start_at - time.time()))
        while time.time() < stop_at:
            if not sem.acquire(timeout=1.0):
                continue
            seq += 1
            sent_at[seq] = time.perf_counter()
            yield tpl[seq % len(tpl)] + b"\x18" + _varint(seq)

    ack_cls = pb.IngestAck if wire == "v1" else pb2.Ack
    try:
        with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 256 << 20)]) as ch:
            call = ch.stream_stream(PATHS[wire], request_serializer=lambda b: b, response_deserializer=ack_cls.FromString)
            for ack in call(gen(), timeout=stop_at - time.time() + 60):
                t = sent_at.pop(ack.seq, None)
                if t is not None and time.time() < stop_at:
                    lat.append(time.perf_counter() - t)
                    accepted += ack.accepted
                sem.release()
        out.put((accepted, lat, ""))
    except Exception as e:  # noqa: BLE001 — reported to the parent, which fails the row loudly
        out.put((accepted, lat, f"{type(e).__name__}: {e}"[:500]))
