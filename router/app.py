"""The router HTTP app: OpenAI-compatible front door over N SGLang replicas.

Per request: assign the rid the tap will see, estimate the output length (fallback at arrival;
EGTP/PLP predictions arrive over Redis once the engine has prefilled it), queue, admit, place,
forward with `rid` (and `priority`) in the body, relay the answer, release the accounting.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lenpred.contract.keys import PredictionRecord
from lenpred.router.config import DEFAULT_PROFILE, Policy, PolicyWatcher, Profile, RouterConfig
from lenpred.router.continuation import Part, continuation, merge, part_of
from lenpred.router.ids import new_rid
from lenpred.router.interfaces import Estimate, Move, Preemptor, RequestView
from lenpred.router.metrics import RouterMetrics
from lenpred.router.parsing import max_tokens_of, prompt_of, usage_of
from lenpred.router.predictions import HistoryFallback, PredictionStore, estimate_from_record
from lenpred.router.queue import Dropped, Placement, Scheduler, place
from lenpred.router.state import ReplicaPool
from lenpred.router.upstream import CONNECT_ERRORS, ERRORS, Upstream, UpstreamResponse

log = logging.getLogger(__name__)

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "generate": "/generate"}
RECENT_REQUESTS = 10_000


@dataclass
class Tracked:
    """What the debug endpoint reports about one request."""

    req: RequestView
    profile: str
    stream: bool
    state: str = "queued"            # queued | running | finished | failed | dropped
    engine_priority: int | None = None
    queued_s: float | None = None
    status: int | None = None
    drop_reason: str | None = None
    estimate_at_dispatch: Estimate | None = None   # formatted only when someone asks (describe)
    attempt_rid: str = ""            # rid of the attempt running now (the rid, or rid-mK after K moves)
    move_to: str | None = None       # a move decided and not yet carried out
    move_reason: str = ""
    moves: int = 0
    aliases: list = field(default_factory=list)
    probe: dict | None = None        # probe-then-dispatch: {rid, replica, outcome, wait_ms, estimate}

    def probe_header(self) -> str:
        p = self.probe
        return f"replica={p['replica']};outcome={p['outcome']};wait_ms={p['wait_ms']:.1f}" if p else ""


class Router:
    """Runtime state of one router process; `make_app` wires it into FastAPI."""

    def __init__(self, config: RouterConfig):
        self.config = config
        self.metrics = RouterMetrics()
        self.watcher = PolicyWatcher(config.policy_path, config.handle)
        self.fallback = HistoryFallback(self.policy.spec.predictions.fallback)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=2.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        self.upstream = Upstream()   # the request path (aiohttp)
        self.pool = ReplicaPool(config.backends, self.client, lambda: self.policy.spec.replicas,
                                on_change=self._on_pool_change)
        self.scheduler = Scheduler(self.pool, lambda: self.policy, config.handle.clock,
                                   on_dispatch=self._on_dispatch, on_drop=self._on_drop,
                                   on_pass=self.metrics.schedule.observe)
        self.predictions = PredictionStore(config.redis_url, config.namespace, lambda: self.policy.spec.predictions,
                                           self._on_prediction, self._on_finished_event)
        self.tracked: OrderedDict[str, Tracked] = OrderedDict()
        self.batch_rids: dict[str, RequestView] = {}     # batch attempts in flight, by engine rid
        self.aliases: dict[str, tuple[Tracked, int]] = {}  # moved attempts: rid-mK -> (request, tokens before)
        self.probe_waiters: dict[str, tuple[dict, asyncio.Event]] = {}  # probe rid -> (records, wake-up)
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._preempt_handle: asyncio.TimerHandle | None = None

    @property
    def policy(self) -> Policy:
        return self.watcher.policy

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        await self.upstream.start()
        await self.pool.poll_once()
        await self.predictions.start()
        self._tasks = [asyncio.create_task(c, name=n) for n, c in (
            ("lenpred-router-poll", self.pool.run()), ("lenpred-router-queue", self.scheduler.run()),
            ("lenpred-router-reload", self._watch_policy()))]

    async def stop(self) -> None:
        if self._preempt_handle is not None:
            self._preempt_handle.cancel()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.predictions.stop()
        await self.upstream.close()
        await self.client.aclose()

    async def _watch_policy(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_interval_s)
            result = self.watcher.check()
            if result is None:
                continue
            self.metrics.reloads.labels("ok" if result else "invalid").inc()
            if result:
                self.fallback.settings = self.policy.spec.predictions.fallback
                self.scheduler.dispatch()

    # -- events ------------------------------------------------------------------------------
    def _on_pool_change(self) -> None:
        for r in self.pool.replicas.values():
            self.metrics.replica_healthy.labels(r.name).set(1 if r.healthy else 0)
            self.metrics.replica_kv_used.labels(r.name).set(r.load.num_used_tokens)
            self.metrics.replica_inflight.labels(r.name).set(len(r.inflight))
            self.metrics.replica_predicted.labels(r.name).set(r.predicted_remaining(0.5))
        self.metrics.redis_connected.set(1 if self.predictions.connected else 0)
        self.scheduler.dispatch()
        self._preempt_soon()

    def _on_prediction(self, rec: PredictionRecord) -> None:
        waiter = self.probe_waiters.get(rec.rid)
        if waiter is not None:
            if self.predictions.fresh(rec):
                waiter[0][rec.rid] = rec
                waiter[1].set()
            return
        breq = self.batch_rids.get(rec.rid)
        if breq is not None and self.predictions.fresh(rec):
            # a batch attempt: the record counts this attempt's tokens; the view counts all parts
            est = estimate_from_record(rec, breq.max_tokens)
            done_before = breq.generated
            breq.estimate = type(est)(p50=done_before + est.p50, p90=done_before + est.p90,
                                      remaining_p50=est.remaining_p50, remaining_p90=est.remaining_p90,
                                      step=done_before + rec.step, source=est.source, ts=est.ts)
            self.metrics.predictions.inc()
            return
        alias = self.aliases.get(rec.rid)
        t, before = alias if alias is not None else (self.tracked.get(rec.rid), 0)
        if t is None or t.state not in ("queued", "running") or not self.predictions.fresh(rec):
            return
        if alias is None and t.moves:
            return  # a late record of an attempt that was moved away
        self.metrics.predictions.inc()
        est = estimate_from_record(rec, None if t.req.max_tokens is None else max(t.req.max_tokens - before, 1))
        if before:  # a continuation: the record counts this attempt's tokens, the view counts all parts
            est = Estimate(p50=before + est.p50, p90=before + est.p90, remaining_p50=est.remaining_p50,
                           remaining_p90=est.remaining_p90, step=before + est.step, source=est.source, ts=est.ts)
        t.req.estimate = est
        self.scheduler.dispatch()
        self._preempt_soon()

    # -- preemption (moves) -----------------------------------------------------------------
    def _preempt_soon(self) -> None:
        """Ask the profiles' preemptors for moves, coalesced to one pass per `interval_s`."""
        if self._preempt_handle is not None:
            return
        intervals = [p.preemptor.interval_s for p in self.policy.profiles.values() if p.preemptor is not None]
        if intervals:
            self._preempt_handle = asyncio.get_running_loop().call_later(min(intervals), self._preempt)

    def _preempt(self) -> None:
        self._preempt_handle = None
        healthy = self.pool.healthy()
        if len(healthy) < 2:
            return
        now = self.config.handle.clock()
        for name, profile in self.policy.profiles.items():
            if profile.preemptor is None:
                continue
            for move in profile.preemptor.select(healthy, now):
                t = self.tracked.get(move.rid)
                if t is not None and self.policy.profiles.get(t.profile) is profile:
                    self._execute_move(t, move, profile.preemptor, now)

    def _execute_move(self, t: Tracked, move: Move, preemptor: Preemptor, now: float) -> bool:
        """Re-account `t` on the target at once, abort it where it runs; the request's own handler
        (relay or reader) sees the abort and continues it on the target from what was generated."""
        req = t.req
        target = self.pool.replicas.get(move.to)
        if (t.state != "running" or req.pinned or t.move_to is not None or target is None or not target.healthy
                or move.to == req.replica or req.replica is None):
            return False
        source = req.replica
        self.pool.remove(req)
        self.pool.add(req, move.to)
        req.pinned = True
        t.move_to, t.move_reason = move.to, move.reason
        preemptor.on_move(req, source, move.to, now)
        self.metrics.preemptions.inc()
        log.info("moving %s from %s to %s (%s)", req.rid, source, move.to, move.reason)
        self._spawn(self._abort(source, t.attempt_rid))
        return True

    async def _abort(self, replica: str, rid: str) -> None:
        with contextlib.suppress(httpx.HTTPError):
            await self.client.post(f"{replica}/abort_request", json={"rid": rid}, timeout=2.0)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _next_attempt(self, t: Tracked, body: dict, api: str, parts: list[Part]) -> dict:
        """The body that continues `t` on its new replica after `parts` (what the client got)."""
        done = sum(p.tokens for p in parts)
        t.moves += 1
        t.move_to = None
        rid = f"{t.req.rid}-m{t.moves}"
        out = continuation(body, api, parts) if parts else dict(body)
        out["rid"] = rid
        t.attempt_rid = rid
        t.aliases.append(rid)
        self.aliases[rid] = (t, done)
        t.req.generated = max(t.req.generated, done)
        return out

    def _drop_aliases(self, t: Tracked) -> None:
        for rid in t.aliases:
            self.aliases.pop(rid, None)

    def _on_finished_event(self, event: dict) -> None:
        # Requests this router served are learned from their responses; the events add the rest
        # (other router replicas, other clients of the same engines).
        if event.get("rid") not in self.tracked and not event.get("aborted"):
            self.fallback.observe(int(event.get("prompt_tokens", 0)), int(event["output_tokens"]))

    def _on_dispatch(self, req: RequestView, placement: Placement) -> None:
        self.metrics.dispatched(req.estimate.source, placement.queued_s)

    def _on_drop(self, req: RequestView, d: Dropped) -> None:
        self.metrics.dropped.labels(d.reason).inc()

    def _track(self, t: Tracked) -> None:
        self.tracked[t.req.rid] = t
        while len(self.tracked) > RECENT_REQUESTS:
            self.tracked.popitem(last=False)

    # -- request path ------------------------------------------------------------------------
    async def handle(self, request: Request, api: str) -> Response:
        started = time.monotonic()
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as e:
            return _error(400, f"invalid JSON body: {e}", "invalid_request_error")
        profile_name = request.headers.get("x-lenpred-profile", DEFAULT_PROFILE)
        if profile_name not in self.policy.profiles:
            return _error(400, f"unknown profile {profile_name!r}; known: {sorted(self.policy.profiles)}",
                          "invalid_request_error")
        text, prompt_tokens = prompt_of(body, api)
        max_tokens = max_tokens_of(body, api)
        rid = new_rid()
        req = RequestView(rid=rid, api=api, prompt_tokens=prompt_tokens, prompt_text=text, max_tokens=max_tokens,
                          arrival=self.config.handle.clock(), estimate=self.fallback.estimate(prompt_tokens, max_tokens),
                          client_priority=body.get("priority") if isinstance(body.get("priority"), int) else None)
        tracked = Tracked(req, profile_name, stream=bool(body.get("stream")))
        self._track(tracked)
        headers = {"x-lenpred-rid": rid}
        profile = self.policy.profiles[profile_name]
        if profile.probe.enabled and self.predictions.enabled:
            try:
                await self._probe(tracked, profile, api, body)
            except BaseException:   # the client went away while the probe was out
                tracked.state = "failed"
                raise
            headers["x-lenpred-probe"] = tracked.probe_header()

        try:
            placement = await self.scheduler.submit(req, profile_name,
                                                    prefer=tracked.probe["replica"] if tracked.probe else None)
        except Dropped as d:
            tracked.state, tracked.status, tracked.drop_reason = "dropped", d.status, d.reason
            self.metrics.answered(api, d.status)
            return _error(d.status, str(d), "overloaded", {**headers, "x-lenpred-drop-reason": d.reason})
        finally:
            self.metrics.queue_depth.set(self.scheduler.depth())
        tracked.state, tracked.queued_s = "running", placement.queued_s
        tracked.engine_priority, tracked.estimate_at_dispatch = placement.priority, req.estimate
        body["rid"] = rid
        tracked.attempt_rid = rid
        if placement.priority is not None:
            body["priority"] = placement.priority
        movable = placement.profile.preemptor is not None
        # Movable from the start (a non-streamed answer's headers come only at its end). A move
        # decided before the engine has it is harmless: the abort is a no-op there, the stream is cut
        # before its first token, a non-streamed answer simply completes (counted as too late); the
        # preemptor's cooldown makes this rare.
        req.pinned = not movable
        try:
            resp = await self._send(req, placement, api, body)
        except ERRORS as e:
            tracked.state, tracked.status = "failed", 502
            self.scheduler.release(req, placement.profile)
            self.metrics.answered(api, 502)
            return _error(502, f"no replica answered: {e}", "upstream_error", headers)
        except BaseException:  # cancelled (client gone) while connecting
            tracked.state = "failed"
            self.scheduler.release(req, placement.profile)
            raise
        headers["x-lenpred-replica"] = req.replica or ""
        req.pinned = not movable or resp.status_code != 200
        if tracked.stream and resp.status_code == 200:
            cell = {"resp": resp}

            async def close() -> None:
                if tracked.state != "finished":
                    tracked.state = "failed"  # client went away or upstream broke: closing aborts it in SGLang
                try:
                    await cell["resp"].aclose()
                finally:
                    req.pinned = True
                    self._drop_aliases(tracked)
                    self.scheduler.release(req, placement.profile)
                    self._finish(tracked, 200, started)

            relay = self._relay_movable(cell, tracked, api, body, placement) if movable else self._relay(resp, tracked)
            return _RelayResponse(relay, close, status_code=200, headers=headers,
                                  media_type=resp.headers.get("content-type", "text/event-stream"))
        try:
            if movable:
                resp, content = await self._read_movable(resp, tracked, api, body, placement)
            else:
                content = await resp.aread()
        except ERRORS as e:
            tracked.state, tracked.status = "failed", 502
            self.metrics.answered(api, 502)
            return _error(502, f"the replica failed: {e}", "upstream_error", headers)
        finally:
            await resp.aclose()
            req.pinned = True
            self._drop_aliases(tracked)
            self.scheduler.release(req, placement.profile)
        self._finish(tracked, resp.status_code, started)
        if resp.status_code == 200:
            with contextlib.suppress(ValueError):
                out = usage_of(json.loads(content), api)
                if isinstance(out, int):
                    req.generated = out
                    self.fallback.observe(req.prompt_tokens, out)
            headers["x-lenpred-prediction"] = await self._prediction_header(req)
        return Response(content, status_code=resp.status_code, headers=headers,
                        media_type=resp.headers.get("content-type", "application/json"))

    async def _probe(self, tracked: Tracked, profile: Profile, api: str, body: dict) -> None:
        """Probe-then-dispatch: prefill a copy of the prompt (max tokens 1, rid `<rid>-probe`) on
        the replica the profile's scorers pick now, wait (at most `probe.timeout_ms`) for the EGTP
        the tap publishes at prefill, and make it the request's estimate before it is queued; the
        real request is then sent to the same replica (`Scheduler.submit(prefer=...)`) to reuse the
        probe's KV through the prefix cache. A timeout or a failed probe keeps the fallback."""
        from lenpred.router.batch import probe_body, wait_for_predictions

        req = tracked.req
        healthy = self.pool.healthy()
        if not healthy:
            return
        replica = place(profile, req, healthy)
        pbody = probe_body(body, api, req.rid)
        # The probe is one token of work: give it the engine priority of a one-token request, so
        # it prefills ahead of the engine's waiting queue and its prediction arrives in time.
        prio = profile.orderer.engine_priority(
            replace(req, estimate=Estimate(p50=1, p90=1, remaining_p50=1, remaining_p90=1, source="probe")),
            self.config.handle.clock())
        if prio is not None:
            pbody["priority"] = prio
        info = tracked.probe = {"rid": pbody["rid"], "replica": replica, "outcome": "timeout", "wait_ms": 0.0,
                                "estimate": None}
        started = time.monotonic()
        sent = asyncio.create_task(asyncio.wait_for(self.upstream.post_read(f"{replica}{PATHS[api]}", pbody),
                                                    timeout=max(profile.probe.timeout_ms / 1000, 5.0)))
        self._background.add(sent)
        sent.add_done_callback(self._background.discard)
        sent.add_done_callback(lambda t: t.cancelled() or t.exception())   # a failed probe is no error

        def failed() -> bool:
            return sent.done() and (sent.cancelled() or sent.exception() is not None or sent.result()[0] != 200)

        got = await wait_for_predictions(self, [pbody["rid"]], profile.probe.timeout_ms / 1000, poll_s=0.01,
                                         give_up=failed)
        info["wait_ms"] = (time.monotonic() - started) * 1000
        rec = got.get(pbody["rid"])
        if rec is not None:
            req.estimate = estimate_from_record(rec, req.max_tokens)
            info["outcome"], info["estimate"] = "prediction", req.estimate.header()
        elif failed():
            info["outcome"] = "failed"
        self.metrics.probes.labels(info["outcome"]).inc()

    async def _send(self, req: RequestView, placement: Placement, api: str, body: dict) -> UpstreamResponse:
        """Send to the placed replica; on a refused connection, mark it and re-place elsewhere
        (safe: nothing was generated there). Other errors are the client's to see."""
        tried: set[str] = set()
        while True:
            replica = req.replica
            try:
                return await self.upstream.post(f"{replica}{PATHS[api]}", body)
            except CONNECT_ERRORS as e:
                tried.add(replica)
                self.pool.mark_fail(self.pool.replicas[replica], f"{type(e).__name__}: {e}")
                if self.scheduler.redispatch(req, placement.profile, exclude=tried) is None:
                    raise
                self.metrics.retries.inc()

    async def _read_movable(self, resp: UpstreamResponse, tracked: Tracked, api: str, body: dict,
                            placement: Placement) -> tuple[UpstreamResponse, bytes]:
        """Non-streamed answer of a request that may be moved: when a move was decided, the source's
        answer is the partial output (SGLang returns it with finish reason `abort`); continue from it
        on the target and merge the parts into one answer. Nothing reached the client yet, so an
        error from the source only means continuing from the parts gathered so far."""
        req = tracked.req
        parts: list[Part] = []
        while True:
            try:
                content = await resp.aread()
            except ERRORS:
                if tracked.move_to is None:
                    raise
                content = b""
            await resp.aclose()
            if tracked.move_to is None:
                break
            part = None
            if resp.status_code == 200:
                with contextlib.suppress(ValueError):
                    part = part_of(json.loads(content), api)
            if part is not None and part.finish != "abort":   # it ended before the abort landed
                tracked.move_to = None
                self.metrics.moves_late.inc()
                break
            if part is not None and part.tokens:
                parts.append(part)
            nxt = self._next_attempt(tracked, body, api, parts)
            resp = await self._send(req, placement, api, nxt)
            req.pinned = resp.status_code != 200
        if parts and resp.status_code == 200:
            with contextlib.suppress(ValueError):
                parts.append(part_of(json.loads(content), api))
                content = json.dumps(merge(parts, api)).encode()
        return resp, content

    async def _relay_movable(self, cell: dict, tracked: Tracked, api: str, body: dict, placement: Placement):
        """Relay SSE event by event (never a partial event), so that a move can cut the stream at an
        event boundary: the source's events after the cut (and its abort/[DONE]) are dropped, the
        continuation starts from exactly the text forwarded, and its events are rewritten to read as
        the same answer (original id, cumulative text and counts for /generate)."""
        req = tracked.req
        parts: list[Part] = []
        events: list[bytes] = []   # forwarded events of the current attempt, as the engine sent them
        rewrite = None
        ended = False              # the answer's final event went out: no cut after it
        buf = b""
        while True:
            cut = False
            async for chunk in cell["resp"].aiter_raw():
                buf += chunk
                while True:
                    i = buf.find(b"\n\n")
                    if i < 0:
                        break
                    ev, buf = buf[:i + 2], buf[i + 2:]
                    if tracked.move_to is not None and not ended:
                        kind = _event_kind(ev, api)
                        if kind in ("content", "abort"):
                            cut = True
                            break
                        ended = True           # finished before the move landed
                        tracked.move_to = None
                        self.metrics.moves_late.inc()
                    out = ev if rewrite is None else rewrite(ev)
                    events.append(ev)
                    if out is None:
                        continue
                    req.generated += out.count(b"data:") - out.count(b"data: [DONE]")
                    yield out
                if cut:
                    break
            if not cut:
                break
            await cell["resp"].aclose()
            parts.append(_part_of_events(events, api))
            parts = [p for p in parts if p.tokens]
            done = sum(p.tokens for p in parts)
            nxt = self._next_attempt(tracked, body, api, parts)
            req.generated = done
            buf, events = b"", []
            try:
                resp = await self._send(req, placement, api, nxt)
            except ERRORS as e:
                log.warning("continuation of %s failed: %s", req.rid, e)
                return
            cell["resp"] = resp
            if resp.status_code != 200:
                log.warning("continuation of %s answered %s", req.rid, resp.status_code)
                return
            req.pinned = False
            rewrite = _rewriter(api, req.rid, parts)
        tracked.state = "finished"
        self.fallback.observe(req.prompt_tokens, req.generated)

    async def _relay(self, resp: UpstreamResponse, tracked: Tracked):
        """Relay SSE bytes untouched; count events as generated tokens (SGLang streams one event
        per detokenizer step, one token at the default stream interval)."""
        req = tracked.req
        async for chunk in resp.aiter_raw():
            req.generated += chunk.count(b"data:") - chunk.count(b"data: [DONE]")
            yield chunk
        tracked.state = "finished"
        self.fallback.observe(req.prompt_tokens, req.generated)

    def _finish(self, tracked: Tracked, status: int, started: float) -> None:
        if tracked.state == "running":
            tracked.state = "finished" if status == 200 else "failed"
        tracked.status = status
        self.metrics.answered(tracked.req.api, status, time.monotonic() - started)

    async def _prediction_header(self, req: RequestView) -> str:
        rec = await self.predictions.get(req.rid)
        if rec is not None and self.predictions.fresh(rec):
            return estimate_from_record(rec, req.max_tokens).header()
        return req.estimate.header() if req.estimate.source != "fallback" else \
            self.fallback.estimate(req.prompt_tokens, req.max_tokens).header()

    # -- read-only endpoints ---------------------------------------------------------------
    async def describe(self, rid: str) -> Response:
        t = self.tracked.get(rid)
        rec = await self.predictions.get(rid)
        if t is None and rec is None:
            return _error(404, f"unknown request id {rid!r}", "not_found")
        router_view = None
        if t is not None:
            router_view = {
                "state": t.state, "profile": t.profile, "api": t.req.api, "stream": t.stream,
                "replica": t.req.replica, "status": t.status, "drop_reason": t.drop_reason,
                "prompt_tokens_estimate": t.req.prompt_tokens, "max_tokens": t.req.max_tokens,
                "generated": t.req.generated, "queued_s": t.queued_s, "engine_priority": t.engine_priority,
                "estimate_at_dispatch": t.estimate_at_dispatch and t.estimate_at_dispatch.header(),
                "estimate": asdict(t.req.estimate),
                "fallback_used": t.req.estimate.source == "fallback",
                "moves": t.moves, "attempt_rid": t.attempt_rid, "move_reason": t.move_reason or None,
                "probe": t.probe,
            }
        return JSONResponse({"rid": rid, "router": router_view,
                             "prediction": asdict(rec) if rec else None,
                             "prediction_fresh": bool(rec and self.predictions.fresh(rec))})

    def health(self) -> dict:
        return {
            "status": "ok",
            "ready": bool(self.pool.healthy()),
            "replicas": {r.name: {"healthy": r.healthy, "inflight": len(r.inflight), "last_error": r.last_error,
                                  "kv_used_tokens": r.load.num_used_tokens,
                                  "kv_capacity_tokens": r.load.max_total_num_tokens}
                         for r in self.pool.replicas.values()},
            "queue_depth": self.scheduler.depth(),
            "redis": ("disabled" if not self.predictions.enabled
                      else "connected" if self.predictions.connected else "disconnected"),
            "policy": self.policy.source,
            "policy_error": self.watcher.last_error,
        }


