"""Entropy maths of the tap under tensor parallelism, with a real 2-process gloo group on the CPU.

SGLang shards the LM head by vocabulary rows; each rank computes per-row (max, sum e^(l-max),
sum e^(l-max)(l-max)) over its shard and the ranks all-gather those 3 numbers (never logits). These
tests run that exact code (`lenpred.tap.entropy.prompt_entropy` with a `gather` that is a real
`torch.distributed.all_gather_into_tensor`) in two processes and compare with one process holding
the whole head: full vocabulary, a vocabulary slice that ends inside rank 0's shard (rank 1 then
contributes nothing but must still join every collective), and shards of unequal size (padding).
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lenpred.tap.entropy import prompt_entropy
from lenpred.tap.pooling import token_entropy

D, V, ROWS = 64, 1000, 37
BUDGET = 4 * 300 * 5  # small chunks: several collectives per call


def data():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(ROWS, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.3
    return h, w


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, cut: int, vocab: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        h, w = data()
        shard, offset = (w[:cut], 0) if rank == 0 else (w[cut:], cut)

        def gather(x: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(x) for _ in range(2)]
            dist.all_gather(parts, x)
            return torch.cat(parts, 0)

        ent = prompt_entropy(h, shard, vocab=vocab, vocab_offset=offset, gather=gather,
                             chunk_width=vocab or max(cut, V - cut), budget_bytes=BUDGET)
        out[rank] = ent
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cut,vocab", [
    (500, 0),      # even shards, full vocabulary
    (600, 0),      # uneven shards (the last shard of a padded vocabulary is shorter)
    (500, 300),    # slice inside rank 0's shard: rank 1 holds no id of it
    (500, 700),    # slice spanning both shards
])
def test_sharded_entropy_over_a_real_process_group(cut, vocab):
    h, w = data()
    with mp.Manager() as m:
        out = m.dict()
        mp.spawn(_rank, args=(free_port(), cut, vocab, out), nprocs=2, join=True)
        got = {k: v.clone() for k, v in out.items()}
    ref = token_entropy(h @ (w[:vocab] if vocab else w).t())
    for rank in (0, 1):  # every rank ends with the same, exact entropies
        assert torch.allclose(got[rank], ref, atol=1e-4), (rank, (got[rank] - ref).abs().max())


def test_single_process_slice_and_chunking():
    h, w = data()
    for vocab in (0, 1, 300, V, 5 * V):
        ref = token_entropy(h @ (w[:vocab] if vocab else w).t())
        assert torch.allclose(prompt_entropy(h, w, vocab=vocab, budget_bytes=BUDGET), ref, atol=1e-4), vocab
    assert prompt_entropy(h[:0], w).shape == (0,)
