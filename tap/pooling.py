"""Entropy-weighted prompt pooling (EGTP input), computed as a running, numerically stable
softmax-weighted sum so that a prompt split across batches gives the same vector as one pass.

For prompt positions i with final-layer hidden state h_i and next-token entropy H_i:

    pool = sum_i softmax_i(H_i / tau) * h_i

Chunked prefill spreads one prompt over several engine steps and the radix cache skips the cached
prefix, so a request's pool is built from *pieces*. Each piece is summarised as (m, z, acc):
m = max H/tau, z = sum exp(H/tau - m), acc = sum exp(H/tau - m) * h. Two summaries merge exactly
(the log-sum-exp trick), in any order, so the result is invariant to how the prompt was cut.

The same functions serve the engine (segment-batched, on the engine's device) and the offline
collector, so training and serving features cannot drift.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch


def token_entropy(logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) per row, in float32, `chunk` rows at a time so the
    full-vocabulary temporaries stay bounded for long prompts."""
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for s in range(0, logits.shape[0], chunk):
        lg = logits[s : s + chunk].float()
        logp = torch.log_softmax(lg, dim=-1)
        out[s : s + chunk] = -(logp.exp() * logp).sum(-1)
    return out


@dataclass
class PoolState:
    """Mergeable summary of a set of prompt positions."""

    m: torch.Tensor  # [] running max of H/tau
    z: torch.Tensor  # [] sum of exp(H/tau - m)
    acc: torch.Tensor  # [d] sum of exp(H/tau - m) * h
    sum_h: torch.Tensor  # [d] plain sum (mean-pool baseline)
    last: torch.Tensor  # [d] last position's state (last-token baseline)
    n: int = 0
    entropy_sum: float = 0.0

    def merge(self, other: "PoolState") -> "PoolState":
        """Merge a later piece (`other` comes after `self` in the prompt)."""
        m = torch.maximum(self.m, other.m)
        a, b = torch.exp(self.m - m), torch.exp(other.m - m)
        return PoolState(
            m=m,
            z=self.z * a + other.z * b,
            acc=self.acc * a + other.acc * b,
            sum_h=self.sum_h + other.sum_h,
            last=other.last,
            n=self.n + other.n,
            entropy_sum=self.entropy_sum + other.entropy_sum,
        )

    def pooled(self) -> torch.Tensor:
        return self.acc / self.z

    def mean(self) -> torch.Tensor:
        return self.sum_h / max(self.n, 1)

    def to(self, device: str | torch.device) -> "PoolState":
        return PoolState(self.m.to(device), self.z.to(device), self.acc.to(device),
                         self.sum_h.to(device), self.last.to(device), self.n, self.entropy_sum)


def merge_states(states: list[PoolState]) -> PoolState:
    """Merge pieces given in prompt order, vectorised (restoring a long cached prefix merges many
    blocks at once)."""
    if len(states) == 1:
        return states[0]
    m = torch.stack([s.m for s in states])
    top = m.max()
    w = torch.exp(m - top)
    return PoolState(m=top, z=(torch.stack([s.z for s in states]) * w).sum(0),
                     acc=w @ torch.stack([s.acc for s in states]),
                     sum_h=torch.stack([s.sum_h for s in states]).sum(0), last=states[-1].last,
                     n=sum(s.n for s in states), entropy_sum=sum(s.entropy_sum for s in states))


def summarize(hidden: torch.Tensor, entropy: torch.Tensor, tau: float = 1.0) -> PoolState:
    """Summary of one contiguous piece: hidden [n, d], entropy [n]."""
    h = hidden.float()
    s = entropy.float() / tau
    m = s.max()
    w = torch.exp(s - m)
    return PoolState(m=m, z=w.sum(), acc=w @ h, sum_h=h.sum(0), last=h[-1].clone(),
                     n=int(h.shape[0]), entropy_sum=float(entropy.float().sum()))


def host_index(values) -> torch.Tensor:
    """Default `stage` for segment_stats: an int64 tensor on the host."""
    return torch.as_tensor(values, dtype=torch.int64)


