"""BENCHMARK HARNESS: an injecting "sidecar" — predictions with a measured error, for length-trace
replays on real engines.

Real SGLang engines replaying a length trace (`lengthctl`) run dummy weights, whose hidden states
carry no length signal. This gRPC server takes the real sidecar's place on the tap's lenpred.v1
Ingest stream and publishes, for every prefill and decode row the tap ships, a prediction made from
the request's TRUE length and an error drawn from the served heads' measured errors, written to
Redis exactly as the sidecar writes them (`lenpred.sidecar.store.PredictionStore`). The router
cannot tell the difference; every number produced with it is labelled "injected".

Where the truth comes from. The tap ships each prefill row's prompt length and `max_new_tokens`.
With `ignore_eos` + `max_new_tokens = L` the latter IS the length, but that leaks L to the router
and to SGLang's admission (see `lengthctl`). So the benchmark registers its workload here and gives
each item its own generic cap, `base + i` (the benchmark clips SGLang's own KV estimate at `base`,
so every cap weighs the same there, and the router learns nothing from it; caps must stay below
what SGLang would clamp them to, context or KV pool minus the prompt): the cap on a prefill row
names the item, hence its length L. A continuation (the router moved the request, rid `<rid>-m<k>`, or capped
and resumed it, `<rid>-c<k>`) is resolved through its base rid; its prompt holds the answer so far,
so its true remaining length is L minus (its prompt length - the item's). A probe (`<rid>-probe`)
carries a 1-token cap, so it is matched by prompt length, among the registered items of that
length not yet probed, in workload order (the order the router probes in); when the real request
arrives its cap says whether the match was right (`probe_mismatch`), and a probe is predicted like
its request, as the real heads would predict the same prompt. A row matching no item falls back to
`max_new_tokens` as the length (the `ignore_eos` mode).

Error model (`ErrorModel`), from committed measurements of the served SmolLM2 heads:
- prefill (the served last-token head): log(p50 / true) is drawn, per workload item and seed, from
  the head's held-out residuals (`sidecar/heads/smollm2-135m-instruct/residuals.json`, 1,126
  replies of held-out prompts that ended before the cap: median +0.19, sd 0.70). The same item gets
  the same error under every policy. p90 = p50 x exp(-q10) and mean = p50 x E[exp(-r)] over the
  same residuals, so p90 covers 90% of true lengths by construction.
- decode (PLP, every row the tap ships): the remaining-length error in tokens is the prefill
  error times m(t), the shipped PLP's MAE over the static prediction's MAE after t decoded tokens
  (docs/RESULTS.md, mixed test split: 110/122/121/118/111/107 vs 122.6/128.7/128.0/126.4/121.6/116.4
  at t = 0/8/16/32/64/128; interpolated, held beyond 128). That ratio was measured against EGTP
  carried forward; applying it to the (better) last-token head's error assumes PLP improves on it
  as much — an optimistic assumption, stated wherever these numbers are used.
- `oracle`: the true length, no error (the ceiling rows).
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import importlib.resources
import json
import logging
import math
import random
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from lenpred.contract import keys
from lenpred.contract.prediction import Prediction
from lenpred.proto.v1 import lenpred_pb2 as pb
from lenpred.sidecar.store import PredictionStore

log = logging.getLogger("lenpred.harness.inject")

RESIDUALS = Path(str(importlib.resources.files("lenpred.sidecar") / "heads" / "smollm2-135m-instruct" / "residuals.json"))
# (tokens decoded, shipped PLP MAE / static MAE) on the mixed test split, docs/RESULTS.md.
PLP_RATIO = ((0, 110 / 122.6), (8, 122 / 128.7), (16, 121 / 128.0), (32, 118 / 126.4), (64, 111 / 121.6),
             (128, 107 / 116.4))
HEAD_VERSION = "injected"
_SUFFIX = re.compile(r"-(probe|m\d+|c\d+)$")


def base_rid(rid: str) -> str:
    """The router's request id behind a probe or continuation rid (`<rid>-probe`, `-m1`, `-c2`)."""
    while True:
        m = _SUFFIX.search(rid)
        if not m:
            return rid
        rid = rid[: m.start()]


