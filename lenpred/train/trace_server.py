"""A real lenpred.v1 gRPC Ingest server that keeps what training needs from a tap's stream.

Unlike `lenpred.harness.recorder.RecordingSidecar` (which keeps every message), it aggregates per
request id as rows arrive and drops everything training does not use, so a collection of tens of
thousands of replies stays small in RAM: the prefill features (entropy pool, last prompt token's
state, prompt tokens, mean prompt entropy, output cap), decode states only at the kept steps and
only for requests the caller wants decode states of, and the finished event with the order in which
finished events arrived (the replay harness replays in that order).
"""
from __future__ import annotations

import itertools
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np

from lenpred.contract import wire
from lenpred.proto.v1 import lenpred_pb2 as pb
from lenpred.proto.v1 import lenpred_pb2_grpc as pb_grpc
from lenpred.train.data import target_step


@dataclass
class RequestTrace:
    pooled: np.ndarray | None = None       # [d] float16
    last: np.ndarray | None = None         # [d] float16
    prompt_tokens: int = 0
    entropy_mean: float = 0.0
    max_new_tokens: int = 0
    prefill_seq: int = -1
    decode: dict[int, np.ndarray] = field(default_factory=dict)  # actual step -> [d] float16
    filled: set = field(default_factory=set)                      # kept target steps already stored
    output_tokens: int = -1
    truncated: bool = False
    aborted: bool = False
    finish_seq: int = -1

    @property
    def done(self) -> bool:
        return self.finish_seq >= 0


class _Servicer(pb_grpc.LengthPredictorServicer):
    def __init__(self, srv: "TraceServer"):
        self.srv = srv

    def Ingest(self, request_iterator, context):
        for b in request_iterator:
            n = self.srv.absorb(b)
            yield pb.IngestAck(seq=b.seq, accepted=n)


class TraceServer:
    """keep_steps: for each of these steps, the first decode state at or after it (before the next
    one) is kept, under its actual step (the tap samples every k-th engine step, so a request's
    states need not sit on multiples of k); want_decode(rid) -> bool: whose decode states to keep."""

    def __init__(self, keep_steps: set[int], want_decode=lambda rid: True, port: int = 0, host: str = "127.0.0.1"):
        self.keep_steps = sorted(set(keep_steps))
        self.want_decode = want_decode
        self.reqs: dict[str, RequestTrace] = {}
        self.model_id = ""
        self.hidden_size = 0
        self.messages = 0
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                  options=[("grpc.max_receive_message_length", 256 << 20)])
        pb_grpc.add_LengthPredictorServicer_to_server(_Servicer(self), self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        self.target = f"{host}:{self.port}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)

    def absorb(self, b: pb.IngestBatch) -> int:
        pre = b.prefill
        pooled = wire.decode(pre.vectors).numpy().astype(np.float16) if pre.HasField("vectors") else None
        last = wire.decode(pre.last_vectors).numpy().astype(np.float16) if pre.HasField("last_vectors") else None
        dec_keep = [i for i, (rid, s) in enumerate(zip(b.decode.rids, b.decode.steps))
                    if target_step(s, self.keep_steps) is not None and self.want_decode(rid)]
        dvec = wire.decode(b.decode.vectors).numpy().astype(np.float16) if dec_keep else None
        with self._lock:
            self.messages += 1
            if b.head.model_id:
                self.model_id, self.hidden_size = b.head.model_id, int(b.head.hidden_size)
            for i, rid in enumerate(pre.rids):
                t = self.reqs.setdefault(rid, RequestTrace())
                t.pooled = pooled[i] if pooled is not None else None
                t.last = last[i] if last is not None else None
                t.prompt_tokens = int(pre.prompt_tokens[i]) if pre.prompt_tokens else 0
                t.entropy_mean = float(pre.entropy_mean[i]) if pre.entropy_mean else 0.0
                t.max_new_tokens = int(pre.max_new_tokens[i]) if pre.max_new_tokens else 0
                t.prefill_seq = next(self._seq)
            for i in dec_keep:
                t = self.reqs.setdefault(b.decode.rids[i], RequestTrace())
                step = int(b.decode.steps[i])
                tgt = target_step(step, self.keep_steps)
                if tgt not in t.filled:
                    t.filled.add(tgt)
                    t.decode[step] = dvec[i]
            for f in b.finished:
                t = self.reqs.setdefault(f.rid, RequestTrace())
                t.output_tokens, t.truncated, t.aborted = int(f.output_tokens), bool(f.truncated), bool(f.aborted)
                t.finish_seq = next(self._seq)
        return len(pre.rids) + len(b.decode.rids) + len(b.finished)

    def done(self, rids) -> list[str]:
        with self._lock:
            return [r for r in rids if r in self.reqs and self.reqs[r].done]

    def pop(self, rid: str) -> RequestTrace | None:
        with self._lock:
            return self.reqs.pop(rid, None)
