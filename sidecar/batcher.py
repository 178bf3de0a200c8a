"""Dynamic micro-batching: collect rows for one head until B rows or T microseconds, then one
forward. Rows from many engine streams and Predict calls share a forward, which is what makes the
GPU pay off (a head forward costs about the same for 1 row as for 256)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from lenpred.sidecar.heads import LengthHead


@dataclass
class _Pending:
    rows: list[torch.Tensor] = field(default_factory=list)
    futures: list[tuple[asyncio.Future, int]] = field(default_factory=list)
    n: int = 0
    timer: asyncio.TimerHandle | None = None


class MicroBatcher:
    def __init__(self, max_batch: int = 256, max_wait_us: int = 2000, on_batch=None, inline: bool = False):
        self.max_batch = max_batch
        # inline: run the forward on the event loop thread. On CPU the forward holds the GIL for
        # its op dispatch anyway, so a worker thread only adds hand-offs and GIL contention
        # (measured: docs/RESULTS.md, sidecar line rate); on a GPU the thread overlaps the kernels.
        self.inline = inline
        self.max_wait_s = max_wait_us / 1e6
        self.on_batch = on_batch  # callback(head, rows, seconds) for metrics
        self._pending: dict[int, tuple[LengthHead, _Pending]] = {}
        # one forward at a time: the head is tiny, contention would only add jitter
        self._lock = asyncio.Lock()

    async def predict(self, head: LengthHead, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [n, input_dim] -> {"mean","p50","p90"} each [n] (CPU tensors)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        _, p = self._pending.setdefault(id(head), (head, _Pending()))
        p.rows.append(x)
        p.futures.append((fut, x.shape[0]))
        p.n += x.shape[0]
        if p.n >= self.max_batch:
            self._flush(id(head))
        elif p.timer is None:
            p.timer = loop.call_later(self.max_wait_s, self._flush, id(head))
        return await fut

    def _flush(self, key: int) -> None:
        entry = self._pending.pop(key, None)
        if entry is None:
            return
        head, p = entry
        if p.timer is not None:
            p.timer.cancel()
        asyncio.get_running_loop().create_task(self._run(head, p))

    async def _run(self, head: LengthHead, p: _Pending) -> None:
        try:
            x = torch.cat(p.rows)
            async with self._lock:
                t0 = time.perf_counter()
                out = self._forward(head, x) if self.inline else await asyncio.to_thread(self._forward, head, x)
                if self.on_batch:
                    self.on_batch(head, x.shape[0], time.perf_counter() - t0)
            off = 0
            for fut, n in p.futures:
                if not fut.done():
                    fut.set_result({k: v[off:off + n] for k, v in out.items()})
                off += n
        except Exception as e:  # a failed forward fails its callers, never the batcher
            for fut, _ in p.futures:
                if not fut.done():
                    fut.set_exception(e)

    @staticmethod
    def _forward(head: LengthHead, x: torch.Tensor) -> dict[str, torch.Tensor]:
        dev = head.edges.device
        out = head.predict(x.to(dev, non_blocking=True))
        # one device->host copy per head batch (three would be three syncs on a GPU)
        packed = torch.stack([out["mean"], out["p50"], out["p90"]]).float().cpu()
        return {"mean": packed[0], "p50": packed[1], "p90": packed[2]}
