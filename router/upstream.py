"""The client the router forwards requests with (aiohttp).

httpx's connection pool scans every pooled connection (a `select` per idle socket) on each request,
which made it most of the router's CPU time under load (router/README.md, "Overhead"); aiohttp's
pool does not. Proxied requests, probes and batch requests go through it; httpx stays for the
router's low-rate calls (health and load polls, aborts, /v1/models).

Deadlines: the connect timeout is aiohttp's; the first-byte, stall and whole-answer deadlines are
the caller's (`core.py`, `relay.py`), because they depend on the request and must be cut short
when a replica is ejected.
"""
from __future__ import annotations

from typing import AsyncIterator

import aiohttp
import httpx
import orjson

CONNECT_ERRORS: tuple = (httpx.ConnectError, httpx.ConnectTimeout, aiohttp.ClientConnectorError,
                         aiohttp.ServerTimeoutError)
"""Raised before the replica accepted the request: safe to re-place elsewhere."""
STALE_ERRORS: tuple = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
"""The replica closed the connection before answering: typically a pooled keep-alive connection it
had closed meanwhile (retried once on a fresh connection)."""
CLIENT_ERRORS: tuple = (httpx.HTTPError, aiohttp.ClientError)
"""The connection or the HTTP exchange failed (aiohttp's connect timeout is one of these)."""
ERRORS: tuple = (*CLIENT_ERRORS, TimeoutError)
KEEPALIVE_S = 4.0
"""Pooled connections are dropped after this idle time, before the servers' own keep-alive timeout
(uvicorn's default, which SGLang uses, is 5 s), so few requests meet a connection the engine has
just closed."""


def dumps(obj) -> bytes:
    return orjson.dumps(obj)


class UpstreamResponse:
    """status_code, headers, aiter_raw(), aread(), aclose() over an aiohttp response. `first()`
    reads the first body chunk ahead (the router waits for it before answering a streamed request,
    so a replica that never starts its answer can still be replaced); `aiter_raw` yields it first."""

    def __init__(self, status_code: int, headers, impl: aiohttp.ClientResponse):
        self.status_code, self.headers, self._impl = status_code, headers, impl
        self._first: bytes | None = None

    async def first(self) -> bytes:
        """The first chunk of the body (b"" if the body is empty)."""
        if self._first is None:
            self._first = await self._impl.content.readany()
        return self._first

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        if self._first:
            first, self._first = self._first, b""
            yield first
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
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self.connect_timeout = connect_timeout

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S, enable_cleanup_closed=True),
            timeout=self._timeout(self.connect_timeout), skip_auto_headers=("User-Agent",))

    def _timeout(self, connect: float) -> aiohttp.ClientTimeout:
        t = self._timeouts.get(connect)
        if t is None:
            t = self._timeouts[connect] = aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect)
        return t

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(self, url: str, body: dict) -> UpstreamResponse:
        resp = await self._session.post(url, data=dumps(body), headers={"content-type": "application/json"},
                                        timeout=self._timeout(self.connect_timeout))
        return UpstreamResponse(resp.status, resp.headers, resp)

    async def post_read(self, url: str, body: dict) -> tuple[int, bytes]:
        """POST and read the whole answer: (status, body). For probes and batch members, where
        hundreds are in flight per replica (httpx's pool scan grows with the open connections)."""
        resp = await self.post(url, body)
        try:
            return resp.status_code, await resp.aread()
        finally:
            await resp.aclose()
