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
from lenpred.router.ids import router_tag
from lenpred.contract.redisconf import client_kwargs
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
    """Reads `lenpred:{ns}:pred:{rid}` on demand and follows `lenpred:{ns}:events` (push).

    The follower never dies of its input: an event that is not a JSON object of a known type with
    valid fields is skipped and counted (`on_malformed`); any error of the connection reconnects
    with backoff. `connected` is true while subscribed and Redis answers a PING within the
    deadline (a frozen Redis keeps TCP connections open but answers nothing)."""

    PING_EVERY_S = 2.0

    def __init__(self, redis_url: str | None, namespace: str,
                 settings: Callable[[], PredictionSettings],
                 on_prediction: Callable[[Prediction], None],
                 on_finished: Callable[[dict], None],
                 on_malformed: Callable[[], None] = lambda: None):
        self.redis_url, self.namespace = redis_url, namespace
        self._settings = settings
        self._on_prediction, self._on_finished, self._on_malformed = on_prediction, on_finished, on_malformed
        self._client: aioredis.Redis | None = None
        self._task: asyncio.Task | None = None
        self.connected = False
        self.received = 0
        self.malformed = 0
        self._last_warning = 0.0

    @property
    def enabled(self) -> bool:
        return self.redis_url is not None

    def _connect(self, **timeouts) -> aioredis.Redis:
        """A client with the shared AUTH/TLS settings (lenpred/contract/redisconf.py)."""
        return aioredis.Redis.from_url(self.redis_url, **client_kwargs(self.redis_url), **timeouts)

    async def start(self) -> None:
        if not self.enabled:
            log.warning("no Redis URL: fallback-only mode, predictions are not used")
            return
        t = self._settings().redis_timeout_s
        self._client = self._connect(socket_timeout=t, socket_connect_timeout=t, retry_on_timeout=False)

    def follow(self):
        """The event follower (a coroutine the router runs under supervision)."""
        return self._follow()

    async def stop(self) -> None:
        if self._client:
            await self._client.aclose()

    def fresh(self, rec: Prediction) -> bool:
        return time.time() - rec.ts <= self._settings().max_age_s

    async def ping(self, timeout_s: float) -> bool:
        """A real round trip to Redis within `timeout_s`."""
        if self._client is None:
            return False
        try:
            async with asyncio.timeout(timeout_s):
                return bool(await self._client.ping())
        except Exception:  # noqa: BLE001 - any failure means "not reachable now"
            return False

    async def get(self, rid: str) -> Prediction | None:
        """The stored record for `rid` (fresh or not), or None if absent or Redis is unreachable."""
        if self._client is None:
            return None
        try:
            async with asyncio.timeout(self._settings().redis_timeout_s * 2):
                h = await self._client.hgetall(pred_key(self.namespace, rid))
            return Prediction.from_hash(h) if h else None
        except (RedisError, OSError, TimeoutError, ValueError) as e:
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
                    async with asyncio.timeout(timeout_s):
                        rows = await p.execute()
                for rid, h in zip(chunk, rows):
                    if h:
                        with contextlib.suppress(ValueError):   # one bad record is one missing prediction
                            out[rid] = Prediction.from_hash(h)
        except (RedisError, OSError, TimeoutError, ValueError) as e:
            log.warning("batch prediction read failed: %s", e)
        return out

    async def _follow(self) -> None:
        backoff = 0.1
        # this router's own requests (its tag in their rids) + the shared channel (untagged rids,
        # sidecars older than the tags)
        channels = (events_channel(self.namespace, router_tag()), events_channel(self.namespace))
        while True:
            # A connection without socket_timeout: idle pub/sub reads must not time out.
            client = self._connect(socket_connect_timeout=self._settings().redis_timeout_s * 4)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(self._settings().redis_timeout_s * 20):
                    await pubsub.subscribe(*channels)
                self.connected, backoff = True, 0.1
                log.info("following predictions on %s", " and ".join(channels))
                next_ping = time.monotonic() + self.PING_EVERY_S
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None:
                        self._dispatch(msg.get("data"))
                    if time.monotonic() >= next_ping:
                        alive = await self.ping(max(self._settings().redis_timeout_s * 4, 0.2))
                        if alive != self.connected:
                            log.warning("Redis %s", "answers again" if alive else
                                        "does not answer; using fallback estimates until it does")
                        self.connected = alive
                        next_ping = time.monotonic() + self.PING_EVERY_S
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the follower reconnects, whatever broke it
                if self.connected:
                    log.warning("Redis event stream lost (%s: %s); using fallback estimates until it is back",
                                type(e).__name__, e)
                self.connected = False
            finally:
                await asyncio.shield(_close(pubsub, client))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _dispatch(self, data) -> None:
        try:
            event = json.loads(data)
            if not isinstance(event, dict):
                raise ValueError(f"an event is a JSON object, got {type(event).__name__}")
            kind = event.pop("type", None)
            if kind == "prediction":
                rec = Prediction.from_hash(event)
                self.received += 1
                self._on_prediction(rec)
            elif kind == "finished":
                self._on_finished(event)
            else:
                raise ValueError(f"unknown event type {kind!r}")
        except Exception as e:  # noqa: BLE001 - one bad event is skipped, the stream goes on
            self.malformed += 1
            self._on_malformed()
            now = time.monotonic()
            if now - self._last_warning > 10:
                self._last_warning = now
                log.warning("skipping malformed events on %s (%d so far), e.g. %r: %s",
                            events_channel(self.namespace), self.malformed, str(data)[:200], e)


async def _close(pubsub, client) -> None:
    try:
        async with asyncio.timeout(1.0):
            await pubsub.aclose()
            await client.aclose()
    except Exception:  # noqa: BLE001 - closing a broken connection may fail; nothing to do
        pass
