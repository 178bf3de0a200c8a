"""prefix-affinity-scorer: prefer replicas that recently served the same prompt prefix."""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Sequence

from pydantic import Field

from lenpred.router.interfaces import PluginParameters, ReplicaView, RequestView, Scorer


class PrefixAffinityParameters(PluginParameters):
    block_chars: int = Field(256, ge=16)
    """Prompt characters per hashed block (the router has no tokenizer; ~64 tokens)."""
    max_blocks: int = Field(64, ge=1)
    """Blocks hashed per prompt: prefixes beyond max_blocks x block_chars count as one match."""
    capacity: int = Field(100_000, ge=1)
    """Block hashes remembered (LRU); bounds memory."""


class PrefixAffinityScorer(Scorer):
    """Approximate prefix-cache awareness: chained hashes of fixed-size prompt blocks, each mapped to
    the replicas it was sent to. Score = fraction of the prompt's leading blocks a replica has seen,
    which tracks the SGLang radix-cache hit it would get (as long as the engine has not evicted)."""

    Parameters = PrefixAffinityParameters
    params: PrefixAffinityParameters

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._seen: OrderedDict[bytes, set[str]] = OrderedDict()

    def _blocks(self, text: str) -> list[bytes]:
        n = self.params.block_chars
        out, h = [], b""
        for i in range(0, min(len(text), n * self.params.max_blocks) - n + 1, n):
            h = hashlib.blake2b(h + text[i:i + n].encode(), digest_size=8).digest()
            out.append(h)
        return out

    def score(self, req: RequestView, replicas: Sequence[ReplicaView]) -> dict[str, float]:
        blocks = self._blocks(req.prompt_text)
        scores = {r.name: 0.0 for r in replicas}
        if not blocks:
            return scores
        for name in scores:
            hits = 0
            for b in blocks:
                if name not in self._seen.get(b, ()):
                    break
                hits += 1
            scores[name] = hits / len(blocks)
        return scores

    def on_dispatch(self, req: RequestView, replica: str) -> None:
        for b in self._blocks(req.prompt_text):
            self._seen.setdefault(b, set()).add(replica)
            self._seen.move_to_end(b)
        while len(self._seen) > self.params.capacity:
            self._seen.popitem(last=False)
