"""Output-length estimates: predictions pushed through Redis, and the fallback when there is none.

Redis is soft state. Every call has a short timeout, the subscriber reconnects with backoff, and
any failure degrades to the fallback estimate; a request never fails because of Redis.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from typing import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from lenpred.contract.keys import events_channel, pred_key
from lenpred.contract.prediction import Estimate, Prediction
from lenpred.router.config import FallbackSettings, PredictionSettings

log = logging.getLogger(__name__)


class HistoryFallback:
    """Estimate from the output lengths of finished requests with a similar input length
    (log2 buckets), then from all finished requests, then a constant; capped by max_tokens."""

    def __init__(self, settings: FallbackSettings):
        self.settings = settings
        self._buckets: dict[int, deque[int]] = {}
        self._all: deque[int] = deque(maxlen=settings.window)
        self._cache: dict[int, tuple[float, float, int]] = {}
        self._seen: dict[int, int] = {}      # observations per key (bucket, -1 = all)

    def observe(self, prompt_tokens: int, output_tokens: int) -> None:
        b = max(prompt_tokens, 0).bit_length()
        self._buckets.setdefault(b, deque(maxlen=self.settings.window)).append(output_tokens)
        self._all.append(output_tokens)
        self._seen[b] = self._seen.get(b, 0) + 1
        self._seen[-1] = self._seen.get(-1, 0) + 1

    def _quantiles(self, key: int, data: deque[int]) -> tuple[float, float]:
        # Re-sorting the window on every request was a visible share of the router's CPU: the
        # quantiles are recomputed once 2% of the window is new (at once while it is small).
        cached = self._cache.get(key)
        if cached is None or self._seen.get(key, 0) - cached[2] > len(data) // 50:
            s = sorted(data)
            cached = (float(s[len(s) // 2]), float(s[min(int(len(s) * 0.9), len(s) - 1)]), self._seen.get(key, 0))
            self._cache[key] = cached
        return cached[0], cached[1]

    def estimate(self, prompt_tokens: int, max_tokens: int | None) -> Estimate:
        b = max(prompt_tokens, 0).bit_length()
        bucket = self._buckets.get(b)
        if bucket is not None and len(bucket) >= self.settings.min_samples:
            p50, p90 = self._quantiles(b, bucket)
        elif len(self._all) >= self.settings.min_samples:
            p50, p90 = self._quantiles(-1, self._all)
        else:
            p50 = float(self.settings.default_output_tokens)
            p90 = p50 * self.settings.p90_factor
        if max_tokens:
            p50, p90 = min(p50, max_tokens), min(p90, max_tokens)
        return Estimate.constant(p50, p90)


class PredictionStore:
    """Reads `lenpred:{ns}:pred:{rid}` on demand and follows `lenpred:{ns}:events` (push)."""

    def __init__(self, redis_url: str | None, namespace: str,
                 settings: Callable[[], PredictionSettings],
                 on_prediction: Callable[[Prediction], None],
                 on_finished: Callable[[dict], None]):
        self.redis_url, self.namespace = redis_url, namespace
        self._settings = settings
        self._on_prediction, self._on_finished = on_prediction, on_finished
        self._client: aioredis.Redis | None = None
        self._task: asyncio.Task | None = None
        self.connected = False
        self.received = 0

    @property
    def enabled(self) -> bool:
        return self.redis_url is not None

    async def start(self) -> None:
        if not self.enabled:
            log.warning("no Redis URL: fallback-only mode, predictions are not used")
            return
        t = self._settings().redis_timeout_s
        self._client = aioredis.Redis.from_url(self.redis_url, socket_timeout=t, socket_connect_timeout=t,
                                               retry_on_timeout=False)
        self._task = asyncio.create_task(self._follow(), name="lenpred-router-events")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._client:
            await self._client.aclose()

    def fresh(self, rec: Prediction) -> bool:
        return time.time() - rec.ts <= self._settings().max_age_s

    async def get(self, rid: str) -> Prediction | None:
        """The stored record for `rid` (fresh or not), or None if absent or Redis is unreachable."""
        if self._client is None:
            return None
        try:
            h = await asyncio.wait_for(self._client.hgetall(pred_key(self.namespace, rid)),
                                       self._settings().redis_timeout_s * 2)
            return Prediction.from_hash(h) if h else None
        except (RedisError, OSError, asyncio.TimeoutError, ValueError) as e:
            log.debug("prediction read for %s failed: %s", rid, e)
            return None

    async def get_many(self, rids: list[str], timeout_s: float = 2.0) -> dict[str, Prediction]:
        """Records for many rids in one pipelined round trip (batch planning; a longer timeout than
        the per-request path, because a batch can afford to wait for its predictions)."""
        if self._client is None or not rids:
            return {}
        out: dict[str, Prediction] = {}
        try:
            for i in range(0, len(rids), 500):
                chunk = rids[i:i + 500]
                async with self._client.pipeline(transaction=False) as p:
                    for rid in chunk:
                        p.hgetall(pred_key(self.namespace, rid))
                    rows = await asyncio.wait_for(p.execute(), timeout_s)
                for rid, h in zip(chunk, rows):
                    if h:
                        with contextlib.suppress(ValueError):   # one bad record is one missing prediction
                            out[rid] = Prediction.from_hash(h)
        except (RedisError, OSError, asyncio.TimeoutError, ValueError) as e:
            log.warning("batch prediction read failed: %s", e)
        return out

    async def _follow(self) -> None:
        backoff = 0.1
        channel = events_channel(self.namespace)
        while True:
            # A connection without socket_timeout: idle pub/sub reads must not time out.
            client = aioredis.Redis.from_url(self.redis_url, socket_connect_timeout=self._settings().redis_timeout_s * 4)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                self.connected, backoff = True, 0.1
                log.info("following predictions on %s", channel)
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None:
                        self._dispatch(msg["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                if self.connected:
                    log.warning("Redis event stream lost (%s); using fallback estimates until it is back", e)
                self.connected = False
            finally:
                await asyncio.shield(_close(pubsub, client))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _dispatch(self, data: bytes | str) -> None:
        try:
            event = json.loads(data)
            kind = event.pop("type")
            if kind == "prediction":
                self.received += 1
                self._on_prediction(Prediction.from_hash(event))
            elif kind == "finished":
                self._on_finished(event)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring malformed event %r: %s", data[:200], e)


async def _close(pubsub, client) -> None:
    try:
        await pubsub.aclose()
        await client.aclose()
    except (RedisError, OSError):
        pass
