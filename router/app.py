"""The router's HTTP surface: OpenAI-compatible endpoints over N SGLang replicas, plus the lenpred
endpoints (batch, request view, health, metrics). Requests are parsed and checked here, served by
`core.Router`, and its `Answer`s and `Refusal`s rendered as HTTP responses.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lenpred.router.batch import BatchRun
from lenpred.router.config import DEFAULT_PROFILE, RouterConfig
from lenpred.router.core import Answer, Refusal, Router
from lenpred.router.parsing import APIS, PATHS

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


async def proxy(router: Router, request: Request, api: str) -> Response:
    """One OpenAI / SGLang request: parse, pick the profile, serve, render."""
    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
    except ValueError as e:
        return error(400, f"invalid JSON body: {e}", "invalid_request_error")
    profile = request.headers.get("x-lenpred-profile", DEFAULT_PROFILE)
    if profile not in router.policy.profiles:
        return error(400, f"unknown profile {profile!r}; known: {sorted(router.policy.profiles)}",
                     "invalid_request_error")
    try:
        return render(await router.serve(body, api, profile))
    except Refusal as r:
        return error(r.status, str(r), r.kind, r.headers)


class _RouterApp(FastAPI):
    """The proxied endpoints skip FastAPI's routing, dependency solving and middleware stack (most
    of the router's per-request CPU under load, router/README.md "Overhead"); everything else goes
    through FastAPI as usual. The handler is the same `proxy`."""

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
            response = await proxy(self.state.router, Request(scope, receive), api)
            await response(scope, receive, tracking_send)
        except Exception:
            log.exception("error serving %s", scope.get("path"))
            if not started:
                await error(500, "internal router error", "internal_error")(scope, receive, send)


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
        return await proxy(router, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await proxy(router, request, "completions")

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        return await proxy(router, request, "generate")

    @app.get("/v1/models")
    async def models() -> Response:
        for r in router.pool.healthy():
            with contextlib.suppress(httpx.HTTPError):
                resp = await router.client.get(f"{r.name}/v1/models", timeout=router.policy.spec.replicas.timeout_s)
                return Response(resp.content, status_code=resp.status_code,
                                media_type=resp.headers.get("content-type"))
        return error(503, "no healthy replica", "overloaded", {"x-lenpred-drop-reason": "no-healthy-replica"})

    @app.post("/v1/lenpred/batch")
    async def batch(request: Request) -> Response:
        """A known set of requests, planned as a whole (see lenpred.router.batch)."""
        try:
            body = await request.json()
            reqs = body["requests"]
            if not isinstance(reqs, list) or not all(isinstance(r, dict) for r in reqs):
                raise ValueError("`requests` must be a list of request bodies")
        except (ValueError, KeyError, TypeError) as e:
            return error(400, f"invalid batch: {e}", "invalid_request_error")
        api = body.get("api", "generate")
        if api not in PATHS:
            return error(400, f"unknown api {api!r}; one of {sorted(PATHS)}", "invalid_request_error")
        profile = body.get("profile") or request.headers.get("x-lenpred-profile", DEFAULT_PROFILE)
        if profile not in router.policy.profiles:
            return error(400, f"unknown profile {profile!r}", "invalid_request_error")
        if not router.pool.healthy():
            return error(503, "no healthy replica", "overloaded", {"x-lenpred-drop-reason": "no-healthy-replica"})
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
        view = await router.describe(rid)
        if view is None:
            return error(404, f"unknown request id {rid!r}", "not_found")
        return JSONResponse(view)

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