def segment_stats(hidden: torch.Tensor, entropy: torch.Tensor, lengths: list[int],
                  tau: float = 1.0, stage=None) -> torch.Tensor:
    """Summaries of consecutive segments of a flattened batch, packed as one fp32 tensor
    [k, 3 + 3d] = (m, z, entropy sum, acc[d], sum_h[d], last[d]) per segment (`unpack_stats`), in a
    handful of vectorised ops on the tensors' device. `stage(list[int]) -> int64 tensor on the
    device` moves the small index vectors there; on CUDA the engine adapter passes a pinned,
    non-blocking copy so that nothing here synchronises with the device (a plain
    `torch.tensor(..., device="cuda")` would wait for the forward pass to finish). One packed
    tensor means one device->host copy."""
    dev = hidden.device
    stage = stage or host_index
    h = hidden.float()
    s = entropy.float() / tau
    k = len(lengths)
    n = int(sum(lengths))
    seg = torch.repeat_interleave(torch.arange(k, device=dev), stage(lengths).to(dev), output_size=n)
    m = torch.full((k,), float("-inf"), device=dev).scatter_reduce(0, seg, s, "amax", include_self=True)
    w = torch.exp(s - m[seg])
    out = torch.empty(k, 3 + 3 * h.shape[1], dtype=torch.float32, device=dev)
    d = h.shape[1]
    out[:, 0] = m
    out[:, 1] = torch.zeros(k, device=dev).index_add_(0, seg, w)
    out[:, 2] = torch.zeros(k, device=dev).index_add_(0, seg, entropy.float())
    out[:, 3:3 + d] = torch.zeros(k, d, device=dev).index_add_(0, seg, h * w[:, None])
    out[:, 3 + d:3 + 2 * d] = torch.zeros(k, d, device=dev).index_add_(0, seg, h)
    ends = list(itertools.accumulate(lengths))
    out[:, 3 + 2 * d:] = h.index_select(0, stage([e - 1 for e in ends]).to(dev))
    return out


def unpack_stats(packed: torch.Tensor, lengths: list[int]) -> list["PoolState"]:
    """PoolStates from `segment_stats` output (typically after it was copied to the host)."""
    d = (packed.shape[1] - 3) // 3
    ent = packed[:, 2].tolist()
    return [PoolState(packed[i, 0], packed[i, 1], packed[i, 3:3 + d], packed[i, 3 + d:3 + 2 * d],
                      packed[i, 3 + 2 * d:], int(lengths[i]), ent[i])
            for i in range(len(lengths))]


def block_pieces(prefix: int, n: int, block: int) -> list[tuple[int, int]]:
    """(block index, rows) of the pieces that prompt positions [prefix, prefix + n) cut into when
    blocks are [j*block, (j+1)*block): the first and last piece may be partial."""
    out, pos, end = [], prefix, prefix + n
    while pos < end:
        j = pos // block
        stop = min(end, (j + 1) * block)
        out.append((j, stop - pos))
        pos = stop
    return out


def summarize_segments(hidden: torch.Tensor, entropy: torch.Tensor, lengths: list[int],
                       tau: float = 1.0) -> list[PoolState]:
    """Summaries of consecutive segments of a flattened batch (one per request) in a handful of
    vectorised ops on the tensors' device — no per-token Python loop on the engine's hot path."""
    if not lengths:
        return []
    return unpack_stats(segment_stats(hidden, entropy, lengths, tau).cpu(), lengths)


@dataclass
class RunningPools:
    """Per-request running pools, keyed by request id (the engine's rid)."""

    tau: float = 1.0
    states: dict[str, PoolState] = field(default_factory=dict)

    def add(self, rid: str, piece: PoolState) -> None:
        prev = self.states.get(rid)
        self.states[rid] = piece if prev is None else prev.merge(piece)

    def pop(self, rid: str) -> PoolState | None:
        return self.states.pop(rid, None)

    def __contains__(self, rid: str) -> bool:
        return rid in self.states

    def __len__(self) -> int:
        return len(self.states)


def pool_direct(hidden: torch.Tensor, entropy: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Reference: softmax(H/tau)-weighted sum computed in one pass (used by tests/eval)."""
    w = torch.softmax(entropy.double() / tau, dim=0)
    return (w[:, None] * hidden.double()).sum(0).float()
