"""Replica pool: health, polled engine load (`GET /v1/loads`), and in-flight accounting."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

import httpx

from lenpred.router.config import ReplicaSettings
from lenpred.router.interfaces import EngineLoad, ReplicaView, RequestView

log = logging.getLogger(__name__)


@dataclass
class Replica(ReplicaView):
    """A replica is named by its base URL. It starts out of the pool until a poll succeeds."""

    healthy: bool = False
    fails: int = 0
    oks: int = 0
    last_error: str = ""


class ReplicaPool:
    def __init__(self, urls: list[str], client: httpx.AsyncClient, settings: Callable[[], ReplicaSettings],
                 on_change: Callable[[], None] = lambda: None):
        self.replicas = {u.rstrip("/"): Replica(u.rstrip("/")) for u in urls}
        self.client = client
        self._settings = settings
        self._on_change = on_change
        self.inflight: dict[str, RequestView] = {}
        self._seq = 0

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.healthy]

    # -- in-flight accounting -------------------------------------------------------------
    def add(self, req: RequestView, replica: str) -> None:
        self._seq += 1
        req.replica, req.seq = replica, self._seq
        self.replicas[replica].inflight[req.rid] = req
        self.inflight[req.rid] = req

    def remove(self, req: RequestView) -> None:
        self.inflight.pop(req.rid, None)
        if req.replica in self.replicas:
            self.replicas[req.replica].inflight.pop(req.rid, None)

    # -- health ---------------------------------------------------------------------------
    def mark_ok(self, r: Replica) -> None:
        r.fails, r.oks, r.last_error = 0, r.oks + 1, ""
        if not r.healthy and r.oks >= self._settings().healthy_after:
            r.healthy = True
            log.info("replica %s joined the pool", r.name)
            self._on_change()

    def mark_fail(self, r: Replica, why: str) -> None:
        r.oks, r.fails, r.last_error = 0, r.fails + 1, why
        if r.healthy and r.fails >= self._settings().unhealthy_after:
            r.healthy = False
            log.warning("replica %s left the pool: %s", r.name, why)
            self._on_change()

    async def _poll(self, r: Replica) -> None:
        timeout = self._settings().timeout_s
        seq = self._seq   # what was dispatched before this poll is (mostly) in its report
        try:
            health = await self.client.get(f"{r.name}/health", timeout=timeout)
            if health.status_code != 200:
                raise httpx.HTTPStatusError(f"/health returned {health.status_code}", request=health.request,
                                            response=health)
            loads = await self.client.get(f"{r.name}/v1/loads", params={"include": "core"}, timeout=timeout)
            loads.raise_for_status()
            r.load, r.load_seq = EngineLoad.from_v1_loads(loads.json()), seq
        except (httpx.HTTPError, ValueError) as e:
            self.mark_fail(r, f"{type(e).__name__}: {e}")
            return
        self.mark_ok(r)

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(r) for r in self.replicas.values()))
        self._on_change()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._settings().poll_interval_s)
            await self.poll_once()
