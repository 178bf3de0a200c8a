"""The lenpred.v2 Ingest path: columnar batches, no per-row Python work on decode rows.

Messages that arrive together (from all streams) are processed as one GROUP: while a group is
being processed the next messages queue, and the next group takes all of them (no timer). Within
a group rows are applied in this order: bindings (message order), every prefill row, every decode
row (so a decode row finds a prefill sent just before it), then every finished row.

Per group: the vector blob is copied once to the device (through pinned memory on CUDA), checked
for NaN/Inf there with one reduction, prefill prompt vectors go into the device slab
(sidecar/slab.py) with one `index_copy_`, PLP input is one `index_select` + `cat`, each head batch
comes back with one device->host copy (MicroBatcher) and its outputs are checked finite (a finite
input of 3e38 overflows the head: that row is refused, never stored). Predictions go to the
write-behind store as compact tuples; PLP updates that move the prediction by less than
`plp_min_change` are not written at all.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lenpred.contract import wire_v2
from lenpred.proto.v2 import lenpred_pb2 as pb2
from lenpred.sidecar.errors import BadInput
from lenpred.sidecar.slab import PromptSlab

INVALID_CODE = 3
log = logging.getLogger("lenpred.sidecar")


@dataclass
class _Msg:
    """A checked message inside a group."""

    i: int
    st: "StreamState"
    dec: wire_v2.Decoded
    key: tuple
    pair: object
    learn: object
    rids: list = field(default_factory=list)   # prefill rids
    head: object = None                        # prefill head and the feature it reads
    feature: str = ""
    off: int = 0                               # first row of this message's vectors in the group blob


@dataclass
class StreamState:
    """Per-stream handle -> rid map (handles are chosen by the sender, valid on one stream)."""

    rids: dict[int, str] = field(default_factory=dict)


class ColumnarIngest:
    def __init__(self, svc):
        self.svc = svc  # LengthPredictorService: heads, batcher, store, metrics, cfg, learning
        cfg = svc.cfg
        self.limits = wire_v2.Limits(max_rows=cfg.max_rows_per_message, max_rid_bytes=cfg.max_rid_bytes,
                                     max_binds=cfg.max_rows_per_message)
        self.slabs: dict[tuple, PromptSlab] = {}
        self.device = svc.heads.device
        m = svc.m
        self._acc = {k: m.rows.labels(k, "accepted") for k in ("prefill", "decode", "finished")}
        self._rej = m.rows.labels("any", "rejected")
        self._queue: collections.deque = collections.deque()
        self._draining = False
        # rows per group: large enough to amortise per-group work, bounded so one group's
        # forward does not hold the loop for long (and device memory stays bounded)
        self.max_group_rows = max(cfg.max_batch * 8, 1)
        self.settle_spins = 128

    # ------------------------------------------------------------ helpers
    def slab(self, key: tuple, dim: int) -> PromptSlab:
        s = self.slabs.get(key)
        if s is None:
            s = self.slabs[key] = PromptSlab(dim, self.svc.cfg.slab_slots, self.device, self.svc.heads.dtype)
        return s

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            # pin_memory() uses torch's caching host allocator (stream-safe reuse), then one async copy
            return x.pin_memory().to(self.device, non_blocking=True)
        return x

    def _clamp(self, out: int, cap: int) -> int:
        ceiling = self.svc.cfg.max_output_tokens
        return min(out, cap if 0 < cap < ceiling else ceiling)

    # ------------------------------------------------------------ grouping
    async def ingest(self, st: StreamState, msg) -> pb2.Ack:
        """Queue one message; messages queued together (all streams) are processed as ONE group:
        one device copy, one NaN check, one slab write/read and one forward per head for the
        whole group, so the per-message cost is a little numpy and a little Python."""
        fut = asyncio.get_running_loop().create_future()
        self.submit(st, msg, fut.set_result)
        return await fut

    def submit(self, st: StreamState, msg, on_ack) -> None:
        """Queue one message; `on_ack(ack)` is called once it is processed (no task per message:
        the Ingest stream calls this straight from its reader)."""
        self._queue.append((st, msg, on_ack))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._queue:
                # let every stream's reader queue what has already arrived: that is the batching
                # (a read takes a few loop iterations to reach the queue, so wait for it to settle)
                still = 0
                for _ in range(self.settle_spins):
                    n = len(self._queue)
                    await asyncio.sleep(0)
                    still = still + 1 if len(self._queue) == n else 0
                    if still >= 12:
                        break
                group, rows = [], 0
                while self._queue and (not group or rows < self.max_group_rows):
                    item = self._queue.popleft()
                    group.append(item)
                    m = item[1]
                    rows += (len(m.prefill_handles) + len(m.decode_handles)) // 4 if isinstance(m, pb2.Batch) else 0
                try:
                    acks = await self._process(group)
                except Exception as e:  # noqa: BLE001 — a bug must answer its messages, not hang streams
                    log.exception("v2 ingest group failed")
                    acks = [pb2.Ack(seq=getattr(m, "seq", 0), code=13, message=f"internal error: {type(e).__name__}: {e}")
                            for _, m, _ in group]
                for (_, _, on_ack), ack in zip(group, acks):
                    try:
                        on_ack(ack)
                    except asyncio.InvalidStateError:  # the caller went away (cancelled)
                        pass
        finally:
            self._draining = False

    async def _forward(self, head, x: torch.Tensor) -> dict:
        b = self.svc.batcher
        t0 = time.perf_counter()
        out = b._forward(head, x) if b.inline else await asyncio.to_thread(b._forward, head, x)
        self.svc._on_batch(head, x.shape[0], time.perf_counter() - t0)
        return out

    # ------------------------------------------------------------ one group
    async def _process(self, group) -> list:
        svc, cfg = self.svc, self.svc.cfg
        n = len(group)
        acks = [pb2.Ack(seq=getattr(m, "seq", 0)) for _, m, _ in group]
        total = np.zeros(n, np.int64)
        rej = np.zeros(n, np.int64)
        notes: list[list[str]] = [[] for _ in range(n)]
        valid: dict[tuple, list[_Msg]] = {}
        for i, (st, msg, _) in enumerate(group):
            if not isinstance(msg, pb2.Batch):  # _Unparsed from the safe deserializer
                acks[i].code, acks[i].message = INVALID_CODE, msg.reason
                self._rej.inc()
                continue
            try:
                try:
                    dec = wire_v2.decode(msg, self.limits)
                except wire_v2.WireError as e:
                    raise BadInput(str(e)) from None
                total[i] = dec.rows
                # bindings in message order, before anything reads them
                if len(dec.bind_handles):
                    st.rids.update(zip(dec.bind_handles.tolist(), dec.bind_rids))
                    # bounded: a sender that never finishes its requests loses its oldest bindings
                    # (their later rows are refused as unbound), it is not refused new ones
                    over = len(st.rids) - cfg.max_stream_handles
                    if over > 0:
                        for h in list(itertools.islice(st.rids, over)):
                            del st.rids[h]
                key = (msg.head.model_id, msg.head.hidden_size, msg.head.layer)
                learn = svc.learning.recorder if svc.learning and svc.learning.recorder.wants(key) else None
                pair = svc._select(msg.head, missing_ok=learn is not None) if (dec.n_prefill or dec.n_decode) else None
                m = _Msg(i, st, dec, key, pair, learn)
                if dec.n_prefill:
                    get = st.rids.get
                    m.rids = [get(h) for h in dec.prefill_handles.tolist()]
                    if None in m.rids:
                        raise BadInput(f"{m.rids.count(None)} prefill handle(s) not bound on this stream")
                    if pair is not None:
                        m.head, m.feature = svc._prefill_head(pair, "pooled" in dec.features, "last" in dec.features)
                valid.setdefault((key, id(pair)), []).append(m)
            except BadInput as e:
                acks[i].code, acks[i].message, acks[i].rejected = INVALID_CODE, str(e), int(total[i])
                self._rej.inc(max(int(total[i]), 1))
        fins: list[dict] = []
        for ms in valid.values():
            fins += await self._process_model(ms, rej, notes)
        for f in fins:
            svc.store.put_finished(f)
        unstored = svc.store.r is not None and not svc.store.healthy
        for ms in valid.values():
            for m in ms:
                i, a, d = m.i, acks[m.i], m.dec
                a.accepted, a.rejected = int(total[i] - rej[i]), int(rej[i])
                if rej[i]:
                    a.code = INVALID_CODE
                    self._rej.inc(int(rej[i]))
                if unstored:
                    notes[i].append("redis unavailable: predictions computed, queued (newest per request), not stored yet")
                a.message = "; ".join(notes[i])
                self._acc["prefill"].inc(d.n_prefill)
                self._acc["decode"].inc(d.n_decode)
                self._acc["finished"].inc(d.n_finished)
        return acks

    async def _process_model(self, ms: list, rej: np.ndarray, notes: list) -> list[dict]:
        """Messages of one model (same head pair): one blob, one check, one forward per head."""
        key, pair, learn = ms[0].key, ms[0].pair, ms[0].learn
        dim = ms[0].dec.msg.head.hidden_size
        xd = ok = None
        vec = [m for m in ms if m.dec.vectors.shape[0]]
        if vec:
            parts = [m.dec.vectors for m in vec]
            if len({p.dtype for p in parts}) > 1:
                parts = [p.float() for p in parts]
            off = 0
            for m in vec:
                m.off = off
                off += m.dec.vectors.shape[0]
            # once to the device, upcast there; NaN/Inf check as ONE reduction over the group:
            # x*0 is 0 for every finite x and NaN otherwise (torch.isfinite is ~8x slower on CPU)
            xd = self._to_device(parts[0] if len(parts) == 1 else torch.cat(parts)).float()
            ok = (xd.mul(0).sum(1) == 0).cpu().numpy()
        pend = []  # (kind, head, x, ctx)
        # ---- prefill rows
        pre = [m for m in ms if m.dec.n_prefill]
        if pre:
            rids, mi, pts, caps = [], [], [], []
            rows = {f: [] for f in ("pooled", "last")}
            okp = []
            for m in pre:
                d = m.dec
                k = d.n_prefill
                o = np.ones(k, bool)
                for f in rows:
                    if f in d.features:
                        sl = d.feature_slice(f)
                        r = np.arange(m.off + sl.start, m.off + sl.stop)
                        o &= ok[r]
                        rows[f].append(r)
                    else:
                        rows[f].append(np.full(k, -1))
                okp.append(o)
                rids += m.rids
                mi.append(np.full(k, m.i))
                pts.append(d.prompt_tokens if d.prompt_tokens is not None else np.zeros(k, np.int32))
                caps.append(d.prefill_max_new if d.prefill_max_new is not None else np.zeros(k, np.int32))
            okp, mi = np.concatenate(okp), np.concatenate(mi)
            pts, caps = np.concatenate(pts), np.concatenate(caps)
            rows = {f: np.concatenate(r) for f, r in rows.items()}
            if not okp.all():
                bad = np.bincount(mi[~okp], minlength=len(rej))
                rej += bad
                for i in np.flatnonzero(bad):
                    notes[i].append(f"{bad[i]} prefill vector(s) contain NaN/Inf: rejected")
            keep = np.flatnonzero(okp)
            if len(keep) < len(okp):
                rids = [rids[j] for j in keep]
                mi, pts, caps = mi[keep], pts[keep], caps[keep]
                rows = {f: r[keep] for f, r in rows.items()}
            if len(keep):
                pf = pair.plp.meta.prompt_feature if pair is not None and pair.plp is not None else None
                if pf is not None:
                    has = rows[pf] >= 0
                    if has.all():
                        self.slab(key, dim).put(rids, xd[torch.from_numpy(rows[pf])], pts)
                    elif has.any():
                        h = np.flatnonzero(has)
                        self.slab(key, dim).put([rids[j] for j in h], xd[torch.from_numpy(rows[pf][h])], pts[h])
                if learn:
                    feats = {f: xd[torch.from_numpy(r)].cpu() for f, r in rows.items() if len(r) and (r >= 0).all()}
                    learn.on_prefill(key, rids, feats, pts.tolist(), caps.tolist())
                # one forward per serving (head, feature): normally one
                by_head: dict[tuple, list] = {}
                for m in pre:
                    if m.head is not None:
                        by_head.setdefault((id(m.head), m.feature), [(m.head, m.feature), []])[1].append(m.i)
                for (head, feature), mids in by_head.values():
                    js = np.flatnonzero(np.isin(mi, mids)) if len(by_head) > 1 or len(mids) < len(pre) else np.arange(len(rids))
                    sel = js if len(js) < len(rids) else slice(None)
                    r = rows[feature][sel]
                    pend.append(("pre", head, xd[torch.from_numpy(r)],
                                 (head, rids if len(js) == len(rids) else [rids[j] for j in js], pts[sel], mi[sel])))
        # ---- decode rows (PLP)
        dm = [m for m in ms if m.dec.n_decode]
        if dm:
            rids_d, mi_d, rows_d, steps = [], [], [], []
            for m in dm:
                d = m.dec
                get = m.st.rids.get
                rids_d += [get(h) for h in d.decode_handles.tolist()]
                sl = d.decode_slice
                rows_d.append(np.arange(m.off + sl.start, m.off + sl.stop))
                mi_d.append(np.full(d.n_decode, m.i))
                steps.append(d.decode_steps)
            rows_d, mi_d, steps = np.concatenate(rows_d), np.concatenate(mi_d), np.concatenate(steps)
            okd = ok[rows_d]
            if learn:
                f = [j for j in np.flatnonzero(okd).tolist() if rids_d[j] is not None]
                learn.on_decode(key, [rids_d[j] for j in f], steps[f].tolist(),
                                xd[torch.from_numpy(rows_d[f])].cpu())
            if pair is None or pair.plp is None:
                if not learn:  # when learning, the rows are recorded: no PLP head (yet) is no error
                    cnt = np.bincount(mi_d, minlength=len(rej))
                    rej += cnt
                    for i in np.flatnonzero(cnt):
                        notes[i].append(f"{cnt[i]} decode vector(s) ignored: no PLP head loaded for this model")
            else:
                slab = self.slabs.get(key)
                slots = slab.lookup(rids_d) if slab is not None else np.full(len(rids_d), -1, np.int64)
                good = (slots >= 0) & okd
                if not good.all():
                    miss = np.bincount(mi_d[~good], minlength=len(rej))
                    rej += miss
                    for i in np.flatnonzero(miss):
                        notes[i].append(f"{miss[i]} decode vector(s) rejected (NaN/Inf, unbound handle, or no prefill "
                                        "vector seen for the rid, or not the prompt feature the PLP head reads)")
                if good.any():
                    if not good.all():
                        g = np.flatnonzero(good)
                        rids_d = [rids_d[j] for j in g]
                        rows_d, slots, steps, mi_d = rows_d[g], slots[g], steps[g], mi_d[g]
                    # read the prompt state now: a finished row below frees slots
                    x = torch.cat([slab.gather(slots), xd[torch.from_numpy(rows_d)].to(slab.dtype)], 1)
                    pend.append(("plp", pair.plp, x, (pair.plp, rids_d, slots, steps,
                                                      slab.prompt_tokens[slots].copy(), mi_d)))
        fins = []
        for m in ms:
            if m.dec.n_finished:
                fins += self._finish(m.st, key, m.dec, learn)
        now = time.time()
        for kind, head, x, ctx in pend:
            out = await self._forward(head, x)
            mean, p50, p90 = out["mean"].numpy(), out["p50"].numpy(), out["p90"].numpy()
            good = np.isfinite(mean) & np.isfinite(p50) & np.isfinite(p90)
            if not good.all():
                bad = np.bincount(ctx[-1][~good], minlength=len(rej))
                rej += bad
                for i in np.flatnonzero(bad):
                    notes[i].append(f"{bad[i]} row(s) refused: the head's output is not finite (input out of range)")
            self._record(kind, ctx[:-1], key, mean, p50, p90, good, now, learn)
        return fins

    def _record(self, kind, ctx, key, mean, p50, p90, good, now, learn) -> int:
        """Queue the finite predictions in the store; returns 0 (refusals were counted already)."""
        svc = self.svc
        store = svc.store
        if kind == "pre":
            head, rids, pts = ctx
            slab = self.slabs.get(key)
            if slab is not None:  # the prefill prediction, for the finished record and the skip rule
                slots = slab.lookup(rids)
                m = (slots >= 0) & good
                slab.p50[slots[m]], slab.p90[slots[m]] = p50[m], p90[m]
                slab.last_total[slots[m]] = p50[m]
            if learn:
                ver = head.meta.version
                learn.on_served(key, rids, [(float(a), float(b), ver) for a, b in zip(mean, p90)])
            if store.r is None:
                return 0
            idx = np.flatnonzero(good)
            src, ver = head.meta.kind, head.meta.version
            store.put_many([rids[i] for i in idx] if len(idx) < len(rids) else rids,
                           list(zip(itertools.repeat(0), p50[idx].tolist(), p90[idx].tolist(), mean[idx].tolist(),
                                    itertools.repeat(src), itertools.repeat(ver), itertools.repeat(now),
                                    pts[idx].tolist())))
            return 0
        head, rids, slots, steps, pts = ctx
        slab = self.slabs[key]
        total = steps + p50
        last = slab.last_total[slots]
        frac = svc.cfg.plp_min_change
        # write when the total moves by >= frac (relative), or nothing was written for the rid yet
        write = good & (np.isnan(last) | (np.abs(total - last) >= frac * np.maximum(last, 1.0)))
        # the slot may have been freed (finished) during the await: only update slots still owned
        owned = slab.lookup(rids) == slots
        slab.last_total[slots[write & owned]] = total[write & owned]
        svc.skipped_writes += int((good & ~write).sum())
        if store.r is None:
            return 0
        idx = np.flatnonzero(write)
        if len(idx):
            ver = head.meta.version
            store.put_many([rids[i] for i in idx.tolist()],
                           list(zip(steps[idx].tolist(), p50[idx].tolist(), p90[idx].tolist(), mean[idx].tolist(),
                                    itertools.repeat("plp"), itertools.repeat(ver), itertools.repeat(now),
                                    pts[idx].tolist())))
        return 0

    def _finish(self, st: StreamState, key, dec, learn) -> list[dict]:
        """Finished rows: free the slab slot and the handle, clamp the true length (issue #11)."""
        svc = self.svc
        slab = self.slabs.get(key)
        out = []
        flags = dec.fin_flags if dec.fin_flags is not None else np.zeros(dec.n_finished, np.uint8)
        pts = dec.fin_prompt_tokens if dec.fin_prompt_tokens is not None else np.zeros(dec.n_finished, np.int32)
        caps = dec.fin_max_new if dec.fin_max_new is not None else np.zeros(dec.n_finished, np.int32)
        for h, n, p, fl, cap in zip(dec.fin_handles.tolist(), dec.output_tokens.tolist(), pts.tolist(),
                                    flags.tolist(), caps.tolist()):
            rid = st.rids.pop(h, None)
            if rid is None:
                continue  # unknown handle: nothing to record (counted as accepted, like v1's unknown rid)
            n = self._clamp(n, cap)
            trunc, abort = bool(fl & wire_v2.FLAG_TRUNCATED), bool(fl & wire_v2.FLAG_ABORTED)
            s = slab.free(rid) if slab is not None else -1
            p50 = float(slab.p50[s]) if s >= 0 else float("nan")
            p90 = float(slab.p90[s]) if s >= 0 else float("nan")
            if p50 == p50 and not trunc and not abort:
                svc.m.abs_err.observe(abs(p50 - n))
            if learn:
                learn.on_finish(key, rid, n, trunc, abort, cap)
            out.append({"rid": rid, "output_tokens": n, "prompt_tokens": p, "truncated": int(trunc),
                        "aborted": int(abort), "p50": round(p50, 2) if p50 == p50 else -1,
                        "p90": round(p90, 2) if p90 == p90 else -1})
        return out

