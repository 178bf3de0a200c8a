"""Bounded, non-blocking gRPC sender for the tap.

The engine's step loop calls `submit()`, which never blocks and never raises: the batch goes into a
bounded queue, or is dropped and counted when the queue is full (sidecar slow, down, restarting). A
daemon thread owns one bidirectional Ingest stream and reconnects with capped exponential backoff.

Wire: LENPRED_TAP_WIRE (or `wire=`) = v2 | v1 | auto. auto speaks lenpred.v2 (columnar, see
tap/encoder.py and docs/WIRE.md) and falls back to lenpred.v1 when the sidecar answers
UNIMPLEMENTED (an older sidecar); after a later failure (a restart, maybe an upgrade) it tries v2
again. The batches taken by a stream that was refused as UNIMPLEMENTED are sent again, not lost.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import grpc

from lenpred.contract.grpctls import ClientTLS, open_channel
from lenpred.proto.v1 import lenpred_pb2 as pb
from lenpred.proto.v1 import lenpred_pb2_grpc as pb_grpc
from lenpred.proto.v2 import lenpred_pb2 as pb2
from lenpred.tap.encoder import V2Encoder, wire_mode

log = logging.getLogger("lenpred.tap")

_STOP = object()


def rows_of(batch: pb.IngestBatch) -> int:
    return len(batch.prefill.rids) + len(batch.decode.rids) + len(batch.finished)


@dataclass
class SenderStats:
    submitted: int = 0
    sent: int = 0
    dropped: int = 0          # rows dropped because the queue was full
    lost: int = 0             # rows in flight when a stream broke
    rejected: int = 0         # rows the sidecar refused (see last_error)
    reconnects: int = 0
    connected: bool = False
    last_error: str = ""
    wire: str = ""            # the version the current/last stream speaks: "v1" or "v2"


class TapSender:
    def __init__(self, target: str, *, engine_id: str = "", max_queue: int = 1024,
                 backoff_initial_s: float = 0.2, backoff_max_s: float = 5.0,
                 max_message_bytes: int = 64 << 20, tls: ClientTLS | None = None, wire: str | None = None):
        self.target = target
        self.tls = tls  # None / off = plaintext
        self.engine_id = engine_id
        self.stats = SenderStats()
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._max_msg = max_message_bytes
        self.wire = wire_mode(wire)
        self._fallback_v1 = False
        self._stop = threading.Event()
        self._seq = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="lenpred-tap-sender", daemon=True)
        self._thread.start()

    # ---- engine side: never blocks, never raises ----
    def submit(self, batch: pb.IngestBatch) -> bool:
        n = rows_of(batch)
        with self._lock:
            self.stats.submitted += n
            self._seq += 1
            batch.seq = self._seq
        if not batch.engine_id:
            batch.engine_id = self.engine_id
        try:
            self._q.put_nowait(batch)
            return True
        except queue.Full:
            with self._lock:
                self.stats.dropped += n
            return False

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        try:
            self._q.put_nowait(_STOP)
        except queue.Full:
            pass
        self._thread.join(timeout)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the queue drains (tests, shutdown). True if drained."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._q.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    # ---- background thread ----
    def _requests(self, inflight: dict, dead: threading.Event, encode=None):
        # gRPC pulls this generator from its own thread and may pull once more after the call
        # broke: an item taken by a dead stream goes back to the queue instead of vanishing.
        while not self._stop.is_set() and not dead.is_set():
            try:
                item = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            self._q.task_done()
            if item is _STOP:
                return
            if dead.is_set():
                self._requeue(item)
                return
            inflight[item.seq] = item
            yield encode(item) if encode is not None else item

    def _requeue(self, item) -> None:
        """Put a batch taken by a dead stream back at the FRONT of the queue: it is older than
        everything queued, and a decode row must not overtake its own prefill."""
        with self._q.mutex:
            if 0 < self._q.maxsize <= len(self._q.queue):
                with self._lock:
                    self.stats.dropped += rows_of(item)
                return
            self._q.queue.appendleft(item)
            self._q.unfinished_tasks += 1
            self._q.not_empty.notify()

    def _run(self) -> None:
        delay = self._backoff[0]
        opts = [("grpc.max_send_message_length", self._max_msg),
                ("grpc.keepalive_time_ms", 30000)]
        while not self._stop.is_set():
            inflight: dict[int, pb.IngestBatch] = {}
            dead = threading.Event()
            channel = None
            v2 = self.wire == "v2" or (self.wire == "auto" and not self._fallback_v1)
            unimplemented = False
            try:
                channel = open_channel(self.target, self.tls, opts)  # re-reads cert files: renewals apply
                grpc.channel_ready_future(channel).result(timeout=delay * 5)
                self.stats.connected = True
                self.stats.wire = "v2" if v2 else "v1"
                delay = self._backoff[0]
                if v2:
                    call = channel.stream_stream("/lenpred.v2.LengthPredictor/Ingest",
                                                 request_serializer=pb2.Batch.SerializeToString,
                                                 response_deserializer=pb2.Ack.FromString)
                    acks = call(self._requests(inflight, dead, V2Encoder().encode))
                else:
                    acks = pb_grpc.LengthPredictorStub(channel).Ingest(self._requests(inflight, dead))
                for ack in acks:
                    inflight.pop(ack.seq, None)
                    with self._lock:
                        self.stats.sent += ack.accepted
                        self.stats.rejected += ack.rejected
                        if ack.code:
                            self.stats.last_error = ack.message
                if self._stop.is_set():
                    break
            except Exception as e:  # any failure: count, back off, reconnect
                self.stats.last_error = f"{type(e).__name__}: {e}"[:500]
                log.debug("tap sender: %s", self.stats.last_error)
                code = e.code() if isinstance(e, grpc.RpcError) and hasattr(e, "code") else None
                if v2 and self.wire == "auto" and code == grpc.StatusCode.UNIMPLEMENTED:
                    log.info("tap sender: the sidecar does not speak lenpred.v2; falling back to lenpred.v1")
                    self._fallback_v1 = unimplemented = True
                elif self.wire == "auto":
                    self._fallback_v1 = False  # the sidecar may have been upgraded: try v2 again
            finally:
                dead.set()
                self.stats.connected = False
                if unimplemented:  # nothing was processed: send these again over v1, in order
                    for seq in sorted(inflight, reverse=True):
                        self._requeue(inflight[seq])
                else:
                    with self._lock:
                        self.stats.lost += sum(rows_of(b) for b in inflight.values())
                if channel is not None:
                    channel.close()
            if self._stop.is_set():
                break
            if unimplemented:
                continue  # reconnect at once, over v1
            self.stats.reconnects += 1
            self._stop.wait(delay)
            delay = min(delay * 2, self._backoff[1])
