"""Device-side slab of prompt vectors for PLP ([h_prompt ; h_t]), one row per live request.

v1 kept one small tensor per request in a dict and stacked them per decode message; here prompt
vectors are rows of one device tensor, written with one `index_copy_` per prefill batch and read
with one `index_select` per decode batch. Slots are freed when the request finishes; when the slab
is full the least recently prefilled request is evicted (its later decode rows are refused as
"no prefill vector seen", exactly as v1's bounded cache did). Per-slot metadata (prompt tokens,
the prefill prediction, the last stored total) lives in numpy arrays so it is read vectorised.
"""
from __future__ import annotations

import collections

import numpy as np
import torch


class PromptSlab:
    def __init__(self, dim: int, capacity: int, device: torch.device, dtype: torch.dtype, initial: int = 1024):
        if capacity < 1:
            raise ValueError("slab capacity must be >= 1")
        self.dim, self.capacity, self.device, self.dtype = dim, capacity, device, dtype
        size = min(initial, capacity)
        self.vecs = torch.empty(size, dim, device=device, dtype=dtype)
        self.prompt_tokens = np.zeros(size, np.int64)
        self.p50 = np.full(size, np.nan, np.float32)      # prefill prediction (for the abs-error metric)
        self.p90 = np.full(size, np.nan, np.float32)
        self.last_total = np.full(size, np.nan, np.float32)  # last stored p50 total (write-skip threshold)
        self.slot_of: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._free = list(range(size - 1, -1, -1))
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.slot_of)

    def _grow(self) -> None:
        old = self.vecs.shape[0]
        new = min(old * 2, self.capacity)
        self.vecs = torch.cat([self.vecs, torch.empty(new - old, self.dim, device=self.device, dtype=self.dtype)])
        for name in ("prompt_tokens", "p50", "p90", "last_total"):
            a = getattr(self, name)
            b = np.full(new, np.nan if a.dtype.kind == "f" else 0, a.dtype)
            b[:old] = a
            setattr(self, name, b)
        self._free.extend(range(new - 1, old - 1, -1))

    def _slot(self, rid: str) -> int:
        s = self.slot_of.pop(rid, None)
        if s is None:
            if not self._free:
                if self.vecs.shape[0] < self.capacity:
                    self._grow()
                else:  # full: evict the oldest request
                    _, s = self.slot_of.popitem(last=False)
                    self.evicted += 1
            if s is None:
                s = self._free.pop()
        self.slot_of[rid] = s
        return s

    def put(self, rids: list[str], vecs: torch.Tensor, prompt_tokens: np.ndarray | None) -> np.ndarray:
        """Store one prompt vector per rid (re-prefill of a rid overwrites its slot); returns slots."""
        slots = np.fromiter((self._slot(r) for r in rids), np.int64, len(rids))
        idx = torch.from_numpy(slots).to(self.device, non_blocking=True)
        self.vecs.index_copy_(0, idx, vecs.to(self.dtype))
        self.prompt_tokens[slots] = prompt_tokens if prompt_tokens is not None else 0
        self.p50[slots] = np.nan
        self.p90[slots] = np.nan
        self.last_total[slots] = np.nan
        return slots

    def lookup(self, rids) -> np.ndarray:
        """Slot per rid, -1 where the rid has no prompt vector."""
        get = self.slot_of.get
        return np.fromiter((get(r, -1) for r in rids), np.int64, len(rids))

    def gather(self, slots: np.ndarray) -> torch.Tensor:
        return self.vecs.index_select(0, torch.from_numpy(slots).to(self.device, non_blocking=True))

    def free(self, rid: str) -> int:
        """Release a finished request's slot; returns it (-1 if it had none)."""
        s = self.slot_of.pop(rid, None)
        if s is None:
            return -1
        self._free.append(s)
        return s