def _sse_json(ev: bytes) -> dict | None:
    data = ev.strip()
    if not data.startswith(b"data:"):
        return None
    data = data[5:].strip()
    if data == b"[DONE]":
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _finish_of(obj: dict, api: str) -> str | None:
    if api == "generate":
        fr = (obj.get("meta_info") or {}).get("finish_reason")
        return (fr.get("type") or "stop") if isinstance(fr, dict) else (str(fr) if fr else None)
    choices = obj.get("choices") or []
    if not choices:
        return "usage"     # the usage chunk comes after the finish
    fr = choices[0].get("finish_reason")
    return str(fr) if fr else None


def _event_kind(ev: bytes, api: str) -> str:
    """content (a token, or a role chunk) | finish (the answer's end, [DONE], usage) | abort (the
    engine's abort or an error event: never forwarded while a move is pending)."""
    if ev.strip() == b"data: [DONE]":
        return "finish"
    obj = _sse_json(ev)
    if obj is None:
        return "content"
    if "error" in obj:
        return "abort"
    fr = _finish_of(obj, api)
    if fr is None:
        return "content"
    return "abort" if fr == "abort" else "finish"


def _part_of_events(events: list[bytes], api: str) -> Part:
    """What the client received from one attempt's forwarded events."""
    objs = [o for o in map(_sse_json, events) if o is not None]
    if api == "generate":
        last = objs[-1] if objs else {}
        meta = last.get("meta_info") or {}
        ids = last.get("output_ids") or []
        return Part(last.get("text", ""), list(ids), int(meta.get("completion_tokens", len(ids))), "abort", last)
    texts = []
    for o in objs:
        c = (o.get("choices") or [{}])[0]
        t = (c.get("delta") or {}).get("content") if api == "chat" else c.get("text")
        if t:
            texts.append(t)
    return Part("".join(texts), [], len(texts), "abort", objs[0] if objs else {})


