"""Bounded, non-blocking gRPC sender for the tap.

The engine's step loop calls `submit()`, which never blocks and never raises: the batch goes into a
bounded queue, or is dropped and counted when the queue is full (sidecar slow, down, restarting). A
daemon thread owns one bidirectional Ingest stream and reconnects with capped exponential backoff.
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


class TapSender:
    def __init__(self, target: str, *, engine_id: str = "", max_queue: int = 1024,
                 backoff_initial_s: float = 0.2, backoff_max_s: float = 5.0,
                 max_message_bytes: int = 64 << 20, tls: ClientTLS | None = None):
        self.target = target
        self.tls = tls  # None / off = plaintext
        self.engine_id = engine_id
        self.stats = SenderStats()
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._max_msg = max_message_bytes
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
    def _requests(self, inflight: dict[int, int], dead: threading.Event):
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
            inflight[item.seq] = rows_of(item)
            yield item

    def _requeue(self, item) -> None:
        try:
            self._q.put_nowait(item)
        except queue.Full:
            with self._lock:
                self.stats.dropped += rows_of(item)

    def _run(self) -> None:
        delay = self._backoff[0]
        opts = [("grpc.max_send_message_length", self._max_msg),
                ("grpc.keepalive_time_ms", 30000)]
        while not self._stop.is_set():
            inflight: dict[int, int] = {}
            dead = threading.Event()
            channel = None
            try:
                channel = open_channel(self.target, self.tls, opts)  # re-reads cert files: renewals apply
                grpc.channel_ready_future(channel).result(timeout=delay * 5)
                stub = pb_grpc.LengthPredictorStub(channel)
                self.stats.connected = True
                delay = self._backoff[0]
                for ack in stub.Ingest(self._requests(inflight, dead)):
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
            finally:
                dead.set()
                self.stats.connected = False
                with self._lock:
                    self.stats.lost += sum(inflight.values())
                if channel is not None:
                    channel.close()
            if self._stop.is_set():
                break
            self.stats.reconnects += 1
            self._stop.wait(delay)
            delay = min(delay * 2, self._backoff[1])
