"""An SGLang 0.5.23 look-alike for router tests and scheduling benchmarks, without a model or GPU.

It speaks the HTTP API the router uses (`/generate`, `/v1/chat/completions`, `/v1/completions`
streamed and not, `/v1/loads`, `/health`, `/server_info`, `/abort_request`, `/v1/models`) and
simulates continuous batching: every step admits waiting requests while KV capacity
(`max_total_num_tokens`) and the prefill budget allow, then decodes one token for every running
request, taking `step_base_s + step_per_token_s * batch_tokens`. When decode outgrows the KV it
retracts the request with the fewest generated tokens (SGLang's order), which re-prefills later.

Output length per request: `custom_params.emulated_output_len` (the whole answer's length), minus
`custom_params.lenpred_prefix_tokens` (answer tokens already in the prompt: a continuation after the
router moved or capped the request), else `default_output_len`; capped by `max_tokens` /
`max_new_tokens`. Token k of the answer is the text ` t{k}`, so a continued answer is checkable.

Cost model (all emulated; docs/ROUTER.md "Emulator calibration"): one step takes
`step_base_s + step_per_token_s * batch_tokens + step_per_kv_token_s * kv_tokens_in_batch`,
times `time_scale` wall seconds per emulated second. Steps are paced to deadlines, so the
emulator's own Python time is absorbed (and counted as lag when it exceeds the step).
`--static-batching` emulates HF-style static batching (seed B's setting): a batch is formed only
when the engine is idle and runs until its longest member ends, finished members still padding it. Prompt length: token ids when given, else characters / 4.
Priority (`--enable-priority`): higher values first unless `--low-priority-values-first`.

Prefix cache (continuous batching, on by default like SGLang's radix cache): prompts are cut into
pages of `prefix_page_tokens` (token ids when given, else characters) and each page is keyed by a
hash chained over the pages before it, so a page matches only after the same whole prefix. A
request's prefill computes only what is not cached (at least one token, as SGLang recomputes the
last one for its logits); matched pages are locked while it runs and count against the KV. When a
request ends its prompt pages stay cached, evictable LRU, until KV pressure evicts them. This is
what makes probe-then-dispatch cheap: the probe's prefill is reused by the real request.

Predictions normally come from the real sidecar. Only with `--redis-url` does the emulator stand in
for it, writing lenpred.v1 records (docs/REDIS.md) from the true length: EGTP at prefill and PLP
every `--plp-every` tokens, plus the `finished` events. The error is per request:
`custom_params.emulated_prediction` (a total length chosen by the benchmark) when given, else
log-normal noise `--prediction-sigma` (0 = oracle) drawn from a seed and `custom_params.emulated_id`
(so the same trace item gets the same error under every policy). PLP's log error shrinks as
`sqrt(tau / (tau + t))` after t answer tokens (`--plp-decay-tokens` tau), as the remaining-length
predictor sharpens while decoding (seed A: MAE 95.2 -> 80.9 after 32 tokens).

    python -m lenpred.harness.emulator --port 30001 --max-total-num-tokens 16384
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone

import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lenpred.contract.keys import channel_for, pred_key
from lenpred.contract.prediction import Prediction
from lenpred.harness.redisproc import free_port

VERSION = "0.5.23"

# Step-cost presets (emulated). See docs/ROUTER.md, "Emulator calibration", for the sources.
COST_MODELS: dict[str, dict] = {
    # Real SGLang 0.5.23 on this 2-core CPU, SmolLM2-135M, OMP_NUM_THREADS=1
    # (../shared/notes/sglang-on-cpu.md): 1 request 6.2 tok/s -> 161 ms/step; 8 concurrent 42 tok/s
    # -> 190 ms/step. Solving a + b*1 = 0.161, a + b*8 = 0.190: a = 157 ms, b = 4.1 ms/token.
    "cpu-smollm2": {"step_base_s": 0.157, "step_per_token_s": 0.0041, "step_per_kv_token_s": 0.0,
                    "max_total_num_tokens": 20000, "max_running_requests": 64},
    # Roofline assumption for a 7B Llama (Vicuna-7B) in fp16 on one H100 SXM (3.35 TB/s, ~990 dense
    # TFLOPS): reading 13.5 GB of weights per step ~4 ms + launch/sampling overhead -> 6 ms base;
    # 2 x 6.7 GFLOP per token at ~50% MFU -> 25 us per batch token; attention reads 0.5 MB of KV per
    # context token (32 layers x 2 x 4096 x 2 B) -> 0.15 us per KV token. KV capacity: ~60 GB free
    # / 0.5 MB = 120k tokens. One request decodes at ~155 tok/s, in line with published H100 7B ITL.
    "gpu-h100-7b": {"step_base_s": 0.006, "step_per_token_s": 25e-6, "step_per_kv_token_s": 0.15e-6,
                    "max_total_num_tokens": 120000, "max_running_requests": 256},
}


@dataclass
class EmulatorConfig:
    model: str = "emulated-model"
    step_base_s: float = 0.004
    """Fixed cost of one engine step (seconds)."""
    step_per_token_s: float = 2e-5
    """Cost per token in the step's batch (prefill tokens + one per decoding request)."""
    max_total_num_tokens: int = 16384
    """KV capacity in tokens."""
    max_running_requests: int = 256
    chunked_prefill_size: int = 8192
    """Prefill tokens admitted per step (one larger request may still enter an empty step)."""
    default_output_len: int = 64
    enable_priority: bool = False
    low_priority_values_first: bool = False
    chars_per_token: int = 4
    redis_url: str = ""
    """Publish stand-in predictions to this Redis (off when empty)."""
    namespace: str = "default"
    prediction_sigma: float = 0.3
    """Log-normal noise of the stand-in predictions (0 = oracle)."""
    plp_every: int = 0
    """Also publish a remaining-length (PLP) update every N decoded tokens (0 = EGTP only)."""
    plp_decay_tokens: float = 64.0
    """PLP log-error scale: sqrt(tau / (tau + answer tokens so far)); 0 keeps the EGTP error."""
    seed: int = 0
    step_per_kv_token_s: float = 0.0
    """Cost per KV token held by the step's batch (attention reads; memory-bound decode)."""
    time_scale: float = 1.0
    """Wall seconds per emulated second (>1 slows the engine down, <1 compresses time)."""
    static_batching: bool = False
    """HF-style static batching: admit a batch only when idle; it runs until its longest member is
    done and finished members keep padding it (seed B's setting)."""
    static_batch_wait_s: float = 0.005
    """Static batching: wall seconds to wait for more arrivals before a batch is closed."""
    priority_preemption_threshold: int = 10
    """With priority: a waiting request this many priority levels above a running one retracts it
    when it cannot be admitted otherwise (SGLang's --priority-scheduling-preemption-threshold)."""
    prefix_cache: bool = True
    """Model SGLang's radix cache (continuous batching only): cached prompt pages skip prefill."""
    prefix_page_tokens: int = 16
    """Prefix-cache page size in tokens (matches are whole pages)."""
    step_per_prefill_token_s: float = 0.0
    """Cost per prefill token in a continuous-batching step; 0 = step_per_token_s. Calibrations
    from real engines fit it apart: a decode row and a prefill token cost very different amounts."""

    def __post_init__(self) -> None:
        if self.prefix_page_tokens < 1:
            raise ValueError(f"prefix_page_tokens must be >= 1 (got {self.prefix_page_tokens})")