def plp_ratio(t: int) -> float:
    """m(t): PLP's error relative to the static prediction after t decoded tokens."""
    steps = [s for s, _ in PLP_RATIO]
    if t >= steps[-1]:
        return PLP_RATIO[-1][1]
    i = bisect.bisect_right(steps, t)
    (t0, r0), (t1, r1) = PLP_RATIO[i - 1], PLP_RATIO[i]
    return r0 + (r1 - r0) * (t - t0) / (t1 - t0)


@dataclass(frozen=True)
class ErrorModel:
    """log(p50/true) residuals of the served head (empty = oracle), and how p90/mean follow."""

    log_ratio: tuple[float, ...] = ()
    seed: int = 0
    source: str = "oracle"

    @classmethod
    def load(cls, spec: str, seed: int = 0) -> "ErrorModel":
        """`oracle`, `residuals` (the shipped head's file) or `residuals:FILE`."""
        kind, _, arg = spec.partition(":")
        if kind == "oracle":
            return cls(seed=seed)
        if kind != "residuals":
            raise ValueError(f"error model must be oracle, residuals or residuals:FILE, got {spec!r}")
        path = Path(arg) if arg else RESIDUALS
        data = json.loads(path.read_text())
        res = data.get("log_ratio") if isinstance(data, dict) else data
        if not res or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in res):
            raise ValueError(f"{path}: expected a non-empty list of finite log ratios")
        return cls(tuple(float(x) for x in res), seed, f"residuals:{path}")

    @property
    def oracle(self) -> bool:
        return not self.log_ratio

    def draw(self, item: str) -> float:
        """This item's log error (the same under every policy for a given seed)."""
        return 0.0 if self.oracle else random.Random(f"{self.seed}:{item}").choice(self.log_ratio)

    @property
    def p90_factor(self) -> float:
        if self.oracle:
            return 1.0
        r = sorted(self.log_ratio)
        return math.exp(-r[int(0.1 * len(r))])

    @property
    def mean_factor(self) -> float:
        return 1.0 if self.oracle else statistics.fmean(math.exp(-x) for x in self.log_ratio)

    def describe(self) -> dict:
        if self.oracle:
            return {"source": "oracle"}
        return {"source": self.source, "n": len(self.log_ratio), "median_log_ratio": statistics.median(self.log_ratio),
                "sd_log_ratio": statistics.pstdev(self.log_ratio), "p90_factor": self.p90_factor,
                "mean_factor": self.mean_factor, "seed": self.seed,
                "plp_ratio": {str(t): round(r, 3) for t, r in PLP_RATIO}}


@dataclass
class Item:
    id: str
    index: int            # position in the workload
    prompt_tokens: int
    output_tokens: int
    cap: int = 0          # the max_new_tokens its requests carry: names the item (0: none)


@dataclass
class _Attempt:
    item: Item | None
    true_left: int        # answer tokens this attempt's request will produce (whole answer for a probe)
    p50: float            # prefill prediction of those tokens
    err: float            # log error drawn for the item


@dataclass
class InjectStats:
    prefill: int = 0
    decode: int = 0
    finished: int = 0
    by_cap: int = 0             # item named by the request's cap
    by_base_rid: int = 0        # continuations, through the rid they continue
    by_prompt: int = 0          # probes, by prompt length
    by_max_new_tokens: int = 0  # no item: the tap's max_new_tokens taken as the length (ignore_eos mode)
    probe_mismatch: int = 0     # a probe matched to another item of the same prompt length
    unknown_decode: int = 0     # decode rows of a rid whose prefill was not seen
    length_mismatch: int = 0    # finished rows whose output differs from the expected length
    batches: int = 0
    errors: list = field(default_factory=list)


