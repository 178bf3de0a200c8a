"""The router's core: its components wired together, the request lifecycle (dispatch) and the
events that drive it. No HTTP here: `app.py` parses requests and renders `Answer`s and `Refusal`s.

Per request (`Router.serve`): assign the rid the tap will see, estimate the output length (fallback
at arrival; EGTP/PLP predictions arrive over Redis once the engine has prefilled it), optionally
probe, queue, admit, place, forward with `rid` (and `priority`) in the body, relay the answer
(`relay.py`), release the accounting. Every state change goes through `RequestTable.transition`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Coroutine

import httpx

from lenpred.contract.prediction import Estimate, Prediction
from lenpred.router.config import Policy, PolicyWatcher, Profile, RouterConfig
from lenpred.router.ids import new_rid
from lenpred.router.interfaces import ReplicaView, RequestView
from lenpred.router.lifecycle import RequestState, RequestTable, Tracked
from lenpred.router.metrics import RouterMetrics
from lenpred.router.moves import Mover
from lenpred.router.parsing import PATHS, max_tokens_of, prompt_of, usage_of
from lenpred.router.predictions import HistoryFallback, PredictionStore
from lenpred.router.probes import PredictionWaiters, Prober
from lenpred.router.queue import Dropped, Placement, Scheduler
from lenpred.router.relay import Relay
from lenpred.router.state import ReplicaPool
from lenpred.router.upstream import CONNECT_ERRORS, ERRORS, Upstream, UpstreamResponse

log = logging.getLogger(__name__)

RECENT_REQUESTS = 10_000
S = RequestState


class Refusal(Exception):
    """A request the router answers with an error: status, OpenAI-style error type, headers."""

    def __init__(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers or {}


@dataclass
class Answer:
    """What the client gets: a whole body, or a stream whose `on_close` runs however it ends."""

    status: int
    headers: dict[str, str]
    media_type: str
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    on_close: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)


class Router:
    """Runtime state of one router process."""

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
        self.table = RequestTable(RECENT_REQUESTS, config.handle.clock, self.metrics.transition,
                                  self.metrics.illegal_transition)
        self.mover = Mover(self.pool, self.table, lambda: self.policy, self.metrics, config.handle.clock,
                           lambda replica, rid: self._spawn(self._abort(replica, rid)))
        self.waiters = PredictionWaiters(self.predictions)
        self.prober = Prober(self.pool, self.upstream, self.waiters, self.metrics, config.handle.clock, self._spawn)
        self.batch_attempts: dict[str, RequestView] = {}   # batch attempts in flight, by engine rid
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()

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
        self.mover.cancel()
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

    def _spawn(self, coro: Coroutine) -> asyncio.Task:
        """A background task the router keeps a reference to until it ends."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _abort(self, replica: str, rid: str) -> None:
        with contextlib.suppress(httpx.HTTPError):
            await self.client.post(f"{replica}/abort_request", json={"rid": rid}, timeout=2.0)

    # -- events ------------------------------------------------------------------------------
    def _on_pool_change(self) -> None:
        for r in self.pool.replicas.values():
            self.metrics.replica_healthy.labels(r.name).set(1 if r.healthy else 0)
            self.metrics.replica_kv_used.labels(r.name).set(r.load.num_used_tokens)
            self.metrics.replica_inflight.labels(r.name).set(len(r.inflight))
            self.metrics.replica_predicted.labels(r.name).set(r.predicted_remaining(0.5))
        self.metrics.redis_connected.set(1 if self.predictions.connected else 0)
        self.scheduler.dispatch()
        self.mover.soon()

    def _on_prediction(self, rec: Prediction) -> None:
        if self.waiters.offer(rec):
            return
        breq = self.batch_attempts.get(rec.rid)
        if breq is not None:
            if self.predictions.fresh(rec):
                # a batch attempt: the record counts this attempt's tokens; the view counts all parts
                breq.estimate = Estimate.from_record(rec, breq.max_tokens, before=breq.generated)
                self.metrics.predictions.inc()
            return
        found = self.table.attempt(rec.rid)
        if found is None or not found[0].state.active or not self.predictions.fresh(rec):
            return
        t, before = found
        self.metrics.predictions.inc()
        t.req.estimate = Estimate.from_record(rec, t.req.max_tokens, before=before)
        self.scheduler.update(t.req)
        self.scheduler.dispatch()
        self.mover.soon()

    def _on_finished_event(self, event: dict) -> None:
        # Requests this router served are learned from their responses; the events add the rest
        # (other router replicas, other clients of the same engines).
        if event.get("rid") not in self.table.tracked and not event.get("aborted"):
            self.fallback.observe(int(event.get("prompt_tokens", 0)), int(event["output_tokens"]))

    def _on_dispatch(self, req: RequestView, placement: Placement) -> None:
        self.metrics.dispatched(req.estimate.source, placement.queued_s)

    def _on_drop(self, req: RequestView, d: Dropped) -> None:
        self.metrics.dropped.labels(d.reason).inc()

    def _observe(self, t: Tracked) -> None:
        self.fallback.observe(t.req.prompt_tokens, t.req.generated)

    # -- request path ------------------------------------------------------------------------
    async def serve(self, body: dict, api: str, profile_name: str) -> Answer:
        """Serve one proxied request (already parsed; the profile exists). Raises Refusal."""
        started = time.monotonic()
        text, prompt_tokens = prompt_of(body, api)
        max_tokens = max_tokens_of(body, api)
        rid = new_rid()
        req = RequestView(rid=rid, api=api, prompt_tokens=prompt_tokens, prompt_text=text, max_tokens=max_tokens,
                          arrival=self.config.handle.clock(), estimate=self.fallback.estimate(prompt_tokens, max_tokens),
                          client_priority=body.get("priority") if isinstance(body.get("priority"), int) else None)
        t = Tracked(req, profile_name, stream=bool(body.get("stream")))
        self.table.add(t)
        headers = {"x-lenpred-rid": rid}
        profile = self.policy.profiles[profile_name]
        if profile.probe.enabled and self.predictions.enabled:
            self.table.transition(t, S.PROBING)
            try:
                await self.prober.probe(t, profile, api, body)
            except BaseException:   # the client went away while the probe was out
                self.table.transition(t, S.FAILED)
                raise
            headers["x-lenpred-probe"] = t.probe.header() if t.probe else ""

        self.table.transition(t, S.QUEUED)
        try:
            placement = await self.scheduler.submit(req, profile_name, prefer=t.probe.replica if t.probe else None)
        except Dropped as d:
            self.table.transition(t, S.DROPPED)
            t.status, t.drop_reason = d.status, d.reason
            self.metrics.answered(api, d.status)
            raise Refusal(d.status, str(d), "overloaded", {**headers, "x-lenpred-drop-reason": d.reason}) from None
        except BaseException:
            self.table.transition(t, S.FAILED)
            raise
        finally:
            self.metrics.queue_depth.set(self.scheduler.depth())
        self.table.transition(t, S.RUNNING)
        t.queued_s, t.engine_priority, t.estimate_at_dispatch = placement.queued_s, placement.priority, req.estimate
        body["rid"] = t.attempt_rid = rid
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
            self._release(t, placement)
            self._finish(t, 502, started)
            raise Refusal(502, f"no replica answered: {e}", "upstream_error", headers) from None
        except BaseException:  # cancelled (client gone) while connecting
            self._release(t, placement)
            self.table.end(t, ok=False)
            raise
        headers["x-lenpred-replica"] = req.replica or ""
        req.pinned = not movable or resp.status_code != 200
        relay = Relay(t, self.table, self.mover, api, body, resp,
                      send=lambda b: self._send(req, placement, api, b), on_done=self._observe)
        if t.stream and resp.status_code == 200:
            async def close() -> None:
                try:
                    await relay.aclose()   # unfinished: closing aborts it in SGLang
                finally:
                    self._release(t, placement)
                    self.table.end(t, ok=False)     # a stream that did not reach its end failed
                    self._finish(t, 200, started)

            return Answer(200, headers, resp.headers.get("content-type", "text/event-stream"),
                          stream=relay.stream_movable() if movable else relay.stream(), on_close=close)
        try:
            content = await (relay.read_movable() if movable else relay.read())
        except ERRORS as e:
            self._finish(t, 502, started)
            raise Refusal(502, f"the replica failed: {e}", "upstream_error", headers) from None
        finally:
            await relay.aclose()
            self._release(t, placement)
        resp = relay.resp
        self._finish(t, resp.status_code, started)
        if resp.status_code == 200:
            with contextlib.suppress(ValueError):
                out = usage_of(json.loads(content), api)
                if isinstance(out, int):
                    req.generated = out
                    self._observe(t)
            headers["x-lenpred-prediction"] = await self._prediction_header(req)
        return Answer(resp.status_code, headers, resp.headers.get("content-type", "application/json"), body=content)

    def _release(self, t: Tracked, placement: Placement) -> None:
        t.req.pinned = True
        self.table.forget_attempts(t)
        self.scheduler.release(t.req, placement.profile)

    def _finish(self, t: Tracked, status: int, started: float) -> None:
        self.table.end(t, ok=status == 200)
        t.status = status
        self.metrics.answered(t.req.api, status, time.monotonic() - started)

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

    async def _prediction_header(self, req: RequestView) -> str:
        rec = await self.predictions.get(req.rid)
        if rec is not None and self.predictions.fresh(rec):
            return Estimate.from_record(rec, req.max_tokens).header()
        return req.estimate.header() if req.estimate.source != "fallback" else \
            self.fallback.estimate(req.prompt_tokens, req.max_tokens).header()

    # -- read-only views ---------------------------------------------------------------------
    async def describe(self, rid: str) -> dict | None:
        """The debug view of one request: the router's record and the stored prediction."""
        t = self.table.get(rid)
        rec = await self.predictions.get(rid)
        if t is None and rec is None:
            return None
        return {"rid": rid, "router": t.view() if t is not None else None,
                "prediction": vars(rec).copy() if rec else None,
                "prediction_fresh": bool(rec and self.predictions.fresh(rec))}

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

    # -- what a batch run uses (batch.BatchHost) ----------------------------------------------
    @property
    def predictions_enabled(self) -> bool:
        return self.predictions.enabled

    def profile(self, name: str) -> Profile:
        return self.policy.profiles[name]

    def clock(self) -> float:
        return self.config.handle.clock()

    def healthy(self) -> list[ReplicaView]:
        return self.pool.healthy()

    def fallback_estimate(self, prompt_tokens: int, max_tokens: int | None) -> Estimate:
        return self.fallback.estimate(prompt_tokens, max_tokens)

    def observe_length(self, prompt_tokens: int, output_tokens: int) -> None:
        self.fallback.observe(prompt_tokens, output_tokens)

    async def post_read(self, replica: str, api: str, body: dict) -> tuple[int, bytes]:
        return await self.upstream.post_read(f"{replica}{PATHS[api]}", body)

    def begin_attempt(self, req: RequestView, replica: str, rid: str) -> None:
        self.pool.add(req, replica)
        self.batch_attempts[rid] = req

    def end_attempt(self, req: RequestView, rid: str) -> None:
        self.pool.remove(req)
        self.batch_attempts.pop(rid, None)
        self.scheduler.dispatch()

    async def wait_for_predictions(self, rids: list[str], timeout_s: float) -> dict[str, Prediction]:
        return await self.waiters.wait(rids, timeout_s)

    async def latest_prediction(self, rid: str) -> Prediction | None:
        return await self.predictions.get(rid)
