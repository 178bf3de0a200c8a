"""The engine-independent tap: turns per-step engine tensors into lenpred.v1 IngestBatches.

An engine adapter (tap/sglang_plugin.py, the offline collector) calls, once per engine step:
  on_extend(...)   prefill rows (possibly one chunk of a longer prompt; prefix-cache hits allowed)
  on_decode(...)   the decode rows the adapter sampled (every k-th decode step)
  on_finished(...) when a request ends
  end_step()       ships what the step produced as one message, without blocking

Prefix-cache hits: the engine does not recompute the cached prefix, so its hidden states are not
visible in this step. The tap keeps pool summaries of fixed-size *blocks* of recent prompts
(`PrefixStore`, host RAM, LRU-bounded) and restores a cached prefix from its whole blocks; the
remaining tokens of the prefix (fewer than one block) and prefixes not in the store (evicted, or
produced by decoding) are left out of the pool and counted in `stats.unpooled_tokens` — never
counted twice. Blocks, not per-token rows: the engine copies one summary per block to the host
instead of every prompt token's state (the per-token store cost ~20% of an 8B prefill on an H200).
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

import torch

from lenpred.contract import wire
from lenpred.proto.v1 import lenpred_pb2 as pb
from lenpred.tap.config import TapConfig
from lenpred.tap.pooling import (PoolState, RunningPools, block_pieces, merge_states, segment_stats,
                                 unpack_stats)

log = logging.getLogger("lenpred.tap")

Piece = tuple[int, PoolState]  # (block index, summary of the block's rows computed in one step)


def block_keys(tokens, nblocks: int, block: int) -> list[int]:
    """Key of every prefix made of whole blocks: keys[j] identifies tokens[: (j + 1) * block]
    (a hash chained over the blocks, as SGLang's radix cache pages are)."""
    keys, h = [], 0
    for j in range(nblocks):
        h = hash((h, tuple(tokens[j * block:(j + 1) * block])))
        keys.append(h)
    return keys


class PrefixStore:
    """Pool summaries of whole blocks of recent prompts, LRU-bounded in blocks, keyed by the chained
    hash of the prompt up to the block's end (so a block is only reused after the same prefix)."""

    def __init__(self, max_tokens: int, block: int):
        self.block = max(1, block)
        self.max_blocks = max(0, max_tokens) // self.block
        self._blocks: collections.OrderedDict[int, PoolState] = collections.OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_blocks > 0

    def __len__(self) -> int:
        return len(self._blocks)

    def put(self, tokens, blocks: dict[int, PoolState]) -> None:
        """Store the complete blocks of a prompt (block index -> summary)."""
        if not self.enabled or not blocks:
            return
        keys = block_keys(tokens, max(blocks) + 1, self.block)
        for j, st in blocks.items():
            self._blocks[keys[j]] = st
            self._blocks.move_to_end(keys[j])
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)

    def restore(self, tokens) -> tuple[PoolState | None, int]:
        """Summary of the longest run of stored whole blocks at the start of `tokens` and the number
        of tokens it covers."""
        if not self.enabled:
            return None, 0
        found = []
        for key in block_keys(tokens, len(tokens) // self.block, self.block):
            st = self._blocks.get(key)
            if st is None:
                break
            self._blocks.move_to_end(key)
            found.append(st)
        if not found:
            return None, 0
        return merge_states(found), len(found) * self.block


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
                 sender=None, prefix_store: bool = True):
        self.cfg = cfg
        self.head = pb.HeadSelector(model_id=cfg.model_id or model_id, hidden_size=hidden_size, layer=cfg.layer)
        self.engine_id = engine_id
        self.sender = sender
        self.pools = RunningPools(tau=cfg.tau)
        # the store only matters when the pool is shipped (the last token is always computed)
        # and the engine has a prefix cache (the adapter says)
        self.prefix = PrefixStore(cfg.prefix_store_tokens if (prefix_store and cfg.pool) else 0,
                                  cfg.prefix_block)
        self.stats = TapStats()
        self.outbox: list[pb.IngestBatch] = []
        self._dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.dtype]
        # block pieces of each in-progress prompt, kept only until its prefill completes (PrefixStore)
        self._pieces: dict[str, list[Piece]] = {}
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
        enables the PrefixStore). A request's pool completes when prefix + extend == prompt_len.
        Returns the completed pools (for the offline collector)."""
        prefix_lens = prefix_lens or [0] * len(rids)
        pieces = unpack_stats(segment_stats(hidden, entropy, extend_lens, self.cfg.tau).cpu(), extend_lens)
        blocks = None
        if token_ids is not None and self.prefix.enabled:
            cuts = [block_pieces(p, n, self.prefix.block) for p, n in zip(prefix_lens, extend_lens)]
            flat = [n for c in cuts for _, n in c]
            states = iter(unpack_stats(segment_stats(hidden, entropy, flat, self.cfg.tau).cpu(), flat))
            blocks = [[(j, next(states)) for j, _ in c] for c in cuts]
        return self.on_extend_pieces(rids, pieces, extend_lens, prompt_lens, prefix_lens, token_ids,
                                     blocks=blocks)

    def on_extend_pieces(self, rids: list[str], pieces: list[PoolState], extend_lens: list[int],
                         prompt_lens: list[int], prefix_lens: list[int] | None = None,
                         token_ids: list[list[int]] | None = None,
                         blocks: list[list[Piece]] | None = None,
                         max_new_tokens: list[int] | None = None) -> list[PoolState]:
        """Same as `on_extend`, with the per-request summaries of this step's rows already computed
        (the engine adapter computes them on the engine's device and copies only the summaries to
        the host). blocks = per request, the (block index, summary) pieces of this step's rows cut
        at block boundaries (`pooling.block_pieces`); needed only to feed the PrefixStore.
        max_new_tokens = each request's output cap (0 = unknown), shipped with the prefill row."""
        prefix_lens = prefix_lens or [0] * len(rids)
        done: list[PoolState] = []
        for i, rid in enumerate(rids):
            n, p = extend_lens[i], prefix_lens[i]
            toks = token_ids[i] if token_ids is not None else None
            if p > 0 and rid not in self.pools:
                self._restore_prefix(rid, toks[:p] if toks is not None else None, p)
            self.pools.add(rid, pieces[i])
            if blocks is not None and toks is not None and self.prefix.enabled:
                self._pieces.setdefault(rid, []).extend(blocks[i])
            if p + n >= prompt_lens[i]:
                st = self.pools.pop(rid)
                self._remember_prompt(rid, toks)
                done.append(st)
                self._pre_rids.append(rid)
                self._pre_tokens.append(int(prompt_lens[i]))
                self._pre_cap.append(int(max_new_tokens[i]) if max_new_tokens else 0)
                self._pre_vecs.append(st.pooled())
                self._pre_last.append(st.last[None])
                self._pre_ent.append(st.entropy_sum / max(st.n, 1))
        self.stats.prefill_rows += len(done)
        return done

    def on_prompt_last(self, rids: list[str], last: torch.Tensor, prompt_lens: list[int],
                       max_new_tokens: list[int] | None = None) -> None:
        """Pool off: the last prompt token's state ([len(rids), d], host) of requests whose prompt
        completed in this step — all the prefill heads that read it need."""
        if not rids:
            return
        self._pre_rids += rids
        self._pre_tokens += [int(n) for n in prompt_lens]
        self._pre_cap += [int(c) for c in max_new_tokens] if max_new_tokens else [0] * len(rids)
        self._pre_last.append(last)
        self.stats.prefill_rows += len(rids)

    def _restore_prefix(self, rid: str, tokens: list[int] | None, p: int) -> None:
        st, covered = self.prefix.restore(tokens) if tokens is not None else (None, 0)
        if st is not None:
            self.pools.add(rid, st)
            self.stats.restored_prefix_tokens += covered
        self.stats.unpooled_tokens += p - covered

    def _remember_prompt(self, rid: str, tokens: list[int] | None) -> None:
        """Store the prompt's complete blocks (pieces of one block may come from several steps)."""
        pieces = self._pieces.pop(rid, None)
        if tokens is None or not pieces:
            return
        by_block: dict[int, list[PoolState]] = {}
        for j, st in pieces:
            by_block.setdefault(j, []).append(st)
        B = self.prefix.block
        whole = {j: merge_states(sts) for j, sts in by_block.items()
                 if sum(s.n for s in sts) == B and (j + 1) * B <= len(tokens)}
        self.prefix.put(tokens, whole)

    # ------------------------------------------------------------------ decode
    def on_decode(self, rids: list[str], steps: list[int], hidden: torch.Tensor) -> None:
        """Decode rows the adapter sampled: hidden [len(rids), d] (host); steps = tokens decoded so
        far per request. Which steps are sampled is the adapter's choice (every k-th decode step)."""
        if not rids:
            return
        self._dec_rids += rids
        self._dec_steps += [int(s) for s in steps]
        self._dec_vecs.append(hidden)
        self.stats.decode_rows += len(rids)

    def on_finished(self, rid: str, output_tokens: int, prompt_tokens: int = 0, truncated: bool = False,
                    aborted: bool = False, max_new_tokens: int = 0) -> None:
        self.pools.pop(rid)
        self._pieces.pop(rid, None)
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
            if self.cfg.pool and len(self._pre_vecs) == len(self._pre_rids):  # not with 'last' mode rows
                batch.prefill.entropy_mean.extend(self._pre_ent)
                batch.prefill.vectors.CopyFrom(wire.encode(torch.stack(self._pre_vecs), self._dtype))
            # the last prompt token's state rides along: it is free (already on the host) and feeds
            # the "last" head, which beats EGTP on small models (docs/results/accuracy.md)
            batch.prefill.last_vectors.CopyFrom(wire.encode(torch.cat(self._pre_last), self._dtype))
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