class Injector:
    """The prediction logic, independent of gRPC (so it is testable row by row)."""

    def __init__(self, model: ErrorModel):
        self.model = model
        self.by_cap: dict[int, Item] = {}
        self.unprobed: dict[int, list[Item]] = {}   # prompt length -> items not yet probed, in order
        self.attempts: dict[str, _Attempt] = {}
        self.items_of: dict[str, Item] = {}          # base rid -> item
        self.stats = InjectStats()
        self.recent: collections.deque = collections.deque(maxlen=64)   # last prefill resolutions (diagnosis)

    def register(self, items: list[Item]) -> None:
        """The workload being replayed (replaces the previous one)."""
        self.by_cap = {it.cap: it for it in items if it.cap > 0}
        if len(self.by_cap) != sum(1 for it in items if it.cap > 0):
            raise ValueError("workload items must have distinct caps (the cap names the item)")
        self.unprobed = {}
        for it in sorted(items, key=lambda x: x.index):
            self.unprobed.setdefault(it.prompt_tokens, []).append(it)
        self.attempts.clear()
        self.items_of.clear()

    def _item(self, rid: str, prompt_tokens: int, max_new_tokens: int) -> Item | None:
        base = base_rid(rid)
        if base != rid and not rid.endswith("-probe") and base in self.items_of:
            self.stats.by_base_rid += 1
            return self.items_of[base]
        if rid.endswith("-probe"):
            pending = self.unprobed.get(prompt_tokens)
            if not pending:
                return None
            self.stats.by_prompt += 1
            self.items_of[base] = pending.pop(0)
            return self.items_of[base]
        item = self.by_cap.get(max_new_tokens)
        if item is None:
            return None
        if base in self.items_of and self.items_of[base] is not item:
            self.stats.probe_mismatch += 1
        self.stats.by_cap += 1
        self.items_of[base] = item
        return item

    def prefill(self, rid: str, prompt_tokens: int, max_new_tokens: int) -> Prediction | None:
        item = self._item(rid, prompt_tokens, max_new_tokens)
        self.recent.append((rid, prompt_tokens, max_new_tokens, item.index if item else None))
        if item is not None:
            done = max(prompt_tokens - item.prompt_tokens, 0)   # answer tokens already in the prompt
            true_left = max(item.output_tokens - done, 1)
        elif 0 < max_new_tokens < min(self.by_cap, default=1 << 62):
            true_left = max_new_tokens
            self.stats.by_max_new_tokens += 1
        else:
            return None
        err = self.model.draw(item.id if item else f"{prompt_tokens}:{max_new_tokens}")
        att = _Attempt(item, true_left, true_left * math.exp(err), err)
        self.attempts[rid] = att
        self.stats.prefill += 1
        return self._record(rid, att.p50, 0, prompt_tokens, "last")

    def decode(self, rid: str, step: int) -> Prediction | None:
        att = self.attempts.get(rid)
        if att is None:
            self.stats.unknown_decode += 1
            return None
        self.stats.decode += 1
        left = att.true_left - step
        remaining = max(left + plp_ratio(step) * (att.p50 - att.true_left), 1.0)
        return self._record(rid, remaining, step, att.item.prompt_tokens if att.item else 0, "plp")

    def finished(self, f: pb.Finished) -> dict:
        att = self.attempts.pop(f.rid, None)
        if att is not None and not f.aborted and not f.truncated and "-probe" not in f.rid \
                and f.output_tokens != att.true_left:
            self.stats.length_mismatch += 1
        self.stats.finished += 1
        return {"rid": f.rid, "output_tokens": f.output_tokens, "prompt_tokens": f.prompt_tokens,
                "truncated": int(f.truncated), "aborted": int(f.aborted),
                "p50": round(att.p50, 2) if att else -1,
                "p90": round(att.p50 * self.model.p90_factor, 2) if att else -1}

    def _record(self, rid: str, remaining: float, step: int, prompt_tokens: int, source: str) -> Prediction:
        m = self.model
        return Prediction(
            rid=rid, p50=step + remaining, p90=step + remaining * m.p90_factor, mean=step + remaining * m.mean_factor,
            remaining_p50=remaining, remaining_p90=remaining * m.p90_factor, step=step, source=source,
            head_version=HEAD_VERSION, ts=time.time(), prompt_tokens=prompt_tokens)

    def batch(self, b: pb.IngestBatch) -> tuple[list[Prediction], list[dict]]:
        self.stats.batches += 1
        caps = list(b.prefill.max_new_tokens)
        recs = []
        for i, rid in enumerate(b.prefill.rids):
            rec = self.prefill(rid, int(b.prefill.prompt_tokens[i]) if i < len(b.prefill.prompt_tokens) else 0,
                               int(caps[i]) if i < len(caps) else 0)
            if rec is not None:
                recs.append(rec)
        for i, rid in enumerate(b.decode.rids):
            rec = self.decode(rid, int(b.decode.steps[i]))
            if rec is not None:
                recs.append(rec)
        return recs, [self.finished(f) for f in b.finished]