def _rewriter(api: str, rid: str, parts: list[Part]):
    """Rewrite a continuation's events so the client reads one answer: the original id, no second
    role chunk, and (for /generate, whose text and counts are cumulative) the earlier parts prepended."""
    text = "".join(p.text for p in parts)
    ids = [i for p in parts for i in p.ids]
    done = sum(p.tokens for p in parts)

    def rewrite(ev: bytes) -> bytes | None:
        obj = _sse_json(ev)
        if obj is None:
            return ev
        if api == "generate":
            obj["text"] = text + obj.get("text", "")
            if "output_ids" in obj:
                obj["output_ids"] = ids + list(obj["output_ids"] or [])
            meta = obj.setdefault("meta_info", {})
            meta["id"] = rid
            if "completion_tokens" in meta:
                meta["completion_tokens"] = done + int(meta["completion_tokens"])
            if isinstance(meta.get("finish_reason"), dict) and "length" in meta["finish_reason"]:
                meta["finish_reason"]["length"] = meta.get("completion_tokens")
        else:
            if "id" in obj:
                obj["id"] = rid
            choices = obj.get("choices") or []
            if api == "chat" and choices and choices[0].get("finish_reason") is None:
                delta = choices[0].get("delta") or {}
                if "role" in delta and not delta.get("content"):
                    return None   # the continuation's own opening role chunk
            usage = obj.get("usage")
            if isinstance(usage, dict) and "completion_tokens" in usage:
                usage["completion_tokens"] += done
                usage["total_tokens"] = usage.get("prompt_tokens", 0) + usage["completion_tokens"]
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    return rewrite


