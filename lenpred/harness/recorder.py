"""A real lenpred.v1 gRPC server that records what the tap sends (tests, debugging, tap benches).

It implements only `Ingest` (acks every batch as accepted); it is not the sidecar. Real gRPC over a
real socket, so the tap's sender is exercised exactly as in production.
"""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc

from lenpred.contract import wire
from lenpred.proto.v1 import lenpred_pb2 as pb
from lenpred.proto.v1 import lenpred_pb2_grpc as pb_grpc


class _Servicer(pb_grpc.LengthPredictorServicer):
    def __init__(self, rec: "RecordingSidecar"):
        self.rec = rec

    def Ingest(self, request_iterator, context):
        if self.rec.upstream is None:
            for batch in request_iterator:
                self.rec._record(batch)
                n = len(batch.prefill.rids) + len(batch.decode.rids) + len(batch.finished)
                yield pb.IngestAck(seq=batch.seq, accepted=n)
            return

        def tee():
            for batch in request_iterator:
                self.rec._record(batch)
                yield batch

        # forward the stream to the real sidecar and relay its acks
        yield from self.rec.upstream.Ingest(tee())


class RecordingSidecar:
    """Records every IngestBatch. With `forward_to="host:port"` it is a recording proxy: each stream
    is relayed to that (real) sidecar over gRPC and its acks come back to the tap."""

    def __init__(self, port: int = 0, forward_to: str | None = None, keep: bool = True):
        self.batches: list[pb.IngestBatch] = []
        self.keep = keep  # False: count rows per engine only (long benchmarks)
        self.counts: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(forward_to) if forward_to else None
        self.upstream = pb_grpc.LengthPredictorStub(self._channel) if self._channel else None
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_LengthPredictorServicer_to_server(_Servicer(self), self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _record(self, batch: pb.IngestBatch) -> None:
        with self._lock:
            c = self.counts.setdefault(batch.engine_id, {"messages": 0, "prefill": 0, "decode": 0,
                                                         "finished": 0, "bytes": 0})
            c["messages"] += 1
            c["prefill"] += len(batch.prefill.rids)
            c["decode"] += len(batch.decode.rids)
            c["finished"] += len(batch.finished)
            c["bytes"] += batch.ByteSize()
            if self.keep:
                self.batches.append(batch)

    def stop(self) -> None:
        self.server.stop(0)
        if self._channel is not None:
            self._channel.close()

    # ---- views over what was received ----
    def prefill(self) -> dict[str, tuple["object", int, float]]:
        """rid -> (pooled vector [d] float32, prompt_tokens, entropy_mean)."""
        out = {}
        with self._lock:
            batches = list(self.batches)
        for b in batches:
            if not b.prefill.rids or not b.prefill.HasField("vectors"):
                continue
            vecs = wire.decode(b.prefill.vectors)
            for i, rid in enumerate(b.prefill.rids):
                out[rid] = (vecs[i], b.prefill.prompt_tokens[i], b.prefill.entropy_mean[i])
        return out

    def prefill_last(self) -> dict[str, "object"]:
        """rid -> the last prompt token's state [d] float32 (PrefillBlock.last_vectors)."""
        out = {}
        with self._lock:
            batches = [b for b in self.batches if b.prefill.rids and b.prefill.HasField("last_vectors")]
        for b in batches:
            vecs = wire.decode(b.prefill.last_vectors)
            out.update({rid: vecs[i] for i, rid in enumerate(b.prefill.rids)})
        return out

    def decode(self) -> dict[str, list[tuple[int, "object"]]]:
        out: dict[str, list] = {}
        with self._lock:
            batches = list(self.batches)
        for b in batches:
            if not b.decode.rids:
                continue
            vecs = wire.decode(b.decode.vectors)
            for i, rid in enumerate(b.decode.rids):
                out.setdefault(rid, []).append((b.decode.steps[i], vecs[i]))
        return out

    def finished(self) -> dict[str, pb.Finished]:
        with self._lock:
            return {f.rid: f for b in self.batches for f in b.finished}

    def wait_for(self, pred, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(self):
                return True
            time.sleep(0.05)
        return pred(self)
