"""Writes predictions and finished events to Redis (schema: lenpred/contract/keys.py, docs/REDIS.md).

Redis is soft state: when it is down the sidecar keeps predicting, counts the failed writes and
retries on the next batch; no engine or router waits on it."""
from __future__ import annotations

import json
import logging
import time

import redis.asyncio as aioredis

from lenpred.contract import keys
from lenpred.contract.redisconf import client_kwargs
from lenpred.contract.prediction import Prediction

log = logging.getLogger("lenpred.sidecar")


class PredictionStore:
    def __init__(self, url: str | None, namespace: str = keys.DEFAULT_NAMESPACE, ttl_s: int = keys.DEFAULT_TTL_S,
                 finished_maxlen: int = 100_000):
        self.ns = namespace
        self.ttl_s = ttl_s
        self.finished_maxlen = finished_maxlen
        self.errors = 0
        self._last_log = 0.0
        # client_kwargs: LENPRED_REDIS_PASSWORD (AUTH) and LENPRED_REDIS_CA_FILE (rediss://), as everywhere
        self.r = aioredis.Redis.from_url(url, **client_kwargs(url), socket_timeout=0.5, socket_connect_timeout=0.5,
                                         health_check_interval=10) if url else None

    async def close(self) -> None:
        if self.r is not None:
            await self.r.aclose()

    def _fail(self, e: Exception) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._last_log > 10:
            log.warning("redis write failed (%s); predictions are not stored until it is back", e)
            self._last_log = now

    async def write(self, records: list[Prediction], finished: list[dict]) -> bool:
        """One pipeline for everything one ingest batch produced."""
        if self.r is None or not (records or finished):
            return self.r is not None
        try:
            pipe = self.r.pipeline(transaction=False)
            chan = keys.events_channel(self.ns)
            for rec in records:
                k = keys.pred_key(self.ns, rec.rid)
                pipe.hset(k, mapping=rec.to_hash())
                pipe.expire(k, self.ttl_s)
                pipe.publish(chan, rec.to_json())
            for f in finished:
                k = keys.pred_key(self.ns, f["rid"])
                pipe.hset(k, "true_len", f["output_tokens"])
                pipe.expire(k, self.ttl_s)
                pipe.xadd(keys.finished_stream(self.ns), {k2: str(v) for k2, v in f.items()},
                          maxlen=self.finished_maxlen, approximate=True)
                pipe.publish(chan, json.dumps({"type": "finished", **f}))
            await pipe.execute()
            return True
        except Exception as e:  # noqa: BLE001 — any Redis failure is soft
            self._fail(e)
            return False
