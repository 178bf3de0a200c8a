"""The engine-independent tap: turns per-step engine tensors into lenpred.v1 IngestBatches.

An engine adapter (tap/sglang_plugin.py, the offline collector) calls, once per engine step:
  on_extend(...)   prefill rows (possibly one chunk of a longer prompt; prefix-cache hits allowed)
  on_decode(...)   one row per running request
  on_finished(...) when a request ends
  end_step()       ships what the step produced as one message, without blocking

Prefix-cache hits: the engine does not recompute the cached prefix, so its hidden states are not
visible in this step. The tap keeps the computed prompt rows of recent prompts (a host-RAM LRU
bounded in tokens, `PrefixStore`) and restores the exact summary of a cached prefix from them;
when the prefix is not in the store (evicted, or produced by decoding), those tokens are left out
of the pool and counted in `stats.unpooled_tokens` — never counted twice.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

import torch

from lenpred.contract import wire
from lenpred.proto.v1 import lenpred_pb2 as pb
from lenpred.tap.config import TapConfig
from lenpred.tap.pooling import PoolState, RunningPools, summarize, summarize_segments

log = logging.getLogger("lenpred.tap")

_MOD = (1 << 61) - 1
_BASE = 1_000_003


def prefix_hashes(tokens: list[int]) -> list[int]:
    """Rolling hash of every prefix: out[i] identifies tokens[: i + 1]."""
    out, h = [], 0
    for t in tokens:
        h = (h * _BASE + t + 1) % _MOD
        out.append(h)
    return out


class PrefixStore:
    """Per-token prompt rows (hidden fp16, entropy fp32) of recent prompts, LRU-bounded in tokens,
    indexed by the rolling hash of every prefix so any cached prefix length can be restored."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._seqs: collections.OrderedDict[int, tuple[list[int], torch.Tensor, torch.Tensor]] = \
            collections.OrderedDict()
        self._index: dict[int, int] = {}  # prefix hash -> key of a sequence holding that prefix
        self._tokens = 0

    def put(self, tokens: list[int], hidden: torch.Tensor, entropy: torch.Tensor) -> None:
        if self.max_tokens <= 0 or not tokens or len(tokens) > self.max_tokens:
            return
        hs = prefix_hashes(tokens)
        key = hs[-1]
        if key in self._seqs:
            self._seqs.move_to_end(key)
            return
        self._seqs[key] = (list(tokens), hidden.detach().to("cpu", torch.float16),
                           entropy.detach().to("cpu", torch.float32))
        for h in hs:
            self._index[h] = key
        self._tokens += len(tokens)
        while self._tokens > self.max_tokens:
            old, (toks, _, _) = self._seqs.popitem(last=False)
            self._tokens -= len(toks)
            for h in prefix_hashes(toks):
                if self._index.get(h) == old:
                    del self._index[h]

    def get(self, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rows for exactly `tokens` (a prefix of some stored prompt), or None."""
        if not tokens:
            return None
        key = self._index.get(prefix_hashes(tokens)[-1])
        if key is None:
            return None
        toks, hid, ent = self._seqs[key]
        n = len(tokens)
        if toks[:n] != tokens:  # hash collision guard: exactness over speed
            return None
        self._seqs.move_to_end(key)
        return hid[:n], ent[:n]


@dataclass
class TapStats:
    prefill_rows: int = 0
    decode_rows: int = 0
    finished: int = 0
    restored_prefix_tokens: int = 0
    unpooled_tokens: int = 0
    errors: int = 0


class Tap:
    """Per-process tap state. `sender=None` collects batches in `self.outbox` (offline use/tests)."""

    def __init__(self, cfg: TapConfig, *, model_id: str, hidden_size: int, engine_id: str = "",
                 sender=None):
        self.cfg = cfg
        self.head = pb.HeadSelector(model_id=cfg.model_id or model_id, hidden_size=hidden_size, layer=cfg.layer)
        self.engine_id = engine_id
        self.sender = sender
        self.pools = RunningPools(tau=cfg.tau)
        self.prefix = PrefixStore(cfg.prefix_store_tokens)
        self.stats = TapStats()
        self.outbox: list[pb.IngestBatch] = []
        self._dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.dtype]
        # rows of each in-progress prompt, kept only until its prefill completes (for PrefixStore)
        self._rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._reset_step()

    def _reset_step(self) -> None:
        self._pre_rids: list[str] = []
        self._pre_tokens: list[int] = []
        self._pre_cap: list[int] = []
        self._pre_vecs: list[torch.Tensor] = []
        self._pre_last: list[torch.Tensor] = []
        self._pre_ent: list[float] = []
        self._dec_rids: list[str] = []
        self._dec_steps: list[int] = []
        self._dec_vecs: list[torch.Tensor] = []
        self._finished: list[pb.Finished] = []

    # ------------------------------------------------------------------ prefill
    def on_extend(self, rids: list[str], hidden: torch.Tensor, entropy: torch.Tensor,
                  extend_lens: list[int], prompt_lens: list[int], prefix_lens: list[int] | None = None,
                  token_ids: list[list[int]] | None = None) -> list[PoolState]:
        """One EXTEND batch. hidden [sum(extend_lens), d] and entropy [same] are the rows computed
        in this step, request after request. prefix_lens = tokens already prefilled before this
        step (cache hit or earlier chunks); token_ids = each request's full prompt (optional,
        enables prefix restore). A request's pool completes when prefix + extend == prompt_len.
        Returns the completed pools (for the offline collector)."""
        pieces = summarize_segments(hidden, entropy, extend_lens, self.cfg.tau)
        return self.on_extend_pieces(rids, pieces, extend_lens, prompt_lens, prefix_lens, token_ids,
                                     rows=(hidden, entropy))

    def on_extend_pieces(self, rids: list[str], pieces: list[PoolState], extend_lens: list[int],
                         prompt_lens: list[int], prefix_lens: list[int] | None = None,
                         token_ids: list[list[int]] | None = None,
                         rows: tuple[torch.Tensor, torch.Tensor] | None = None,
                         max_new_tokens: list[int] | None = None) -> list[PoolState]:
        """Same as `on_extend`, with the per-request piece summaries already computed (the engine
        adapter computes them on the engine's device and copies only the summaries to the host).
        rows = (hidden, entropy) of this step's rows, flattened as in `on_extend`; needed only to
        feed the PrefixStore (may live on the host). max_new_tokens = each request's output cap
        (0 = unknown), shipped with the prefill row."""
        prefix_lens = prefix_lens or [0] * len(rids)
        done: list[PoolState] = []
        off = 0
        for i, rid in enumerate(rids):
            n, p = extend_lens[i], prefix_lens[i]
            toks = token_ids[i] if token_ids is not None else None
            if p > 0 and rid not in self.pools:
                self._restore_prefix(rid, toks[:p] if toks is not None else None, p)
            self.pools.add(rid, pieces[i])
            if toks is not None and rows is not None and self.prefix.max_tokens:
                self._rows.setdefault(rid, []).append((rows[0][off:off + n], rows[1][off:off + n]))
            off += n
            if p + n >= prompt_lens[i]:
                st = self.pools.pop(rid)
                self._remember_prompt(rid, toks)
                done.append(st)
                self._pre_rids.append(rid)
                self._pre_tokens.append(int(prompt_lens[i]))
                self._pre_cap.append(int(max_new_tokens[i]) if max_new_tokens else 0)
                self._pre_vecs.append(st.pooled())
                self._pre_last.append(st.last)
                self._pre_ent.append(st.entropy_sum / max(st.n, 1))
        self.stats.prefill_rows += len(done)
        return done

    def _restore_prefix(self, rid: str, tokens: list[int] | None, p: int) -> None:
        rows = self.prefix.get(tokens) if tokens is not None else None
        if rows is None:
            self.stats.unpooled_tokens += p
            return
        hid, ent = rows
        self.pools.add(rid, summarize(hid.float(), ent, self.cfg.tau))
        self._rows[rid] = [(hid, ent)]
        self.stats.restored_prefix_tokens += p

    def _remember_prompt(self, rid: str, tokens: list[int] | None) -> None:
        parts = self._rows.pop(rid, None)
        if tokens is None or not parts:
            return
        hid = torch.cat([h.to("cpu", torch.float16) for h, _ in parts])
        ent = torch.cat([e.to("cpu", torch.float32) for _, e in parts])
        if hid.shape[0] == len(tokens):  # only complete, exact prompts are reusable
            self.prefix.put(list(tokens), hid, ent)

    # ------------------------------------------------------------------ decode
    def on_decode(self, rids: list[str], steps: list[int], hidden: torch.Tensor) -> None:
        """One DECODE batch: hidden [len(rids), d]; steps = tokens decoded so far per request.
        Only every k-th step is kept; selection happens before any device->host copy."""
        k = self.cfg.every
        keep = [i for i, s in enumerate(steps) if s > 0 and s % k == 0]
        if not keep:
            return
        self._dec_rids += [rids[i] for i in keep]
        self._dec_steps += [int(steps[i]) for i in keep]
        self._dec_vecs.append(hidden[keep] if len(keep) < len(rids) else hidden)
        self.stats.decode_rows += len(keep)

    def on_finished(self, rid: str, output_tokens: int, prompt_tokens: int = 0, truncated: bool = False,
                    aborted: bool = False, max_new_tokens: int = 0) -> None:
        self.pools.pop(rid)
        self._rows.pop(rid, None)
        self._finished.append(pb.Finished(rid=rid, output_tokens=output_tokens, prompt_tokens=prompt_tokens,
                                          truncated=truncated, aborted=aborted,
                                          max_new_tokens=max_new_tokens))
        self.stats.finished += 1

    # ------------------------------------------------------------------ ship
    def end_step(self) -> pb.IngestBatch | None:
        if not (self._pre_rids or self._dec_rids or self._finished):
            return None
        batch = pb.IngestBatch(head=self.head, engine_id=self.engine_id)
        if self._pre_rids:
            batch.prefill.rids.extend(self._pre_rids)
            batch.prefill.prompt_tokens.extend(self._pre_tokens)
            if any(self._pre_cap):
                batch.prefill.max_new_tokens.extend(self._pre_cap)
            if self.cfg.pool:
                batch.prefill.entropy_mean.extend(self._pre_ent)
                batch.prefill.vectors.CopyFrom(wire.encode(torch.stack(self._pre_vecs), self._dtype))
            # the last prompt token's state rides along: it is free (already on the host) and feeds
            # the "last" head, which beats EGTP on small models (docs/results/accuracy.md)
            batch.prefill.last_vectors.CopyFrom(wire.encode(torch.stack(self._pre_last), self._dtype))
        if self._dec_rids:
            batch.decode.rids.extend(self._dec_rids)
            batch.decode.steps.extend(self._dec_steps)
            batch.decode.vectors.CopyFrom(wire.encode(torch.cat(self._dec_vecs), self._dtype))
        batch.finished.extend(self._finished)
        self._reset_step()
        if self.sender is not None:
            self.sender.submit(batch)
        else:
            self.outbox.append(batch)
        return batch
