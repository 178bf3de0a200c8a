"""The router's core: its components wired together, the request lifecycle (dispatch) and the
events that drive it. No HTTP here: `app.py` parses and checks requests and renders `Answer`s and
`Refusal`s.

Per request (`Router.serve`): assign the rid the tap will see, estimate the output length (fallback
at arrival; EGTP/PLP predictions arrive over Redis once the engine has prefilled it), optionally
probe, queue, admit, place, forward with `rid` (and `priority`) in the body, relay the answer
(`relay.py`), release the accounting. Every state change goes through `RequestTable.transition`.

Failures (docs/LIMITS.md has every deadline): until the first byte of the answer (a streamed
request's first chunk; a non-streamed request's whole answer) the attempt runs under one deadline
(`upstream.first_byte_timeout_s` / `upstream.response_timeout_s`). A connection refused is re-placed
at once; a stale pooled connection is retried once on the same replica; any other failure before
the first byte, or the replica leaving the pool (poll failures or outlier ejection: the deadline is
cut short, `Tracked.evacuate`), sends the request once to another replica within the same deadline
(`upstream.redispatch`), under a new attempt rid; past the deadline the client gets 504. Each such
failure counts against the replica (`ReplicaPool.report_failure`) and the abandoned attempt is
aborted there. After the first byte a stream that stalls or breaks ends with an SSE error event.
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
from lenpred.router.relay import Relay, restore_id
from lenpred.router.state import ReplicaPool
from lenpred.router.upstream import CLIENT_ERRORS, CONNECT_ERRORS, STALE_ERRORS, Upstream, UpstreamResponse

log = logging.getLogger(__name__)

S = RequestState
RECORD_BYTES = 2048
"""Memory one ended request's record takes in the request table, with margin (~1.2 KB measured in
tests/test_router_core.py); `limits.history_bytes` / this = requests remembered."""


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


class _NoByte(Exception):
    """An attempt failed before the first byte of its answer (it may be sent elsewhere)."""

    def __init__(self, why: str, status: int):
        super().__init__(why)
        self.status = status


class Router:
    """Runtime state of one router process."""

    def __init__(self, config: RouterConfig):
        self.config = config
        self.metrics = RouterMetrics()
        self.watcher = PolicyWatcher(config.policy_path, config.handle)
        spec = self.policy.spec
        self.fallback = HistoryFallback(spec.predictions.fallback)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=2.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        self.upstream = Upstream(spec.upstream.connect_timeout_s)   # the request path (aiohttp)
        self.pool = ReplicaPool(config.backends, self.client, lambda: self.policy.spec.replicas,
                                on_change=self._on_pool_change, outlier=lambda: self.policy.spec.outlier)
        self.scheduler = Scheduler(self.pool, lambda: self.policy, config.handle.clock,
                                   on_dispatch=self._on_dispatch, on_drop=self._on_drop,
                                   on_pass=self.metrics.schedule.observe)
        self.predictions = PredictionStore(config.redis_url, config.namespace, lambda: self.policy.spec.predictions,
                                           self._on_prediction, self._on_finished_event,
                                           on_malformed=self.metrics.events_malformed.inc)
        self.table = RequestTable(self._history_capacity(), config.handle.clock, self.metrics.transition,
                                  self.metrics.illegal_transition)
        self.mover = Mover(self.pool, self.table, lambda: self.policy, self.metrics, config.handle.clock,
                           lambda replica, rid: self._spawn(self._abort(replica, rid)))
        self.waiters = PredictionWaiters(self.predictions)
        self.prober = Prober(self.pool, self.upstream, self.waiters, self.metrics, config.handle.clock, self._spawn)
        self.batch_attempts: dict[str, RequestView] = {}   # batch attempts in flight, by engine rid
        self.tasks: dict[str, str] = {}                    # background task -> "running" | its last error
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()

    @property
    def policy(self) -> Policy:
        return self.watcher.policy

    def _history_capacity(self) -> int:
        return max(self.policy.spec.limits.history_bytes // RECORD_BYTES, 100)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        await self.upstream.start()
        await self.pool.poll_once()
        await self.predictions.start()
        loops: dict[str, Callable[[], Coroutine]] = {
            "replica-poll": self.pool.run, "queue-tick": self.scheduler.run, "policy-reload": self._watch_policy}
        if self.predictions.enabled:
            loops["redis-events"] = self.predictions.follow
        self._tasks = [asyncio.create_task(self._supervised(n, f), name=f"lenpred-router-{n}") for n, f in loops.items()]

    async def stop(self) -> None:
        self.mover.cancel()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.predictions.stop()
        await self.upstream.close()
        await self.client.aclose()

    async def _supervised(self, name: str, loop: Callable[[], Coroutine]) -> None:
        """Run a background loop forever: if it dies it says so (log, metric, /health) and is
        restarted with backoff."""
        backoff = 0.5
        while True:
            self.tasks[name] = "running"
            try:
                await loop()
                why = "returned"
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - reported and restarted, never silent
                why = f"{type(e).__name__}: {e}"
                log.exception("background task %s died; restarting in %.1fs", name, backoff)
            self.tasks[name] = f"restarting after: {why}"
            self.metrics.task_failures.labels(name).inc()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _watch_policy(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_interval_s)
            self.reload()

    def reload(self, force: bool = False) -> bool | None:
        """Re-read the policy file if it changed (or `force`); the last good policy stays on any
        error (PolicyWatcher). True: reloaded, False: invalid, None: unchanged."""
        result = self.watcher.check(force)
        if result is None:
            return None
        self.metrics.reloads.labels("ok" if result else "invalid").inc()
        self.metrics.policy_invalid.set(0 if result else 1)
        if result:
            spec = self.policy.spec
            self.fallback.settings = spec.predictions.fallback
            self.upstream.connect_timeout = spec.upstream.connect_timeout_s
            self.table.capacity = self._history_capacity()
            self.scheduler.dispatch()
        return result

    def _spawn(self, coro: Coroutine) -> asyncio.Task:
        """A background task the router keeps a reference to until it ends."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _abort(self, replica: str, rid: str) -> None:
        """Best effort: a replica that does not answer within the deadline keeps the request."""
        with contextlib.suppress(httpx.HTTPError):
            await self.client.post(f"{replica}/abort_request", json={"rid": rid},
                                   timeout=self.policy.spec.upstream.abort_timeout_s)

    def _give_up(self, replica: str | None, rid: str, why: str) -> None:
        """An attempt failed in a way that blames its replica: count it there, abort it there."""
        if replica is None:
            return
        self.pool.report_failure(replica, why)
        self._spawn(self._abort(replica, rid))

    # -- events ------------------------------------------------------------------------------
    def _on_pool_change(self) -> None:
        for r in self.pool.replicas.values():
            self.metrics.replica_healthy.labels(r.name).set(1 if r.healthy else 0)
            self.metrics.replica_kv_used.labels(r.name).set(r.load.num_used_tokens)
            self.metrics.replica_inflight.labels(r.name).set(len(r.inflight))
            self.metrics.replica_predicted.labels(r.name).set(r.predicted_remaining(0.5))
            if not r.healthy:
                self._evacuate(r.name, r.last_error)
        self.metrics.redis_connected.set(1 if self.predictions.connected else 0)
        self.scheduler.dispatch()
        self.mover.soon()

    def _evacuate(self, replica: str, why: str) -> None:
        """Requests on a replica that left the pool and have received no answer byte yet: cut
        their wait short, so they are sent elsewhere now rather than at their deadline."""
        for rid in list(self.pool.replicas[replica].inflight):
            t = self.table.get(rid)
            if t is not None and t.evacuate(replica, f"replica {replica} left the pool ({why})"):
                self.metrics.evacuations.inc()

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
        """A `finished` event from the sidecar. Requests this router served are learned from their
        responses; the events add the rest (other router replicas, other clients of the same
        engines), but only plausible ones: anyone who can write to Redis or talk to the sidecar can
        send such an event, and one fake length of 4e9 tokens must not skew every estimate."""
        if event.get("rid") in self.table.tracked or event.get("aborted"):
            return
        out, prompt, cap = event.get("output_tokens"), event.get("prompt_tokens", 0), event.get("max_new_tokens")
        if not self._observe_length(prompt, out, cap if isinstance(cap, int) and cap > 0 else None):
            self.metrics.lengths_ignored.inc()

    def _observe_length(self, prompt_tokens, output_tokens, max_tokens: int | None) -> bool:
        """Learn one finished length if it is plausible; False when it was ignored."""
        ceiling = self.policy.spec.predictions.fallback.max_observed_tokens
        if max_tokens:
            ceiling = min(ceiling, max_tokens)
        if (not isinstance(output_tokens, int) or isinstance(output_tokens, bool) or not 0 <= output_tokens <= ceiling
                or not isinstance(prompt_tokens, int) or isinstance(prompt_tokens, bool)
                or not 0 <= prompt_tokens <= 1 << 40):
            return False
        self.fallback.observe(prompt_tokens, output_tokens)
        return True

    def _on_dispatch(self, req: RequestView, placement: Placement) -> None:
        self.metrics.dispatched(req.estimate.source, placement.queued_s)

    def _on_drop(self, req: RequestView, d: Dropped) -> None:
        self.metrics.dropped.labels(d.reason).inc()

    def _observe(self, t: Tracked) -> None:
        if not self._observe_length(t.req.prompt_tokens, t.req.generated, t.req.max_tokens):
            self.metrics.lengths_ignored.inc()

    def _on_break(self, t: Tracked, why: str) -> None:
        self._give_up(t.req.replica, t.attempt_rid, why)

    # -- request path ------------------------------------------------------------------------
    async def serve(self, body: dict, api: str, profile_name: str, tenant: str = "") -> Answer:
        """Serve one proxied request (already parsed and checked; the profile exists). Raises
        Refusal. Cancelled (the client went away): the engine request is aborted."""
        started = time.monotonic()
        text, prompt_tokens = prompt_of(body, api)
        max_tokens = max_tokens_of(body, api)
        rid = new_rid()
        req = RequestView(rid=rid, api=api, prompt_tokens=prompt_tokens, prompt_text=text, max_tokens=max_tokens,
                          arrival=self.config.handle.clock(), estimate=self.fallback.estimate(prompt_tokens, max_tokens),
                          client_priority=body.get("priority") if isinstance(body.get("priority"), int) else None)
        t = Tracked(req, profile_name, stream=bool(body.get("stream")), tenant=tenant)
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
        self.table.start_attempt(t, rid)
        body["rid"] = rid
        if placement.priority is not None:
            body["priority"] = placement.priority
        movable = placement.profile.preemptor is not None
        # Movable from the start (a non-streamed answer's headers come only at its end). A move
        # decided before the engine has it is harmless: the abort is a no-op there, the stream is cut
        # before its first token, a non-streamed answer simply completes (counted as too late); the
        # preemptor's cooldown makes this rare.
        req.pinned = not movable
        spec = self.policy.spec.upstream
        deadline = asyncio.get_running_loop().time() + (
            spec.first_byte_timeout_s if t.stream else spec.response_timeout_s)
        try:
            relay, content = await self._attempts(t, placement, api, body, movable, deadline)
        except _NoByte as e:
            t.error = str(e)
            self._release(t, placement)
            self._finish(t, e.status, started)
            raise Refusal(e.status, str(e), "upstream_error" if e.status == 502 else "upstream_timeout",
                          headers) from None
        except BaseException:   # cancelled: the client went away before its answer started
            self._give_up_quietly(t)
            self._release(t, placement)
            self.table.end(t, ok=False)
            raise
        headers["x-lenpred-replica"] = req.replica or ""
        resp = relay.resp
        if content is None:     # a streamed answer that started
            async def close() -> None:
                try:
                    await relay.aclose()   # unfinished: closing aborts it in SGLang
                finally:
                    self._release(t, placement)
                    self.table.end(t, ok=False)     # a stream that did not reach its end failed
                    self._finish(t, 200, started)

            redispatched = t.attempt_rid != rid
            return Answer(200, headers, resp.headers.get("content-type", "text/event-stream"),
                          stream=relay.stream_movable() if movable or redispatched else relay.stream(),
                          on_close=close)
        self._release(t, placement)
        self._finish(t, resp.status_code, started)
        if resp.status_code == 200:
            with contextlib.suppress(ValueError, AttributeError, TypeError):   # an engine's odd answer stays as is
                payload = json.loads(content)
                out = usage_of(payload, api)
                if isinstance(out, int):
                    req.generated = out
                    self._observe(t)
                if t.attempt_rid != rid and not t.moves:
                    content = json.dumps(restore_id(payload, api, rid)).encode()
            headers["x-lenpred-prediction"] = await self._prediction_header(req)
        return Answer(resp.status_code, headers, resp.headers.get("content-type", "application/json"), body=content)

    async def _attempts(self, t: Tracked, placement: Placement, api: str, body: dict, movable: bool,
                        deadline: float) -> tuple[Relay, bytes | None]:
        """Run the request until the first byte of its answer, re-dispatching it once if its
        attempt fails first (see the module docstring). Returns the relay and, for a non-streamed
        request, the whole answer (None for a stream that started). Raises _NoByte."""
        spec = self.policy.spec.upstream
        req = t.req
        while True:
            relay = Relay(t, self.table, self.mover, api, body, None, send=lambda b: self._send(req, placement, api, b),
                          on_done=self._observe, on_break=self._on_break, stall_s=spec.stall_timeout_s)
            why, status = "", 502
            try:
                async with asyncio.timeout_at(deadline) as t.watch:
                    relay.resp = await self._send(req, placement, api, body)
                    if relay.resp.status_code >= 500:
                        self.pool.report_failure(req.replica, f"HTTP {relay.resp.status_code}")
                    if t.stream and relay.resp.status_code == 200:
                        await relay.resp.first()
                        return relay, None
                    try:
                        return relay, await (relay.read_movable() if movable else relay.read())
                    finally:
                        await relay.aclose()
            except CLIENT_ERRORS as e:       # before TimeoutError: aiohttp's connect timeout is both
                why = f"the replica failed: {type(e).__name__}: {e}"
            except TimeoutError:
                why, status = t.evacuated or (
                    f"no answer within {spec.first_byte_timeout_s if t.stream else spec.response_timeout_s:g}s"), 504
            finally:
                t.watch = None
            left = deadline - asyncio.get_running_loop().time()
            failed_on = t.evacuated_from or req.replica
            self._give_up(failed_on, t.attempt_rid, why)
            if t.evacuated:
                status = 502
            t.evacuated, t.evacuated_from = "", None
            if (not spec.redispatch or t.redispatches or t.moves or left <= 0
                    or self.scheduler.redispatch(req, placement.profile, exclude={failed_on}) is None):
                raise _NoByte(why, status)
            log.info("re-dispatching %s from %s to %s: %s", req.rid, failed_on, req.replica, why)
            self.metrics.redispatches.inc()
            body["rid"] = self.table.next_attempt(t, 0, "r")

    def _give_up_quietly(self, t: Tracked) -> None:
        """The client left: abort its engine request (nothing to blame on the replica)."""
        if t.req.replica is not None:
            self._spawn(self._abort(t.req.replica, t.attempt_rid))

    def _release(self, t: Tracked, placement: Placement) -> None:
        t.req.pinned = True
        self.table.forget_attempts(t)
        self.scheduler.release(t.req, placement.profile)

    def _finish(self, t: Tracked, status: int, started: float) -> None:
        self.table.end(t, ok=status == 200)
        t.status = status
        self.metrics.answered(t.req.api, status, time.monotonic() - started)

    async def _send(self, req: RequestView, placement: Placement, api: str, body: dict) -> UpstreamResponse:
        """Send to the placed replica. A refused connection marks it and re-places the request
        elsewhere (safe: nothing was sent); a stale pooled connection is retried once on the same
        replica (the engine never read the request). Other errors are the caller's."""
        tried: set[str] = set()
        stale_retried = False
        while True:
            replica = req.replica
            try:
                return await self.upstream.post(f"{replica}{PATHS[api]}", body)
            except CONNECT_ERRORS as e:
                tried.add(replica)
                moved = self.scheduler.redispatch(req, placement.profile, exclude=tried)
                # after the re-placement, so an ejection this causes does not evacuate this request
                self.pool.mark_fail(self.pool.replicas[replica], f"{type(e).__name__}: {e}")
                self.pool.report_failure(replica, f"connect: {type(e).__name__}")
                if moved is None:
                    raise
                self.metrics.retries.inc()
            except STALE_ERRORS:
                if stale_retried:
                    raise
                stale_retried = True
                self.metrics.stale_retries.inc()

    async def _prediction_header(self, req: RequestView) -> str:
        rec = await self.predictions.get(req.rid)
        if rec is not None and self.predictions.fresh(rec):
            return Estimate.from_record(rec, req.max_tokens).header()
        return req.estimate.header() if req.estimate.source != "fallback" else \
            self.fallback.estimate(req.prompt_tokens, req.max_tokens).header()

    # -- read-only views ---------------------------------------------------------------------
    def owner(self, rid: str) -> str | None:
        """The tenant that owns `rid` (a request, its probe or one of its attempts), if known."""
        base = rid.removesuffix("-probe")
        head, sep, tail = base.rpartition("-")
        if sep and tail[:1] in ("m", "r") and tail[1:].isdigit():
            base = head
        t = self.table.get(base)
        return t.tenant if t is not None else None

    async def describe(self, rid: str) -> dict | None:
        """The debug view of one request: the router's record and the stored prediction."""
        t = self.table.get(rid)
        rec = await self.predictions.get(rid)
        if t is None and rec is None:
            return None
        return {"rid": rid, "router": t.view() if t is not None else None,
                "prediction": vars(rec).copy() if rec else None,
                "prediction_fresh": bool(rec and self.predictions.fresh(rec))}

    async def health(self) -> dict:
        spec = self.policy.spec
        redis = "disabled"
        if self.predictions.enabled:
            alive = await self.predictions.ping(max(spec.predictions.redis_timeout_s * 4, 0.2))
            redis = "connected" if alive and self.predictions.connected else "disconnected"
            self.metrics.redis_connected.set(1 if redis == "connected" else 0)
        return {
            "status": "ok",
            "ready": bool(self.pool.healthy()),
            "replicas": {r.name: {"healthy": r.healthy, "inflight": len(r.inflight), "last_error": r.last_error,
                                  "kv_used_tokens": r.load.num_used_tokens,
                                  "kv_capacity_tokens": r.load.max_total_num_tokens}
                         for r in self.pool.replicas.values()},
            "queue_depth": self.scheduler.depth(),
            "redis": redis,
            "redis_events_received": self.predictions.received,   # predictions on its channels
            "redis_events_malformed": self.predictions.malformed,
            "policy": self.policy.source,
            "policy_error": self.watcher.last_error,
            "background_tasks": dict(self.tasks),
            "requests_remembered": len(self.table),
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
        self._observe_length(prompt_tokens, output_tokens, None)

    async def post_read(self, replica: str, api: str, body: dict) -> tuple[int, bytes]:
        """A batch member or probe: the whole answer within `upstream.response_timeout_s`."""
        async with asyncio.timeout(self.policy.spec.upstream.response_timeout_s):
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
