"""Write-behind store of predictions and finished events in Redis (schema: lenpred/contract/keys.py,
docs/REDIS.md).

Redis is off the ack path: ingest only puts records into a bounded dict (the newest prediction per
request wins) and a bounded deque of finished events; one background task flushes whatever
accumulated with ONE pipeline per flush (HSET + EXPIRE + PUBLISH per record, so the TTL is set in
the same round trip). When Redis is slow or frozen the dict keeps only the newest record per
request and refuses new requests beyond its bound (counted), so memory stays flat and acks keep
flowing. A flusher that dies says so: log, `lenpred_sidecar_store_flusher_alive` = 0, and the
gRPC health service `lenpred.store` turns NOT_SERVING.
"""
from __future__ import annotations

import asyncio
import collections
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
                 finished_maxlen: int = 100_000, *, max_pending: int = 200_000, max_finished_pending: int = 100_000,
                 op_timeout_s: float = 0.5, on_error=None):
        self.ns = namespace
        self.ttl_s = ttl_s
        self.finished_maxlen = finished_maxlen
        self.max_pending = max_pending
        self.errors = 0
        self.dropped = 0            # records refused because the pending dict was full
        self.flushes = 0
        self.written = 0
        self.in_flight = 0          # records in the pipeline being sent
        self.healthy = False        # last round trip to Redis succeeded
        self.flusher_error: str | None = None
        self.on_error = on_error    # callback() per failed pipeline (metrics)
        self.on_dead = None         # callback(reason) when the flusher task dies
        self._last_log = 0.0
        # insertion-ordered: when full, the OLDEST request's record goes (newer requests matter more)
        self._pending: collections.OrderedDict[str, object] = collections.OrderedDict()
        self._finished: collections.deque = collections.deque(maxlen=max_finished_pending)
        self._dirty = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._timeout = op_timeout_s
        # client_kwargs: LENPRED_REDIS_PASSWORD (AUTH) and LENPRED_REDIS_CA_FILE (rediss://), as everywhere
        self.r = aioredis.Redis.from_url(url, **client_kwargs(url), socket_timeout=op_timeout_s,
                                         socket_connect_timeout=op_timeout_s,
                                         health_check_interval=10) if url else None
        self._script = self.r.register_script(_WRITE_PREDICTIONS) if self.r is not None else None

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.r is None:
            return
        try:  # one round trip with a deadline, so the first acks already know whether Redis is there
            await asyncio.wait_for(self.r.ping(), self._timeout)
            self.healthy = True
        except Exception as e:  # noqa: BLE001 — Redis is soft state
            self._fail(e)
        self._task = asyncio.get_running_loop().create_task(self._flusher(), name="lenpred-store-flusher")
        self._task.add_done_callback(self._died)

    def _died(self, t: asyncio.Task) -> None:
        if t.cancelled():
            return
        e = t.exception()
        self.flusher_error = f"{type(e).__name__}: {e}" if e else "flusher returned"
        self.healthy = False
        log.error("redis write-behind flusher died (%s): predictions are no longer stored", self.flusher_error)
        if self.on_dead:
            self.on_dead(self.flusher_error)

    @property
    def alive(self) -> bool:
        return self.r is None or (self._task is not None and not self._task.done())

    async def close(self, drain_s: float = 1.0) -> None:
        if self._task is not None and not self._task.done():
            if self._pending or self._finished:  # best effort: last records out before we go
                try:
                    await asyncio.wait_for(self._flush_once(), drain_s)
                except Exception:  # noqa: BLE001
                    pass
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.r is not None:
            await self.r.aclose()

    # ------------------------------------------------------------ ingest side (never awaits)
    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._finished)

    def put(self, rid: str, rec) -> None:
        """Queue a record: a Prediction, or the compact tuple of the columnar path (step,
        remaining_p50, remaining_p90, remaining_mean, source, head_version, ts, prompt_tokens),
        the arguments of Prediction.stored_after. Newest per rid wins."""
        if self.r is None:
            return
        p = self._pending
        if rid not in p and len(p) >= self.max_pending:
            p.popitem(last=False)
            self.dropped += 1
        p[rid] = rec
        self._dirty.set()

    def put_many(self, rids, recs) -> None:
        if self.r is None:
            return
        p = self._pending
        if len(p) + len(rids) <= self.max_pending:
            p.update(zip(rids, recs))
        else:
            for rid, rec in zip(rids, recs):
                self.put(rid, rec)
        self._dirty.set()

    def put_finished(self, f: dict) -> None:
        if self.r is None:
            return
        if len(self._finished) == self._finished.maxlen:
            self.dropped += 1  # the deque drops its oldest entry
        self._finished.append(f)
        self._dirty.set()

    async def write(self, records: list[Prediction], finished: list[dict]) -> bool:
        """Queue everything one batch produced; returns whether Redis is currently reachable.
        Never waits on Redis (kept for the v1 path's signature)."""
        for rec in records:
            self.put(rec.rid, rec)
        for f in finished:
            self.put_finished(f)
        return self.r is not None and self.healthy

    async def write_now(self, records: list[Prediction], finished: list[dict]) -> bool:
        """Queue and flush at once, in one pipeline: for tools that want a record readable when
        the call returns (the prediction injector of `lenpred bench schedule-real`); the
        sidecar's ingest never calls this."""
        await self.write(records, finished)
        if self.r is None:
            return False
        try:
            await self._flush_once()
            return True
        except _Retry:
            return False

    # ------------------------------------------------------------ flusher
    async def _flush_once(self) -> None:
        batch, self._pending = self._pending, collections.OrderedDict()
        fins = list(self._finished)
        self._finished.clear()
        if not batch and not fins:
            return
        self.in_flight = len(batch) + len(fins)  # at most max_pending + max_finished_pending more
        # predictions: HSET + EXPIRE + PUBLISH per request inside one server-side script call per
        # chunk (one command, one reply): redis-py packs 3 commands per record at ~85 µs, this is
        # ~20 µs per record, measured (docs/RESULTS.md, sidecar line rate). Built outside the
        # retry below: a record that cannot be encoded is a bug, and the flusher dies saying so
        # instead of retrying it forever.
        prefix = keys.pred_key(self.ns, "")
        calls: list[list] = []
        args: list = [self.ttl_s]
        for rid, rec in batch.items():
            if isinstance(rec, Prediction):
                h = rec.to_hash()
                vals, js = tuple(h[f] for f in Prediction.HASH_FIELDS), rec.to_json()
            else:
                vals, js = Prediction.stored_after(rid, *rec)
            args.append(prefix + rid)
            args.extend(vals)
            args.append(js)
            args.append(keys.channel_for(self.ns, rid))   # its router's own channel
            if len(args) >= 1 + _ARGS_PER_RECORD * _RECORDS_PER_CALL:
                calls.append(args)
                args = [self.ttl_s]
        if len(args) > 1:
            calls.append(args)
        try:
            pipe = self.r.pipeline(transaction=False)
            for a in calls:
                await self._script(args=a, client=pipe)  # queued in the pipeline, sent below
            for f in fins:
                k = keys.pred_key(self.ns, f["rid"])
                pipe.hset(k, "true_len", f["output_tokens"])
                pipe.expire(k, self.ttl_s)
                pipe.xadd(keys.finished_stream(self.ns), {k2: str(v) for k2, v in f.items()},
                          maxlen=self.finished_maxlen, approximate=True)
                pipe.publish(keys.channel_for(self.ns, f["rid"]), json.dumps({"type": "finished", **f}))
            await pipe.execute()  # deadline: the client's socket timeout (op_timeout_s) per read/write
            self.healthy = True
            self.flushes += 1
            self.written += len(batch) + len(fins)
            self.in_flight = 0
        except (Exception, asyncio.TimeoutError) as e:  # noqa: BLE001 — Redis is soft state
            self._fail(e)
            self.in_flight = 0
            # put back what no newer record replaced, within the bounds (newest wins, memory flat)
            # the failed records are older than anything queued since: they go back in front, as
            # many as fit; superseded ones (a newer record for the rid was queued) are not needed
            back = [(rid, rec) for rid, rec in batch.items() if rid not in self._pending]
            room = max(self.max_pending - len(self._pending), 0)
            self.dropped += max(len(back) - room, 0)
            for rid, rec in reversed(back[len(back) - room:] if room else []):
                self._pending[rid] = rec
                self._pending.move_to_end(rid, last=False)
            room = self._finished.maxlen - len(self._finished)
            self._finished.extendleft(reversed(fins[-room:] if room > 0 else []))
            raise _Retry from None

    async def _flusher(self) -> None:
        backoff = 0.05
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._flush_once()
                backoff = 0.05
            except _Retry:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                self._dirty.set()

    def _fail(self, e: BaseException) -> None:
        self.errors += 1
        self.healthy = False
        if self.on_error:
            self.on_error()
        now = time.monotonic()
        if now - self._last_log > 10:
            log.warning("redis write failed (%s: %s); predictions are queued (newest per request) until it is back",
                        type(e).__name__, e)
            self._last_log = now


# ARGV: ttl, then per record: key, the Prediction.HASH_FIELDS values, the event JSON, its channel.
# Keys travel in ARGV (a single Redis, not a cluster: the schema's keys are not hash-tagged).
_ARGS_PER_RECORD = 3 + len(Prediction.HASH_FIELDS)
_RECORDS_PER_CALL = 2000  # one call blocks Redis while it runs: a few ms per chunk
_WRITE_PREDICTIONS = """
local ttl = tonumber(ARGV[1])
local names = {%s}
local nf = #names
local step = nf + 3
local n = 0
for i = 2, #ARGV, step do
  local k = ARGV[i]
  local kv = {}
  for j = 1, nf do
    kv[2 * j - 1] = names[j]
    kv[2 * j] = ARGV[i + j]
  end
  redis.call('HSET', k, unpack(kv))
  redis.call('EXPIRE', k, ttl)
  redis.call('PUBLISH', ARGV[i + nf + 2], ARGV[i + nf + 1])
  n = n + 1
end
return n
""" % ", ".join(f"'{f}'" for f in Prediction.HASH_FIELDS)


class _Retry(Exception):
    """A flush failed; the flusher backs off and tries again."""
