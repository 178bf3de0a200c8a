"""The router's HTTP server: uvicorn (httptools + uvloop) with the connection-level limits uvicorn
lacks, so idle, slow and oversized clients cannot pin the router (docs/LIMITS.md):

- `max_connections`: connections beyond it get `503` and are closed at once;
- `header_timeout_s`: a connection must deliver a request's headers within this time after it
  opened or after the request began (slowloris); otherwise `408` and closed;
- `idle_timeout_s`: keep-alive connections idle this long are closed (uvicorn's keep-alive timeout);
- `max_header_bytes` / `max_url_bytes`: larger request heads are refused (400) and closed.

The body's own limits (size: 413, arrival time: 408) are the app's (`app.read_body`), because they
come from the hot-reloaded policy file.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


@dataclass(frozen=True)
class ServerLimits:
    max_connections: int = 2048
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 30.0
    max_header_bytes: int = 64 << 10
    max_url_bytes: int = 16 << 10


def _raw_response(status: str) -> bytes:
    body = status.encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


_TOO_MANY = _raw_response("503 Service Unavailable")
_TOO_SLOW = _raw_response("408 Request Timeout")


class _HeadTooLarge(Exception):
    """Raised from a parser callback: httptools turns it into a parse error, uvicorn answers 400."""


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus the limits above (set on a subclass by `protocol_class`)."""

    limits: ServerLimits = ServerLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.limits.max_connections:
            transport.write(_TOO_MANY)
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.write(_TOO_SLOW)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > self.limits.max_url_bytes:
            raise _HeadTooLarge("URL too long")
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > self.limits.max_header_bytes:
            raise _HeadTooLarge("request headers too large")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()


def protocol_class(limits: ServerLimits) -> type[GuardedProtocol]:
    return type("GuardedProtocol", (GuardedProtocol,), {"limits": limits})


def config(app, host: str, port: int, limits: ServerLimits = ServerLimits(), **kw) -> uvicorn.Config:
    """A uvicorn config serving `app` with the router's connection limits."""
    return uvicorn.Config(app, host=host, port=port, http=protocol_class(limits),
                          timeout_keep_alive=limits.idle_timeout_s, **kw)
