"""The router's HTTP surface: OpenAI-compatible endpoints over N SGLang replicas, plus the lenpred
endpoints (batch, request view, policy reload, health, metrics). Requests are authenticated
(`auth.py`), bounded and checked here (docs/LIMITS.md), served by `core.Router`, and its `Answer`s
and `Refusal`s rendered as HTTP responses.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Awaitable, Callable

import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from lenpred.router.auth import ApiKeys, Caller, Scope
from lenpred.router.batch import BatchRun
from lenpred.router.config import DEFAULT_PROFILE, LimitSettings, RouterConfig
from lenpred.router.core import Answer, Refusal, Router
from lenpred.router.parsing import APIS, PATHS, check

log = logging.getLogger(__name__)


def error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    """An OpenAI-style error body."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)


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


def render(answer: Answer) -> Response:
    if answer.stream is not None:
        return _RelayResponse(answer.stream, answer.on_close, status_code=answer.status, headers=answer.headers,
                              media_type=answer.media_type)
    return Response(answer.body, status_code=answer.status, headers=answer.headers, media_type=answer.media_type)


# -- input limits -------------------------------------------------------------------------------
async def read_json(request: Request, limits: LimitSettings) -> dict:
    """The request body as a JSON object, within `limits.max_body_bytes` (413) and
    `limits.body_timeout_s` (408); Refusal(400) for anything that is not a JSON object."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise Refusal(400, "invalid Content-Length", "invalid_request_error")
        if int(length) > limits.max_body_bytes:
            raise Refusal(413, f"the body is larger than {limits.max_body_bytes} bytes", "invalid_request_error",
                          {"connection": "close"})
    chunks, size = [], 0
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise Refusal(413, f"the body is larger than {limits.max_body_bytes} bytes",
                                  "invalid_request_error", {"connection": "close"})
                chunks.append(chunk)
    except TimeoutError:
        raise Refusal(408, f"the body did not arrive within {limits.body_timeout_s:g}s", "invalid_request_error",
                      {"connection": "close"}) from None
    try:
        body = orjson.loads(b"".join(chunks))   # strict JSON (no NaN), UTF-8 only, nesting bounded
    except orjson.JSONDecodeError as e:
        raise Refusal(400, f"invalid JSON body: {e}", "invalid_request_error") from None
    if not isinstance(body, dict):
        raise Refusal(400, "invalid JSON body: the body must be a JSON object", "invalid_request_error")
    return body


async def until_disconnected(receive, task: asyncio.Task, gone: list) -> None:
    """Cancel `task` when the client disconnects (its body already read: the next ASGI message is
    the disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.append(True)
            task.cancel()
            return


class Http:
    """The HTTP side of one router: authentication, limits and rendering around `Router`."""

    def __init__(self, router: Router, keys: ApiKeys):
        self.router, self.keys = router, keys

    def caller(self, request: Request, *scopes: Scope) -> Caller:
        """The authenticated caller; Refusal 401 without a valid key, 403 without any of `scopes`."""
        caller = self.keys.authenticate(request.headers.get("authorization"))
        if caller is None:
            self.router.metrics.auth_failures.labels("401").inc()
            raise Refusal(401, "a valid API key is required (Authorization: Bearer <key>)", "authentication_error",
                          {"www-authenticate": "Bearer"})
        if not any(caller.may(s) for s in scopes):
            self.router.metrics.auth_failures.labels("403").inc()
            raise Refusal(403, f"this API key lacks the {' or '.join(repr(s.value) for s in scopes)} scope",
                          "permission_error")
        return caller

    def profile_for(self, caller: Caller, wanted: str | None) -> str:
        """The profile a request runs under: its choice if the key may choose, else the default."""
        if not wanted or not caller.may(Scope.PRIORITY):
            return DEFAULT_PROFILE
        if wanted not in self.router.policy.profiles:
            raise Refusal(400, f"unknown profile {wanted!r}; known: {sorted(self.router.policy.profiles)}",
                          "invalid_request_error")
        return wanted

    async def guarded(self, request: Request, handler: Callable[[], Awaitable[Response]]) -> Response:
        """Run `handler`, rendering Refusals (and counting the ones before routing)."""
        try:
            return await handler()
        except Refusal as r:
            if "x-lenpred-rid" not in r.headers:
                self.router.metrics.refused.labels(str(r.status)).inc()
            return error(r.status, str(r), r.kind, r.headers)
        except ClientDisconnect:
            return Response(status_code=400)     # nobody is listening any more

    async def proxy(self, request: Request, api: str) -> Response:
        return await self.guarded(request, lambda: self._proxy(request, api))

    async def _proxy(self, request: Request, api: str) -> Response:
        caller = self.caller(request, Scope.INFERENCE)
        limits = self.router.policy.spec.limits
        body = await read_json(request, limits)
        if not caller.may(Scope.PRIORITY):
            body.pop("priority", None)      # only keys with the `priority` scope set engine priority
        try:
            check(body, api, limits.max_tokens, limits.max_abs_priority)
        except ValueError as e:
            raise Refusal(400, str(e), "invalid_request_error") from None
        profile = self.profile_for(caller, request.headers.get("x-lenpred-profile"))
        # Until the answer starts, a client that goes away cancels the request (its engine request
        # is aborted), streamed or not; once a stream started, the streaming response watches.
        task, gone = asyncio.current_task(), []
        watcher = asyncio.ensure_future(until_disconnected(request.receive, task, gone))
        try:
            answer = await self.router.serve(body, api, profile, caller.name)
        except asyncio.CancelledError:
            if gone and task.uncancel() == 0:
                return Response(status_code=499)    # not delivered: the client is gone
            raise
        finally:
            watcher.cancel()
        return render(answer)


class _RouterApp(FastAPI):
    """The proxied endpoints skip FastAPI's routing, dependency solving and middleware stack (most
    of the router's per-request CPU under load, router/README.md "Overhead"); everything else goes
    through FastAPI as usual. The handler is the same `Http.proxy`."""

    async def __call__(self, scope, receive, send) -> None:
        api = APIS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if api is None or scope.get("method") != "POST":
            await super().__call__(scope, receive, send)
            return
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            response = await self.state.http.proxy(Request(scope, receive), api)
            await response(scope, receive, tracking_send)
        except Exception:
            log.exception("error serving %s", scope.get("path"))
            if not started:
                await error(500, "internal router error", "internal_error")(scope, receive, send)


def make_app(config: RouterConfig, keys: ApiKeys | None = None) -> FastAPI:
    """Build the router app. The policy is validated here (PolicyError on a bad file); the API keys
    come from `keys`, else from `config.api_keys_file` (AuthConfigError on a bad file)."""
    router = Router(config)
    if keys is None:
        keys = ApiKeys.load(config.api_keys_file) if config.api_keys_file else ApiKeys.disabled()
    if not keys.enabled:
        log.warning("no API keys configured (--api-keys-file): the router serves everyone without "
                    "authentication, and clients may set engine priority (docs/SECURITY.md)")
    http = Http(router, keys)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    app = _RouterApp(title="lenpred router", lifespan=lifespan)
    app.state.router, app.state.http = router, http

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await http.proxy(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await http.proxy(request, "completions")

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        return await http.proxy(request, "generate")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        async def handler() -> Response:
            http.caller(request, Scope.INFERENCE)
            for r in router.pool.healthy():
                with contextlib.suppress(httpx.HTTPError):
                    resp = await router.client.get(f"{r.name}/v1/models",
                                                   timeout=router.policy.spec.replicas.timeout_s)
                    return Response(resp.content, status_code=resp.status_code,
                                    media_type=resp.headers.get("content-type"))
            raise Refusal(503, "no healthy replica", "overloaded", {"x-lenpred-drop-reason": "no-healthy-replica"})
        return await http.guarded(request, handler)

    @app.post("/v1/lenpred/batch")
    async def batch(request: Request) -> Response:
        """A known set of requests, planned as a whole (see lenpred.router.batch)."""
        async def handler() -> Response:
            caller = http.caller(request, Scope.INFERENCE)
            limits = router.policy.spec.limits
            body = await read_json(request, limits)
            reqs, api = body.get("requests"), body.get("api", "generate")
            if not isinstance(reqs, list) or not all(isinstance(r, dict) for r in reqs):
                raise Refusal(400, "invalid batch: `requests` must be a list of request bodies", "invalid_request_error")
            if len(reqs) > limits.max_batch_requests:
                raise Refusal(413, f"a batch holds at most {limits.max_batch_requests} requests",
                              "invalid_request_error")
            if api not in PATHS:
                raise Refusal(400, f"unknown api {api!r}; one of {sorted(PATHS)}", "invalid_request_error")
            for i, r in enumerate(reqs):
                if not caller.may(Scope.PRIORITY):
                    r.pop("priority", None)
                try:
                    check(r, api, limits.max_tokens, limits.max_abs_priority)
                except ValueError as e:
                    raise Refusal(400, f"invalid batch: requests[{i}]: {e}", "invalid_request_error") from None
            profile = http.profile_for(caller, body.get("profile") or request.headers.get("x-lenpred-profile"))
            if not router.pool.healthy():
                raise Refusal(503, "no healthy replica", "overloaded", {"x-lenpred-drop-reason": "no-healthy-replica"})
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
        return await http.guarded(request, handler)

    @app.get("/v1/lenpred/requests/{rid}")
    async def describe(rid: str, request: Request) -> Response:
        """A key sees its own requests; `admin` sees all. Unknown and not-owned look the same."""
        async def handler() -> Response:
            caller = http.caller(request, Scope.INFERENCE, Scope.ADMIN)
            mine = not keys.enabled or caller.may(Scope.ADMIN) or router.owner(rid) == caller.name
            view = await router.describe(rid) if mine and len(rid) <= 200 else None
            if view is None:
                raise Refusal(404, "unknown request id", "not_found")
            return JSONResponse(view)
        return await http.guarded(request, handler)

    @app.post("/v1/lenpred/policy/reload")
    async def reload(request: Request) -> Response:
        """Re-read the policy file now (admin). 200 when it is valid, 422 with the problems when not
        (the last good policy stays)."""
        async def handler() -> Response:
            http.caller(request, Scope.ADMIN)
            ok = router.reload(force=True)
            if not ok:
                raise Refusal(422, router.watcher.last_error or "invalid policy", "invalid_policy")
            return JSONResponse({"reloaded": True, "policy": router.policy.source})
        return await http.guarded(request, handler)

    @app.get("/health")
    async def health() -> dict:
        return await router.health()

    @app.get("/ready")
    async def ready() -> Response:
        return Response(status_code=200 if router.pool.healthy() else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        router.metrics.queue_depth.set(router.scheduler.depth())
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
