"""ExampleRecorder: the narrow interface between any ingest path and online learning.

An ingest loop calls, per message, with the rows it accepted:

    rec.on_prefill(key, rids, feats, prompt_tokens, max_new_tokens)
    rec.on_served(key, rids, served)            (optional: what was published for them)
    rec.on_decode(key, rids, steps, vecs)
    rec.on_finish(key, rid, output_tokens, truncated, aborted, max_new_tokens)

where key = (model_id, hidden_size, layer), feats = {"last": [n, d], "pooled": [n, d]} (either may
be missing), and served = [(mean, p90, head version)] just published for these rids. Each call only
appends a tuple to a bounded queue (drop and count when full): nothing is copied, converted or
written on the ingest path, and the ack never waits for learning. One background thread joins the
rows per request id (bounded in-flight table), turns finished requests into `Example`s, writes a
segment per `segment_requests` examples or `flush_s` seconds, evicts old segments, and keeps the
live error of the served predictions (MAE and p90 coverage over the last `live_window` finished,
untruncated-or-not, requests: served length min(L, cap) against the served mean / p90).
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lenpred.sidecar.learn.config import LearnConfig
from lenpred.sidecar.learn.split import split_group
from lenpred.sidecar.learn.store import Example, ModelStore
from lenpred.train.data import target_step

log = logging.getLogger("lenpred.sidecar.learn")

ModelKey = tuple[str, int, int]


@dataclass
class _Inflight:
    key: ModelKey
    last: np.ndarray
    pooled: np.ndarray | None
    prompt_tokens: int
    cap: int
    served: tuple | None          # (mean, p90, version) published at prefill
    dec: dict = field(default_factory=dict)       # actual step -> state
    filled: set = field(default_factory=set)      # kept target steps already stored


@dataclass
class Live:
    """Sliding window of (abs error, covered) of the served prefill prediction, per model."""
    errs: collections.deque
    cov: collections.deque

    def mae(self) -> float:
        return float(np.mean(self.errs)) if self.errs else float("nan")

    def coverage(self) -> float:
        return float(np.mean(self.cov)) if self.cov else float("nan")


class ExampleRecorder:
    def __init__(self, cfg: LearnConfig, metrics=None):
        self.cfg = cfg
        self.m = metrics
        self.q: queue.Queue = queue.Queue(maxsize=cfg.queue)
        self.inflight: collections.OrderedDict[str, _Inflight] = collections.OrderedDict()
        self.pending: dict[ModelKey, list[Example]] = {}
        self.stores: dict[ModelKey, ModelStore] = {}
        self.live: dict[ModelKey, Live] = {}
        # finished before their prediction's on_served arrived (the ingest path processes messages
        # concurrently, so a finished row can overtake its own prediction): rid -> (key, length, cap)
        self.unserved: collections.OrderedDict[str, tuple] = collections.OrderedDict()
        self.dropped = collections.Counter()
        self._enabled: dict[ModelKey, tuple[bool, float]] = {}
        self._keep = sorted(set(cfg.keep_steps))
        self._last_flush = time.monotonic()
        self._stop = threading.Event()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name="lenpred-learn-recorder", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ the hook (ingest path)
    def wants(self, key: ModelKey) -> bool:
        """Whether rows of this model are recorded (kill switch; cached for poll_s)."""
        hit = self._enabled.get(key)
        now = time.monotonic()
        if hit is None or now - hit[1] > self.cfg.poll_s:
            hit = (self.store(key).enabled(), now)
            self._enabled[key] = hit
        return hit[0]

    def _put(self, item) -> None:
        try:
            self.q.put_nowait(item)
        except queue.Full:
            self.dropped["queue_full"] += 1
            if self.m:
                self.m.dropped.labels("queue_full").inc()

    def on_prefill(self, key: ModelKey, rids, feats: dict, prompt_tokens, max_new_tokens=None) -> None:
        if self.wants(key):
            self._put(("p", key, list(rids), feats, list(prompt_tokens), list(max_new_tokens or [])))

    def on_served(self, key: ModelKey, rids, served) -> None:
        if self.wants(key):
            self._put(("s", key, list(rids), list(served)))

    def on_decode(self, key: ModelKey, rids, steps, vecs: torch.Tensor) -> None:
        if self.wants(key):
            self._put(("d", key, list(rids), list(steps), vecs))

    def on_finish(self, key: ModelKey, rid: str, output_tokens: int, truncated: bool, aborted: bool,
                  max_new_tokens: int = 0) -> None:
        if self.wants(key):
            self._put(("f", key, rid, int(output_tokens), bool(truncated), bool(aborted), int(max_new_tokens)))

    # ------------------------------------------------------------------ background thread
    def store(self, key: ModelKey) -> ModelStore:
        st = self.stores.get(key)
        if st is None:
            st = self.stores[key] = ModelStore(self.cfg.dir, *key).ensure()
        return st

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    item = self.q.get(timeout=0.2)
                except queue.Empty:
                    item = None
                if item is not None:
                    getattr(self, "_" + {"p": "prefill", "s": "served", "d": "decode", "f": "finish"}[item[0]])(*item[1:])
                if time.monotonic() - self._last_flush > self.cfg.flush_s:
                    self.flush()
            self.flush()
        except Exception as e:  # a dead recorder must say so: /health, metrics, log
            self.error = f"{type(e).__name__}: {e}"
            log.exception("learning recorder died; recording stopped (ingest unaffected)")
            if self.m:
                self.m.recorder_up.set(0)

    def _served(self, key, rids, served) -> None:
        for rid, sv in zip(rids, served):
            fl = self.inflight.get(rid)
            if fl is not None:
                fl.served = sv
            elif rid in self.unserved:
                self._score(*self.unserved.pop(rid), sv)

    def _score(self, key, length: int, cap: int, served) -> None:
        lv = self.live.setdefault(key, Live(collections.deque(maxlen=self.cfg.live_window),
                                            collections.deque(maxlen=self.cfg.live_window)))
        mean, p90, _ver = served
        lv.errs.append(abs(min(mean, cap) - length))
        lv.cov.append(float(length <= min(p90, cap) + 1e-6))

    def _prefill(self, key, rids, feats, pts, caps) -> None:
        last = feats.get("last")
        if last is None:
            self.dropped["no_last_vector"] += len(rids)
            return
        last = last.to(torch.float16).numpy()
        pooled = feats["pooled"].to(torch.float16).numpy() if "pooled" in feats else None
        for i, rid in enumerate(rids):
            self.inflight[rid] = _Inflight(key, last[i], None if pooled is None else pooled[i],
                                           int(pts[i]) if pts else 0, int(caps[i]) if caps else 0, None)
            self.inflight.move_to_end(rid)
        while len(self.inflight) > self.cfg.max_inflight:
            self.inflight.popitem(last=False)
            self.dropped["inflight_evicted"] += 1

    def _decode(self, key, rids, steps, vecs) -> None:
        """Keep, per request, the first state at or after each kept step (the tap samples every
        k-th engine step, so states need not sit on the kept steps), under its actual step."""
        want = []
        for i, s in enumerate(steps):
            fl = self.inflight.get(rids[i])
            t = target_step(int(s), self._keep)
            if fl is not None and t is not None and t not in fl.filled:
                fl.filled.add(t)
                want.append(i)
        if not want:
            return
        x = vecs[want].to(torch.float16).numpy()
        for j, i in enumerate(want):
            self.inflight[rids[i]].dec[int(steps[i])] = x[j]

    def _finish(self, key, rid, out_tokens, truncated, aborted, cap) -> None:
        fl = self.inflight.pop(rid, None)
        if fl is None:
            self.dropped["finished_without_prefill"] += 1
            return
        if aborted:
            self.dropped["aborted"] += 1
            return
        cap = cap or fl.cap or (out_tokens if truncated else max(self.cfg.default_cap, out_tokens))
        length = min(out_tokens, cap)
        steps = sorted(s for s in fl.dec if s < out_tokens)
        ex = Example(rid=rid, group=split_group(fl.prompt_tokens, fl.last, self.cfg.simhash_bits),
                     prompt_tokens=fl.prompt_tokens, last=fl.last, pooled=fl.pooled, length=length,
                     capped=bool(truncated), cap=cap, finish_ts=time.time(), dec_steps=steps,
                     dec_vecs=[fl.dec[s] for s in steps])
        self.pending.setdefault(key, []).append(ex)
        if fl.served is not None:
            self._score(key, length, cap, fl.served)
        else:
            self.unserved[rid] = (key, length, cap)
            while len(self.unserved) > 10_000:
                self.unserved.popitem(last=False)
        if self.m:
            self.m.samples.labels(key[0]).inc()
        if len(self.pending[key]) >= self.cfg.segment_requests:
            self._write(key)

    def _write(self, key) -> None:
        exs = self.pending.pop(key, [])
        if not exs:
            return
        st = self.store(key)
        st.write_segment(exs)
        st.evict(self.cfg.max_requests)

    def flush(self) -> None:
        for key in list(self.pending):
            self._write(key)
        self._last_flush = time.monotonic()

    def close(self, timeout: float = 10.0) -> None:
        """Stop after draining what is queued (a restart resumes from the segments on disk)."""
        deadline = time.monotonic() + timeout
        while not self.q.empty() and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.05)
        self._stop.set()
        self.thread.join(timeout)