@dataclass
class _Req:
    rid: str
    prompt_len: int
    out_len: int
    finish_reason: str            # "stop" or "length", once out_len is reached
    priority: int | None
    arrival: float
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)
    generated: int = 0
    kv: int = 0                   # tokens held in KV now (0 while waiting)
    retractions: int = 0
    done: bool = False
    noise: float = 1.0            # this request's prediction error factor (stand-in predictor)
    true_len: int = 0             # whole answer length (uncapped), for the stand-in predictor
    prefix: int = 0               # answer tokens already in the prompt (continuation)
    pred_total: float | None = None   # benchmark-chosen predicted whole-answer length
    emu_id: str = ""
    t_first: float = 0.0          # monotonic wall time of the first token
    t_done: float = 0.0
    kv_padding: int = 0
    group: str = ""               # static batching: micro-batch id and size sent by the router
    group_size: int = 0
    pages: list = field(default_factory=list)   # chained hashes of the prompt's full pages
    locked: list = field(default_factory=list)  # cached pages this request holds while admitted
    hit: int = 0                  # prompt tokens served from the prefix cache at admission


class Engine:
    """The simulated scheduler. All state lives on one event loop; no locks needed."""

    def __init__(self, cfg: EmulatorConfig):
        self.cfg = cfg
        self.waiting: list[_Req] = []
        self.running: list[_Req] = []
        self.used = 0
        self.live: dict[str, _Req] = {}
        self.received: deque[dict] = deque(maxlen=10_000)   # what arrived, for tests and benches
        self.finished: deque[dict] = deque(maxlen=10_000)
        self.retractions = 0
        self._gen_tokens: deque[tuple[float, int]] = deque(maxlen=256)
        self._wake = asyncio.Event()
        self.publisher = _Publisher(cfg) if cfg.redis_url else None
        self.static_batch: list[_Req] = []
        self.static_step = 0
        self.steps = 0
        self.lag_steps = 0            # steps whose Python work overran the emulated step time
        self.busy_s = 0.0             # emulated seconds spent stepping
        self.preemptions = 0          # priority preemptions (retractions for a higher priority)
        self._last_arrival = 0.0
        self.cache = PrefixCache(cfg.prefix_page_tokens)
        self.prompt_tokens = 0        # prefilled prompt tokens, and how many of them were cache hits
        self.hit_tokens = 0

    def submit(self, r: _Req) -> None:
        self._last_arrival = time.monotonic()
        self.live[r.rid] = r
        self.waiting.append(r)
        self._wake.set()

    def abort(self, rid: str) -> bool:
        """Abort a waiting or running request, including one admitted in the step being simulated."""
        r = self.live.get(rid)
        if r is None:
            return False
        for q in (self.waiting, self.running):
            if r in q:
                q.remove(r)
        self._finish(r, "abort")
        return True

    def _finish(self, r: _Req, reason: str) -> None:
        if self.publisher:
            self.publisher.finished(r, aborted=reason == "abort")
        self.live.pop(r.rid, None)
        r.done = True
        r.t_done = time.monotonic()
        if r in self.static_batch:
            r.kv_padding = r.kv       # static batching: its slot keeps padding until the batch ends
        else:
            self.used -= r.kv
        self._release_pages(r, keep=r.kv > 0)
        r.kv = 0
        self.finished.append({"rid": r.rid, "output_tokens": r.generated, "prompt_tokens": r.prompt_len,
                              "finish_reason": reason, "retractions": r.retractions,
                              "latency_s": (r.t_done - r.arrival) / self.cfg.time_scale})
        r.tokens.put_nowait(("done", reason))

    def _order(self) -> list[_Req]:
        if not self.cfg.enable_priority:
            return self.waiting
        sign = 1 if self.cfg.low_priority_values_first else -1
        return sorted(self.waiting, key=lambda r: (sign * (r.priority or 0), r.arrival))

    def _release_pages(self, r: _Req, keep: bool) -> None:
        """Unlock what `r` matched; with `keep`, its prompt pages stay cached (evictable)."""
        if not self.cfg.prefix_cache or self.cfg.static_batching:
            return
        self.cache.unlock(r.locked)
        r.locked = []
        if keep:
            self.cache.insert(r.pages)
        self.cache.evict(self.cfg.max_total_num_tokens - self.used)

    def _retract(self, victim: _Req) -> None:
        self.running.remove(victim)
        self.used -= victim.kv
        self._release_pages(victim, keep=True)
        victim.kv, victim.retractions = 0, victim.retractions + 1
        self.retractions += 1
        self.waiting.insert(0, victim)

    def _priority_preempt(self, r: _Req) -> bool:
        """SGLang priority preemption: retract the lowest-priority running request if `r` beats
        it by more than the threshold. Returns True if something was retracted."""
        if not self.cfg.enable_priority or not self.running:
            return False
        sign = -1 if self.cfg.low_priority_values_first else 1   # sign * priority: larger = more urgent
        victim = min(self.running, key=lambda x: (sign * (x.priority or 0), -x.arrival))
        if sign * ((r.priority or 0) - (victim.priority or 0)) <= self.cfg.priority_preemption_threshold:
            return False
        self._retract(victim)
        self.preemptions += 1
        return True

    def _admit_continuous(self) -> list[_Req]:
        cfg = self.cfg
        # Decode needs one more KV slot per running request: retract until it fits.
        while self.running and self.used + len(self.running) > cfg.max_total_num_tokens:
            self._retract(min(self.running, key=lambda r: (r.generated, -r.prompt_len)))
        budget, admitted = cfg.chunked_prefill_size, []
        caching = cfg.prefix_cache
        for r in list(self._order()):
            matched = self.cache.match(r.pages) if caching else []
            hit = min(len(matched) * self.cache.page, r.prompt_len - 1)
            need = r.prompt_len + r.generated - hit   # a retracted request recomputes its output too
            while True:
                full = len(self.running) + len(admitted) >= cfg.max_running_requests
                held = self.used + (self.cache.locked_tokens if caching else 0)
                no_kv = held + need + len(self.running) + len(admitted) + 1 > cfg.max_total_num_tokens
                if not (full or no_kv) or not self._priority_preempt(r):
                    break
            if full or no_kv or (need > budget and admitted):
                break
            self.waiting.remove(r)
            r.kv, r.hit, budget = need, hit, budget - need
            self.used += need
            if caching:
                self.cache.lock(matched)
                r.locked = matched
                self.cache.evict(cfg.max_total_num_tokens - self.used)
            if not r.retractions:
                self.prompt_tokens += r.prompt_len
                self.hit_tokens += hit
            admitted.append(r)
        return admitted

    def _admit_static(self) -> list[_Req]:
        cfg = self.cfg
        if self.running or not self.waiting:
            return []
        self.static_batch, self.static_step, admitted = [], 0, []
        order = self._order()
        group = order[0].group if order and order[0].group_size else None
        for r in list(order):
            if group is not None and r.group != group:
                continue
            need = r.prompt_len + r.generated + r.out_len   # static batching reserves the whole answer
            if len(admitted) >= cfg.max_running_requests or (
                    admitted and self.used + need > cfg.max_total_num_tokens):
                break
            self.waiting.remove(r)
            r.kv = r.prompt_len + r.generated
            self.used += r.kv
            admitted.append(r)
        self.static_batch = list(admitted)
        return admitted

    def _step_cost(self, admitted: list[_Req]) -> float:
        cfg = self.cfg
        if cfg.static_batching:
            # Every slot of the static batch is computed, finished or not (padding).
            width = len(self.static_batch)
            longest = max((r.prompt_len for r in self.static_batch), default=0) + self.static_step
            tokens = sum(r.kv for r in admitted) + (width if not admitted else 0)
            kv = width * longest
        else:
            prefill = sum(r.kv for r in admitted)
            kv = sum(r.kv + r.hit for r in self.running) + sum(r.kv + r.hit for r in admitted)
            per_prefill = cfg.step_per_prefill_token_s or cfg.step_per_token_s
            return (cfg.step_base_s + per_prefill * prefill + cfg.step_per_token_s * len(self.running)
                    + cfg.step_per_kv_token_s * kv)
        return cfg.step_base_s + cfg.step_per_token_s * tokens + cfg.step_per_kv_token_s * kv

    async def run(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            if not self.waiting and not self.running:
                if self.static_batch:
                    self._end_static_batch()
                self._wake.clear()
                await self._wake.wait()
                deadline = loop.time()
            if cfg.static_batching and not self.running:
                if self.static_batch:
                    self._end_static_batch()
                # Close a batch when the router's micro-batch is complete (it says its size), else
                # when arrivals pause.
                head = self._order()[0] if self.waiting else None
                waited = time.monotonic()
                while head is not None and head.group_size and time.monotonic() - waited < 2.0 and sum(
                        1 for r in self.waiting if r.group == head.group) < head.group_size:
                    await asyncio.sleep(0.001)
                while ((head is None or not head.group_size) and len(self.waiting) < cfg.max_running_requests
                       and time.monotonic() - self._last_arrival < cfg.static_batch_wait_s):
                    await asyncio.sleep(cfg.static_batch_wait_s / 2)
                deadline = max(deadline, loop.time())
            admitted = self._admit_static() if cfg.static_batching else self._admit_continuous()
            cost = self._step_cost(admitted)
            self.steps += 1
            self.busy_s += cost
            deadline += cost * cfg.time_scale
            now = loop.time()
            if deadline > now:
                await asyncio.sleep(deadline - now)
            else:
                self.lag_steps += 1
                deadline = now
                await asyncio.sleep(0)
            self.running += [r for r in admitted if not r.done]
            if cfg.static_batching and (self.running or admitted):
                self.static_step += 1
            t = time.monotonic()
            for r in list(self.running):
                r.generated += 1
                r.kv += 1
                self.used += 1
                if r.generated == 1:
                    r.t_first = t
                r.tokens.put_nowait(("token", f" t{r.prefix + r.generated}"))
                if self.publisher:
                    if r.generated == 1 and r.retractions == 0:   # prefill just finished
                        self.publisher.prediction(r, egtp=r.prefix == 0)
                    elif cfg.plp_every and r.generated % cfg.plp_every == 0:
                        self.publisher.prediction(r, egtp=False)
                if r.generated >= r.out_len:
                    self.running.remove(r)
                    self._finish(r, r.finish_reason)
            self._gen_tokens.append((t, len(self.running) + len(admitted)))

    def _end_static_batch(self) -> None:
        for r in self.static_batch:
            self.used -= getattr(r, "kv_padding", 0)
            r.kv_padding = 0
        self.static_batch = []

    def gen_throughput(self) -> float:
        if len(self._gen_tokens) < 2:
            return 0.0
        span = (self._gen_tokens[-1][0] - self._gen_tokens[0][0]) / self.cfg.time_scale
        return sum(n for _, n in list(self._gen_tokens)[1:]) / span if span > 0 else 0.0

    def load(self) -> dict:
        cfg = self.cfg
        return {
            "timestamp": time.time(), "dp_rank": 0,
            "num_running_reqs": len(self.running), "num_waiting_reqs": len(self.waiting),
            "num_waiting_uncached_tokens": sum(r.prompt_len for r in self.waiting),
            "num_used_tokens": self.used + self.cache.locked_tokens, "num_total_tokens": self.used + self.cache.tokens,
            "num_active_tokens": self.used + self.cache.locked_tokens,
            "num_prealloc_ready_tokens": 0,
            "max_total_num_tokens": cfg.max_total_num_tokens, "max_running_requests": cfg.max_running_requests,
            "token_usage": round((self.used + self.cache.locked_tokens) / cfg.max_total_num_tokens, 4),
            "gen_throughput": round(self.gen_throughput(), 2), "cache_hit_rate": round(self.hit_tokens / self.prompt_tokens, 4) if self.prompt_tokens else 0.0,
            "utilization": 1.0 if self.running else 0.0,
            "total_prefill_uncached_tokens": 0, "total_prefill_busy_us": 0, "decode_moments": None,
        }


class PrefixCache:
    """Pages of prompt KV keyed by chained hashes, LRU-evictable unless locked by a running request."""

    def __init__(self, page: int):
        self.page = max(int(page), 1)
        self.pages: OrderedDict[int, int] = OrderedDict()   # page hash -> lock count, LRU first
        self.locked_tokens = 0

    @property
    def tokens(self) -> int:
        return len(self.pages) * self.page

    def match(self, pages: list[int]) -> list[int]:
        n = 0
        while n < len(pages) and pages[n] in self.pages:
            n += 1
        return pages[:n]

    def lock(self, pages: list[int]) -> None:
        for h in pages:
            if self.pages[h] == 0:
                self.locked_tokens += self.page
            self.pages[h] += 1
            self.pages.move_to_end(h)

    def unlock(self, pages: list[int]) -> None:
        for h in pages:
            if h in self.pages:
                self.pages[h] -= 1
                if self.pages[h] == 0:
                    self.locked_tokens -= self.page

    def insert(self, pages: list[int]) -> None:
        for h in pages:
            if h in self.pages:
                self.pages.move_to_end(h)
            else:
                self.pages[h] = 0

    def evict(self, room: int) -> None:
        """Drop unlocked pages, least recently used first, until the cache fits in `room` tokens."""
        if self.tokens <= room:
            return
        for h in [h for h, locks in self.pages.items() if locks == 0]:
            if self.tokens <= room:
                break
            del self.pages[h]


def prompt_pages(cfg: EmulatorConfig, body: dict, api: str) -> list[int]:
    """Chained hashes of the prompt's full pages (token ids when given, else characters)."""
    if api == "chat":
        seq = json.dumps(body.get("messages") or [], sort_keys=True)
        step = cfg.prefix_page_tokens * cfg.chars_per_token
    else:
        seq = body.get("prompt") if api == "completions" else (body.get("input_ids") or body.get("text"))
        if isinstance(seq, list) and seq and isinstance(seq[0], int):
            seq, step = tuple(seq), cfg.prefix_page_tokens
        else:
            seq = (seq[0] if seq else "") if isinstance(seq, list) else (seq or "")
            step = cfg.prefix_page_tokens * cfg.chars_per_token
    out, h = [], 0
    for i in range(0, len(seq) - step + 1, step):
        h = hash((h, seq[i:i + step]))
        out.append(h)
    return out


class _Publisher:
    """Stand-in for the sidecar: writes prediction records and events, never blocking the engine.
    One writer task drains a queue into pipelines (as the sidecar batches its Redis writes)."""

    def __init__(self, cfg: EmulatorConfig):
        self.cfg = cfg
        self.client = aioredis.Redis.from_url(cfg.redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self.errors = 0
        self._queue: asyncio.Queue = asyncio.Queue()
        self._writer: asyncio.Task | None = None

    def _put(self, op: tuple) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._drain())
        self._queue.put_nowait(op)

    async def _drain(self) -> None:
        ns = self.cfg.namespace
        while True:
            ops = [await self._queue.get()]
            while not self._queue.empty() and len(ops) < 1000:
                ops.append(self._queue.get_nowait())
            try:
                async with self.client.pipeline(transaction=False) as p:
                    for kind, payload in ops:
                        if kind == "pred":
                            key = pred_key(self.cfg.namespace, payload.rid)
                            p.hset(key, mapping=payload.to_hash()).expire(key, 600)
                            p.publish(channel_for(ns, payload.rid), payload.to_json())
                        else:
                            rid, event = payload
                            p.publish(channel_for(ns, rid), event)
                    await p.execute()
            except Exception:  # soft state: a lost prediction only means the router falls back
                self.errors += len(ops)

    def log_error(self, r: _Req) -> float:
        """This request's log prediction error at EGTP: fixed by the benchmark's prediction, else
        drawn from (seed, emulated_id or rid) so every policy sees the same error for an item."""
        if r.pred_total is not None:
            return math.log(max(r.pred_total, 1.0) / max(r.true_len, 1))
        return random.Random(f"{self.cfg.seed}:{r.emu_id or r.rid}").gauss(0.0, self.cfg.prediction_sigma)

    def prediction(self, r: _Req, egtp: bool) -> None:
        """EGTP (from the prompt, step 0) and PLP (remaining after `step` decoded tokens of this
        rid). PLP's log error shrinks with the answer tokens seen so far (prefix + generated)."""
        step = 0 if egtp else r.generated
        done = r.prefix + step
        err = self.log_error(r)
        if done and self.cfg.plp_decay_tokens > 0:
            err *= math.sqrt(self.cfg.plp_decay_tokens / (self.cfg.plp_decay_tokens + done))
        r.noise = math.exp(err)
        remaining = max(r.true_len - done, 0) * r.noise
        sigma = self.cfg.prediction_sigma or 0.5
        spread = math.exp(1.2816 * sigma)
        rec = Prediction.after(r.rid, step, remaining, remaining * spread, remaining,
                               source="egtp" if egtp else "plp", head_version="emulator", ts=time.time(),
                               prompt_tokens=r.prompt_len)
        self._put(("pred", rec))

    def finished(self, r: _Req, aborted: bool) -> None:
        event = {"type": "finished", "rid": r.rid, "output_tokens": r.generated, "prompt_tokens": r.prompt_len,
                 "truncated": r.finish_reason == "length", "aborted": aborted}

        self._put(("event", (r.rid, json.dumps(event))))


def _prompt_len(cfg: EmulatorConfig, body: dict, api: str) -> int:
    if api == "chat":
        text = "".join(m["content"] if isinstance(m.get("content"), str)
                       else "".join(p.get("text", "") for p in m.get("content") or [])
                       for m in body.get("messages") or [])
        return max(len(text) // cfg.chars_per_token, 1)
    prompt = body.get("prompt") if api == "completions" else (body.get("input_ids") or body.get("text"))
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return len(prompt)
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    return max(len(prompt or "") // cfg.chars_per_token, 1)


def _custom(body: dict, api: str) -> dict:
    if api == "generate":
        return body.get("custom_params") or (body.get("sampling_params") or {}).get("custom_params") or {}
    return body.get("custom_params") or {}


def _limits(cfg: EmulatorConfig, body: dict, api: str) -> tuple[int, str]:
    if api == "generate":
        cap = (body.get("sampling_params") or {}).get("max_new_tokens", 128)
    else:
        cap = body.get("max_completion_tokens") or body.get("max_tokens") or (16 if api == "completions" else None)
    custom = _custom(body, api)
    want = int(custom.get("emulated_output_len", cfg.default_output_len)) - int(custom.get("lenpred_prefix_tokens", 0))
    if cap is not None and want > int(cap):   # an answer that ends exactly at the cap is complete: "stop"
        return max(int(cap), 1), "length"
    return max(want, 1), "stop"


def make_app(cfg: EmulatorConfig | None = None) -> FastAPI:
    cfg = cfg or EmulatorConfig()
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = Engine(cfg)
        app.state.engine = engine
        task = asyncio.create_task(engine.run())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    app = FastAPI(title="lenpred SGLang emulator", lifespan=lifespan)
    state["healthy"] = True

    async def serve(request: Request, api: str) -> Response:
        engine: Engine = request.app.state.engine
        body = await request.json()
        rid = body.get("rid") or uuid.uuid4().hex
        out_len, reason = _limits(cfg, body, api)
        custom = _custom(body, api)
        prefix = int(custom.get("lenpred_prefix_tokens", 0))
        pred = custom.get("emulated_prediction")
        r = _Req(rid=rid, prompt_len=_prompt_len(cfg, body, api), out_len=out_len, finish_reason=reason,
                 priority=body.get("priority"), arrival=time.monotonic(), prefix=prefix,
                 true_len=int(custom.get("emulated_output_len", cfg.default_output_len)),
                 pred_total=float(pred) if pred is not None else None, emu_id=str(custom.get("emulated_id", "")),
                 group=str(custom.get("lenpred_micro_batch", "")), group_size=int(custom.get("lenpred_micro_batch_size", 0)),
                 pages=prompt_pages(cfg, body, api) if cfg.prefix_cache and not cfg.static_batching else [])
        engine.received.append({"rid": rid, "api": api, "priority": r.priority, "prompt_tokens": r.prompt_len,
                                "out_len": out_len, "stream": bool(body.get("stream"))})
        engine.submit(r)
        created = int(time.time())
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_stream(engine, r, api, created, usage), media_type="text/event-stream")
        text = []
        while True:
            kind, value = await r.tokens.get()
            if kind == "done":
                break
            text.append(value)
        return JSONResponse(_final(r, api, "".join(text), value, created))

    def _timing(r: _Req) -> dict:
        """Emulator-only: engine-side times in emulated seconds (first token after arrival, and
        the decode span from the first to the last token)."""
        scale = cfg.time_scale
        first = (r.t_first - r.arrival) / scale if r.t_first else None
        decode = (r.t_done - r.t_first) / scale if r.t_first and r.t_done else None
        return {"ttft_s": first, "decode_s": decode, "retractions": r.retractions}

    def _final(r: _Req, api: str, text: str, reason: str, created: int) -> dict:
        usage = {"prompt_tokens": r.prompt_len, "completion_tokens": r.generated,
                 "total_tokens": r.prompt_len + r.generated, "prompt_tokens_details": {"cached_tokens": r.hit}}
        if api == "generate":
            return {"text": text, "output_ids": list(range(r.generated)),
                    "meta_info": {"id": r.rid, "finish_reason": {"type": reason, "length": r.generated},
                                  "prompt_tokens": r.prompt_len, "completion_tokens": r.generated,
                                  "cached_tokens": r.hit, "emulated_timing": _timing(r)}}
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                  if api == "chat" else {"index": 0, "text": text, "finish_reason": reason})
        return {"id": r.rid, "object": "chat.completion" if api == "chat" else "text_completion",
                "created": created, "model": cfg.model, "choices": [choice], "usage": usage,
                "emulated_timing": _timing(r)}

    async def _stream(engine: Engine, r: _Req, api: str, created: int, include_usage: bool):
        obj = "chat.completion.chunk" if api == "chat" else "text_completion"

        def chunk(delta: str | None, reason: str | None, role: bool = False) -> bytes:
            if api == "chat":
                d = {"role": "assistant", "content": ""} if role else {"content": delta}
                choice = {"index": 0, "delta": d, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": reason}
            return b"data: " + json.dumps({"id": r.rid, "object": obj, "created": created, "model": cfg.model,
                                           "choices": [choice]}).encode() + b"\n\n"

        text, n = "", 0
        try:
            if api == "chat":
                yield chunk(None, None, role=True)
            while True:
                kind, value = await r.tokens.get()
                if kind == "done":
                    break
                text += value
                n += 1
                if api == "generate":   # cumulative text and ids, as SGLang's /generate streams them
                    yield b"data: " + json.dumps({"text": text, "output_ids": list(range(n)), "meta_info": {
                        "id": r.rid, "finish_reason": None, "completion_tokens": n}}).encode() + b"\n\n"
                else:
                    yield chunk(value, None)
            if api == "generate":
                yield b"data: " + json.dumps(_final(r, api, text, value, created)).encode() + b"\n\n"
            else:
                yield chunk("", value)
                if include_usage:
                    yield b"data: " + json.dumps({"id": r.rid, "object": obj, "created": created, "model": cfg.model,
                                                  "choices": [], "usage": {
                                                      "prompt_tokens": r.prompt_len, "completion_tokens": r.generated,
                                                      "total_tokens": r.prompt_len + r.generated}}).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            engine.abort(r.rid)  # no-op when finished; frees the KV when the client went away

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        return await serve(request, "generate")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await serve(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(request, "completions")

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        body = await request.json()
        engine: Engine = request.app.state.engine
        if body.get("abort_all"):
            for r in list(engine.waiting) + list(engine.running):
                engine.abort(r.rid)
        else:
            engine.abort(body.get("rid", ""))
        return Response(status_code=200)

    @app.get("/health")
    @app.get("/health_generate")
    async def health() -> Response:
        return Response(status_code=200 if state["healthy"] else 503)

    @app.get("/v1/loads")
    async def loads(request: Request) -> Response:
        if not state["healthy"]:   # as an engine whose scheduler does not answer (the router's poll)
            return Response(status_code=503)
        return JSONResponse({"timestamp": datetime.now(timezone.utc).isoformat(), "version": VERSION,
                             "accelerator": None, "num_accelerators": 1, "loads": [request.app.state.engine.load()]})

    @app.get("/server_info")
    async def server_info(request: Request) -> dict:
        engine: Engine = request.app.state.engine
        return {"model_path": cfg.model, "served_model_name": cfg.model, "version": VERSION,
                "max_total_num_tokens": cfg.max_total_num_tokens,
                "enable_priority_scheduling": cfg.enable_priority,
                "schedule_low_priority_values_first": cfg.low_priority_values_first,
                "internal_states": [{"last_gen_throughput": engine.gen_throughput()}]}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": cfg.model, "object": "model", "owned_by": "sglang",
                                            "root": cfg.model, "max_model_len": cfg.max_total_num_tokens}]}

    # Emulator-only: what arrived and finished, and a switch for health-check tests.
    @app.get("/emulator/requests")
    async def received(request: Request) -> dict:
        engine: Engine = request.app.state.engine
        return {"received": list(engine.received), "finished": list(engine.finished),
                "retractions": engine.retractions, "priority_preemptions": engine.preemptions,
                "steps": engine.steps, "lag_steps": engine.lag_steps, "busy_s": engine.busy_s,
                "prompt_tokens": engine.prompt_tokens, "cached_prompt_tokens": engine.hit_tokens}

    @app.post("/emulator/health")
    async def set_health(request: Request) -> dict:
        state["healthy"] = bool((await request.json()).get("healthy", True))
        return {"healthy": state["healthy"]}

    return app