class _RelayResponse(StreamingResponse):
    """A streamed answer whose cleanup runs however the response ends, including a client that
    left before the first byte (when the body generator never starts and its own finally never runs)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self._on_close())


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)


_FAST_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/generate": "generate"}


class _RouterApp(FastAPI):
    """The proxied endpoints skip FastAPI's routing, dependency solving and middleware stack (most
    of the router's per-request CPU under load, router/README.md "Overhead"); everything else goes
    through FastAPI as usual. The handler is the same `Router.handle`."""

    async def __call__(self, scope, receive, send) -> None:
        api = _FAST_PATHS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if api is None or scope.get("method") != "POST":
            await super().__call__(scope, receive, send)
            return
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            response = await self.state.router.handle(Request(scope, receive), api)
            await response(scope, receive, tracking_send)
        except Exception:
            log.exception("error serving %s", scope.get("path"))
            if not started:
                await _error(500, "internal router error", "internal_error")(scope, receive, send)


def make_app(config: RouterConfig) -> FastAPI:
    """Build the router app. The policy is validated here (PolicyError on a bad file)."""
    router = Router(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    app = _RouterApp(title="lenpred router", lifespan=lifespan)
    app.state.router = router

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await router.handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await router.handle(request, "completions")

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        return await router.handle(request, "generate")

    @app.get("/v1/models")
    async def models() -> Response:
        for r in router.pool.healthy():
            with contextlib.suppress(httpx.HTTPError):
                resp = await router.client.get(f"{r.name}/v1/models", timeout=router.policy.spec.replicas.timeout_s)
                return Response(resp.content, status_code=resp.status_code,
                                 media_type=resp.headers.get("content-type"))
        return _error(503, "no healthy replica", "overloaded", {"x-lenpred-drop-reason": "no-healthy-replica"})

    @app.post("/v1/lenpred/batch")
    async def batch(request: Request) -> Response:
        """A known set of requests, planned as a whole (see lenpred.router.batch)."""
        from lenpred.router.batch import BatchRun

        try:
            body = await request.json()
            reqs = body["requests"]
            if not isinstance(reqs, list) or not all(isinstance(r, dict) for r in reqs):
                raise ValueError("`requests` must be a list of request bodies")
        except (ValueError, KeyError, TypeError) as e:
            return _error(400, f"invalid batch: {e}", "invalid_request_error")
        api = body.get("api", "generate")
        if api not in PATHS:
            return _error(400, f"unknown api {api!r}; one of {sorted(PATHS)}", "invalid_request_error")
        profile = body.get("profile") or request.headers.get("x-lenpred-profile", DEFAULT_PROFILE)
        if profile not in router.policy.profiles:
            return _error(400, f"unknown profile {profile!r}", "invalid_request_error")
        if not router.pool.healthy():
            return _error(503, "no healthy replica", "overloaded", {"x-lenpred-drop-reason": "no-healthy-replica"})
        run = BatchRun(router, api, reqs, profile)
        headers = {"x-lenpred-batch-id": run.id}
        if body.get("stream", True):
            async def lines():
                async for item in run.stream():
                    yield json.dumps(item).encode() + b"\n"
            return StreamingResponse(lines(), media_type="application/x-ndjson", headers=headers)
        results, summary = [None] * len(reqs), None
        async for item in run.stream():
            if "summary" in item:
                summary = item["summary"]
            else:
                results[item["index"]] = item
        return JSONResponse({"results": results, "summary": summary}, headers=headers)

    @app.get("/v1/lenpred/requests/{rid}")
    async def describe(rid: str) -> Response:
        return await router.describe(rid)

    @app.get("/health")
    async def health() -> dict:
        return router.health()

    @app.get("/ready")
    async def ready() -> Response:
        return Response(status_code=200 if router.pool.healthy() else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        router.metrics.queue_depth.set(router.scheduler.depth())
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
