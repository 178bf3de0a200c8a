"""Drive the router with a workload and measure, per request, what a client and the engine saw.

Requests are non-streamed `/generate` calls (SGLang streams resend every output id so far, which
would make the client, not the engines, the bottleneck). SGLang started with `--enable-metrics`
puts its own timing in every answer: `first_token_latency` and `e2e_latency`, both from when its
HTTP server received the request. So per request:
  decode span = e2e_latency - first_token_latency      (engine: first to last token)
  TPOT        = decode span / (tokens - 1)
  TTFT        = client end-to-end - decode span         (router queue + HTTP + engine queue + prefill)
A request the router moved or continued (`lenpred_parts` > 1) carries the last part's timing, so
its TTFT includes the earlier parts; such rows are flagged `parts`. Against the engine emulator
(the crosscheck's twin, time scale 1) the decode span is its `emulated_timing.decode_s`.

While a run lasts, every replica's `/v1/loads?include=core` is sampled (running and waiting
requests, KV tokens in use, and SGLang's cumulative decode step-time moments and prefill busy
time): the raw material of the emulator calibration (`lenpred bench crosscheck --real`).
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx

from lenpred.harness.inject import Item


@dataclass
class Result:
    index: int                   # workload item
    sent: float                  # seconds from the run's start
    done: float | None = None
    status: int = 0
    tokens: int = 0
    expected: int = 0
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None
    parts: int = 1
    finish: str = ""
    replica: str = ""
    measured: bool = True
    error: str = ""

    def row(self) -> list:
        return [getattr(self, k) for k in ROW]


ROW = [f for f in Result.__dataclass_fields__]


def fill(r: Result, payload: dict, client_e2e: float) -> None:
    meta = payload.get("meta_info") or {}
    r.tokens = int(meta.get("completion_tokens") or 0)
    fr = meta.get("finish_reason")
    r.finish = fr.get("type", "") if isinstance(fr, dict) else str(fr or "")
    r.parts = int(meta.get("lenpred_parts", 1))
    r.e2e = client_e2e
    first, end = meta.get("first_token_latency"), meta.get("e2e_latency")
    emulated = (meta.get("emulated_timing") or {}).get("decode_s")   # the emulator twin (time scale 1)
    span = max(float(end) - float(first), 0.0) if first is not None and end is not None else emulated
    if span is not None:
        r.ttft = max(client_e2e - span, 0.0)
        r.tpot = span / (r.tokens - 1) if r.tokens > 1 else None


class LoadPoller:
    """Samples every replica's /v1/loads while a run lasts."""

    FIELDS = ("num_running_reqs", "num_waiting_reqs", "num_used_tokens", "gen_throughput", "decode_moments",
              "total_prefill_busy_us", "total_prefill_uncached_tokens", "max_total_num_tokens")

    def __init__(self, urls: list[str], interval: float = 0.5):
        self.urls, self.interval = urls, interval
        self.samples: list[dict] = []
        self._task: asyncio.Task | None = None

    async def _run(self, t0: float) -> None:
        async with httpx.AsyncClient(timeout=2.0) as c:
            while True:
                for i, u in enumerate(self.urls):
                    try:
                        load = (await c.get(u + "/v1/loads?include=core")).json()["loads"][0]
                        self.samples.append({"t": time.monotonic() - t0, "replica": i,
                                             **{k: load.get(k) for k in self.FIELDS}})
                    except (httpx.HTTPError, ValueError, KeyError, IndexError):
                        pass
                await asyncio.sleep(self.interval)

    def start(self, t0: float) -> None:
        self._task = asyncio.create_task(self._run(t0))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def _send(c: httpx.AsyncClient, r: Result, body: dict, t0: float) -> None:
    try:
        resp = await c.post("/generate", json=body)
        r.done = time.monotonic() - t0
        r.status, r.replica = resp.status_code, resp.headers.get("x-lenpred-replica", "")
        if resp.status_code == 200:
            fill(r, resp.json(), r.done - r.sent)
        else:
            r.error = resp.text[:200]
    except httpx.HTTPError as e:
        r.error = f"{type(e).__name__}: {e}"[:200]


async def online(router: str, engines: list[str], arrivals: list[tuple[float, Item]], make_body, *,
                 warmup_s: float, drain_s: float, poll_s: float = 0.5) -> tuple[list[Result], list[dict], float]:
    """Poisson arrivals through the router; requests arriving before `warmup_s` load the system but
    are not measured. After the last arrival, wait for the measured requests up to `drain_s`; the
    ones still running are cut off (status 0) and the caller aborts them on the engines."""
    results = [Result(index=it.index, sent=off, expected=it.output_tokens, measured=off >= warmup_s)
               for off, it in arrivals]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=1024)
    poller = LoadPoller(engines, poll_s)
    async with httpx.AsyncClient(base_url=router, timeout=httpx.Timeout(None), limits=limits) as c:
        t0 = time.monotonic()
        poller.start(t0)
        tasks = []
        for r, (off, it) in zip(results, arrivals):
            await asyncio.sleep(max(t0 + off - time.monotonic(), 0.0))
            r.sent = time.monotonic() - t0
            tasks.append(asyncio.create_task(_send(c, r, make_body(it), t0)))
        measured = [t for t, r in zip(tasks, results) if r.measured]
        if measured:
            await asyncio.wait(measured, timeout=drain_s)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await poller.stop()
        wall = time.monotonic() - t0
    for r in results:
        if r.done is None and not r.error:
            r.error = "cut off"
    return results, poller.samples, wall


async def batch_messages(c: httpx.AsyncClient, bodies: list[dict]):
    """POST the bodies as one `/v1/lenpred/batch` (api generate) and yield its NDJSON messages: one
    per request (`index`, `status`, `response`) in completion order, then the `summary`."""
    async with c.stream("POST", "/v1/lenpred/batch", json={"api": "generate", "requests": bodies}) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.strip():
                yield json.loads(line)


async def batch(router: str, engines: list[str], items: list[Item], make_body, *, timeout_s: float,
                poll_s: float = 0.5) -> tuple[list[Result], dict, list[dict], float]:
    """All requests in one `POST /v1/lenpred/batch` (the router plans the set); NDJSON answers."""
    results = [Result(index=it.index, sent=0.0, expected=it.output_tokens) for it in items]
    summary: dict = {}
    poller = LoadPoller(engines, poll_s)
    async with httpx.AsyncClient(base_url=router, timeout=httpx.Timeout(timeout_s)) as c:
        t0 = time.monotonic()
        poller.start(t0)
        try:
            async for msg in batch_messages(c, [make_body(it) for it in items]):
                if "summary" in msg:
                    summary = msg["summary"]
                    continue
                r = results[msg["index"]]
                r.done, r.status = time.monotonic() - t0, msg["status"]
                if msg["status"] == 200:
                    fill(r, msg["response"], r.done)
                else:
                    r.error = str(msg.get("error", ""))[:200]
        except httpx.HTTPError as e:
            summary["error"] = f"{type(e).__name__}: {e}"[:300]
        await poller.stop()
        wall = time.monotonic() - t0
    return results, summary, poller.samples, wall