@dataclass
class ServerThread:
    """A uvicorn server on its own thread and event loop (tests, demos, benches)."""

    server: uvicorn.Server
    thread: threading.Thread
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve_in_thread(app: FastAPI, port: int | None = None, timeout: float = 10.0) -> ServerThread:
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"server on port {port} did not start")
        time.sleep(0.01)
    return ServerThread(server, thread, port)


def start_in_thread(port: int | None = None, **cfg) -> ServerThread:
    """Start an emulator; `cfg` are EmulatorConfig fields."""
    return serve_in_thread(make_app(EmulatorConfig(**cfg)), port)


async def serve_many(ports: list[int], cfg: EmulatorConfig, host: str = "127.0.0.1",
                     log_level: str = "warning") -> None:
    """Several replicas in one process and one event loop (cheap on a small machine: no GIL
    hand-offs between replica threads). Replica i gets seed cfg.seed + i for its own draws."""
    import dataclasses

    servers = [uvicorn.Server(uvicorn.Config(make_app(dataclasses.replace(cfg, seed=cfg.seed)), host=host,
                                             port=port, log_level=log_level, lifespan="on",
                                             timeout_graceful_shutdown=1)) for port in ports]
    await asyncio.gather(*(s.serve() for s in servers))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lenpred emulator", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--ports", default="", help="comma-separated ports: serve one replica on each, in one process")
    p.add_argument("--cost-model", choices=sorted(COST_MODELS), default=None,
                   help="step-cost preset (overrides the step and capacity flags)")
    p.add_argument("--log-level", default="warning")
    for f in fields(EmulatorConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":   # --flag / --no-flag, so defaults of True can be turned off
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), default=f.default)
    args = p.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(EmulatorConfig)}
    if args.cost_model:
        values.update(COST_MODELS[args.cost_model])
    try:
        cfg = EmulatorConfig(**values)
    except ValueError as e:
        p.error(str(e))
    if args.ports:
        import uvloop

        uvloop.install()
        asyncio.run(serve_many([int(x) for x in args.ports.split(",")], cfg, args.host, args.log_level))
        return 0
    uvicorn.run(make_app(cfg), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