class InjectingSidecar:
    """The Injector behind a real lenpred.v1 gRPC server (Ingest only), on its own thread and event
    loop, writing to Redis through the sidecar's own store. `set(model=..., items=...)` switches the
    error model and the registered workload between runs without dropping the tap's stream."""

    def __init__(self, redis_url: str, namespace: str = keys.DEFAULT_NAMESPACE, model: ErrorModel | None = None,
                 host: str = "127.0.0.1", port: int = 0):
        self.injector = Injector(model or ErrorModel())
        self.redis_url, self.namespace = redis_url, namespace
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(host, port), name="inject", daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self.port == 0:
            raise RuntimeError(f"injecting sidecar did not start on {host}:{port}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, host: str, port: int) -> None:
        asyncio.set_event_loop(self._loop)
        self.port = 0
        self._loop.run_until_complete(self._start(host, port))
        self._ready.set()
        self._loop.run_forever()

    async def _start(self, host: str, port: int) -> None:
        self.store = PredictionStore(self.redis_url, self.namespace)
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        handler = grpc.stream_stream_rpc_method_handler(
            self._ingest, request_deserializer=pb.IngestBatch.FromString,
            response_serializer=pb.IngestAck.SerializeToString)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "lenpred.v1.LengthPredictor", {"Ingest": handler}),))
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        await self.server.start()

    async def _ingest(self, request_iterator, context):
        async for b in request_iterator:
            n = len(b.prefill.rids) + len(b.decode.rids) + len(b.finished)
            try:
                recs, fins = self.injector.batch(b)
                await self.store.write_now(recs, fins)  # readable when the ack goes out
                yield pb.IngestAck(seq=b.seq, accepted=n)
            except Exception as e:  # noqa: BLE001 — a bad row must not end the tap's stream
                self.injector.stats.errors.append(repr(e))
                log.exception("inject: batch %d failed", b.seq)
                yield pb.IngestAck(seq=b.seq, rejected=n, code=grpc.StatusCode.INTERNAL.value[0], message=repr(e))

    def call(self, fn, timeout: float = 10.0):
        """Run `fn()` on the server's loop (state changes between runs happen between batches)."""
        async def wrap():
            return fn()
        return asyncio.run_coroutine_threadsafe(wrap(), self._loop).result(timeout)

    def set(self, model: ErrorModel | None = None, items: list[Item] | None = None) -> None:
        def apply():
            if model is not None:
                self.injector.model = model
            if items is not None:
                self.injector.register(items)
        self.call(apply)

    def stats(self) -> dict:
        return self.call(lambda: dict(vars(self.injector.stats), redis_errors=self.store.errors,
                                      recent_prefill=list(self.injector.recent)))

    def stop(self) -> None:
        async def shutdown():
            await self.server.stop(0.5)
            await self.store.close()
        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
