"""The client the router forwards requests with (aiohttp).

httpx's connection pool scans every pooled connection (a `select` per idle socket) on each request,
which made it most of the router's CPU time under load (router/README.md, "Overhead"); aiohttp's
pool does not. Proxied requests, probes and batch requests go through it; httpx stays for the
router's low-rate calls (health and load polls, aborts, /v1/models).
"""
from __future__ import annotations

from typing import AsyncIterator

import aiohttp
import httpx
import orjson

CONNECT_ERRORS: tuple = (httpx.ConnectError, httpx.ConnectTimeout, aiohttp.ClientConnectorError,
                         aiohttp.ServerTimeoutError)
"""Raised before the replica accepted the request: safe to re-place elsewhere."""
ERRORS: tuple = (httpx.HTTPError, aiohttp.ClientError, TimeoutError)


def dumps(obj) -> bytes:
    return orjson.dumps(obj)


class UpstreamResponse:
    """status_code, headers, aiter_raw(), aread(), aclose() over an aiohttp response."""

    def __init__(self, status_code: int, headers, impl: aiohttp.ClientResponse):
        self.status_code, self.headers, self._impl = status_code, headers, impl

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        async for chunk in self._impl.content.iter_any():
            yield chunk

    async def aread(self) -> bytes:
        return await self._impl.read()

    async def aclose(self) -> None:
        if self._impl.content.at_eof():
            self._impl.release()      # keep the connection
        else:
            self._impl.close()        # unfinished: closing aborts the request in SGLang


class Upstream:
    """One pooled client for all replicas. `post` sends pre-encoded JSON and returns once the
    response headers arrived (the body is read or streamed by the caller)."""

    def __init__(self, connect_timeout: float = 2.0):
        self._session: aiohttp.ClientSession | None = None
        self._connect_timeout = connect_timeout

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, enable_cleanup_closed=True),
            timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_timeout),
            skip_auto_headers=("User-Agent",))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(self, url: str, body: dict) -> UpstreamResponse:
        resp = await self._session.post(url, data=dumps(body), headers={"content-type": "application/json"})
        return UpstreamResponse(resp.status, resp.headers, resp)

    async def post_read(self, url: str, body: dict) -> tuple[int, bytes]:
        """POST and read the whole answer: (status, body). For probes and batch members, where
        hundreds are in flight per replica (httpx's pool scan grows with the open connections)."""
        resp = await self.post(url, body)
        try:
            return resp.status_code, await resp.aread()
        finally:
            await resp.aclose()
