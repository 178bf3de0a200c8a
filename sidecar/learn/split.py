"""Which split (train / val / test) a live request belongs to, without the prompt text.

The tap does not send prompt text or token ids, so the split group is built from what arrives
exactly the same for every request of one prompt: the prompt length in tokens, plus (optional)
`bits` sign bits of fixed random projections of the last prompt token's state. With bits = 0
(default) the group is exact: samples of one prompt always share a split, at the price of grouping
different prompts of equal length (they land in the same split together, which never leaks). Sign
bits spread groups further, but engine numerics differ slightly between batches (bf16), so a bit
near zero can flip between two samples of one prompt and send them to different splits: use them
only where the engine is batch-invariant (the replay harness sends identical vectors). A prompt
hash on the wire would replace all this (`prompt_hash`).
"""
from __future__ import annotations

import numpy as np

from lenpred.train.data import split_of


def _planes(d: int, bits: int) -> np.ndarray:
    return np.random.default_rng(12345).standard_normal((bits, d)).astype(np.float32)


def split_group(prompt_tokens: int, last: np.ndarray | None, bits: int = 0, prompt_hash: int | None = None) -> str:
    if prompt_hash is not None:
        return f"h{prompt_hash:x}"
    g = f"n{int(prompt_tokens)}"
    if bits and last is not None:
        x = np.asarray(last, np.float32)
        code = (_planes(x.shape[-1], bits) @ x > 0).astype(np.uint8)
        g += "s" + "".join(map(str, code.tolist()))
    return g


def split_for(group: str, seed: int = 0, frac=(0.7, 0.15, 0.15)) -> str:
    return split_of(group, seed, frac)
