"""Next-token entropy of prompt positions from the final hidden states and the LM head.

SGLang computes logits only for the last prompt token, so the tap recomputes them for every prompt
row it pools: logits = h @ W.T. Over a full vocabulary that is ~6.5% of an 8B model's FLOPs and a
pass over a [rows, vocab] fp32 buffer, so by default the tap uses a *vocabulary slice*: the first
`vocab` ids of the (BPE, roughly frequency-ordered) vocabulary. The entropy is that of the
distribution renormalised over the slice; only its role as a pooling weight matters, and the pooled
vector stays at cosine >= 0.997 to the full-vocabulary one on real models (docs/results, `lenpred
bench entropy`). `vocab=0` computes the exact entropy.

Tensor parallelism shards the LM head by vocabulary rows. Entropy = log Z - E_p[l] is assembled from
per-shard (max, sum e^(l-max), sum e^(l-max)*(l-max)), so ranks all-gather 3 numbers per row
(`gather`), never logits. A rank whose shard lies outside the slice contributes nothing (z = 0).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

LOGITS_BUDGET_BYTES = 128 << 20  # fp32 logits materialised per chunk of rows


def local_slice(weight: torch.Tensor, vocab: int, vocab_offset: int = 0) -> torch.Tensor:
    """The rows of this rank's LM-head shard whose global token id is < `vocab` (all rows for 0).
    `vocab_offset` = global id of the shard's first row (rank * shard size under TP)."""
    if vocab <= 0:
        return weight
    n = max(0, min(weight.shape[0], vocab - vocab_offset))
    return weight[:n]


def _combine(parts: torch.Tensor) -> torch.Tensor:
    """parts [shards, 3, rows] = per-shard (m, z, t) -> entropy [rows]; empty shards have z = 0."""
    m, z, t = parts[:, 0], parts[:, 1], parts[:, 2]
    live = z > 0
    m = torch.where(live, m, torch.full_like(m, float("-inf")))
    mm = m.amax(0)
    sc = torch.where(live, torch.exp(m - mm), torch.zeros_like(m))
    zz = (z * sc).sum(0)
    # sum over shards of e^(l - M) * (l - M) = sc * (t + (m - M) * z)
    tt = (sc * (t + torch.where(live, m - mm, torch.zeros_like(m)) * z)).sum(0)
    return torch.log(zz) - tt / zz


def prompt_entropy(hidden: torch.Tensor, weight: torch.Tensor, *, vocab: int = 0, vocab_offset: int = 0,
                   logit_scale: float | None = None, softcap: float | None = None,
                   gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   chunk_width: int | None = None, budget_bytes: int = LOGITS_BUDGET_BYTES) -> torch.Tensor:
    """Entropy (nats, fp32) of softmax over the first `vocab` token ids (0 = all) of
    hidden @ weight.T for every row, a chunk of rows at a time so the fp32 logits stay within
    `budget_bytes`. `weight` = this rank's LM-head rows (a vocabulary shard under TP, whose first row
    is global id `vocab_offset`); `gather` = all-gather along dim 0 over the TP group (None for
    TP=1). Rows per chunk come from `chunk_width` (default: `vocab`, else this shard's rows); under
    TP pass a width that is equal on every rank (shards may differ by padding rows) so the
    collectives line up. Enqueues device work only: no host synchronisation."""
    n = hidden.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return out
    width = chunk_width or (vocab if vocab > 0 else weight.shape[0])
    chunk = max(1, budget_bytes // (4 * max(1, width)))
    weight = local_slice(weight, vocab, vocab_offset)
    vocab = weight.shape[0]
    for s in range(0, n, chunk):
        h = hidden[s:s + chunk]
        if vocab == 0:  # this shard holds no id of the slice
            rows = h.shape[0]
            m = torch.zeros(rows, device=h.device)
            z = torch.zeros(rows, device=h.device)
            t = torch.zeros(rows, device=h.device)
        else:
            lg = (h.to(weight.dtype) @ weight.t()).float()
            if logit_scale is not None:
                lg.mul_(logit_scale)
            if softcap:
                lg = torch.tanh(lg / softcap) * softcap
            m = lg.amax(-1)
            lg.sub_(m[:, None])             # l - m, in place (one fp32 buffer per chunk)
            e = torch.exp(lg)
            z = e.sum(-1)                   # sum e^(l-m)
            t = torch.linalg.vecdot(e, lg)  # sum e^(l-m) * (l-m)
            del lg, e
        if gather is not None:
            out[s:s + chunk] = _combine(gather(torch.stack([m, z, t], 0).unsqueeze(0).contiguous()))
        else:
            out[s:s + chunk] = torch.log(z) - t / z
    return out
