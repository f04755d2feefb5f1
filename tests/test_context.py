"""Context parallelism's attention (parallel/context.py) against one process's, in fp32."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_distributed

from parallel.context import chunk_positions, context_attention, local_chunks
from parallel.tensor_parallel import TensorParallel

B, HQ, HKV, T, D = 2, 4, 2, 16, 8


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (HQ, HKV, HKV))
    segments = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16])  # documents across the chunk borders
    grad = torch.randn(B, HQ, T, D, generator=g)
    return q, k, v, segments, grad


def _reference(segments=None):
    q, k, v, seg, grad = _inputs()
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    if segments:
        mask = (mask[None] & (seg[:, :, None] == seg[:, None, :]))[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _on_context_ranks(rank, world_size, documents):
    cp = TensorParallel(dist.group.WORLD, rank, world_size)
    q, k, v, seg, grad = _inputs()
    q, k, v = (local_chunks(t, cp, dim=2).clone().requires_grad_() for t in (q, k, v))
    out = context_attention(q, k, v, cp, T, segments=seg if documents else None, gqa=True)
    out.backward(local_chunks(grad, cp, dim=2))
    return chunk_positions(T, cp), out.detach(), q.grad, k.grad, v.grad


def test_chunks_pair_an_early_and_a_late_one_and_cover_the_sequence():
    for size in (1, 2, 4):
        held = [chunk_positions(T, TensorParallel(None, r, size)) for r in range(size)]
        assert sorted(torch.cat(held).tolist()) == list(range(T))
        if size > 1:  # causal work per rank: the number of (query, key <= query) pairs is the same
            assert len({int((p + 1).sum()) for p in held}) == 1
    with pytest.raises(ValueError, match="not divisible by 2 x context degree 3"):
        chunk_positions(T, TensorParallel(None, 0, 3))


@pytest.mark.parametrize("size,documents", [(2, False), (4, True)])
def test_attention_over_context_ranks_equals_one_process(size, documents):
    """Outputs and the gradients of q, k, v on each rank's positions equal one process's
    within 1e-6, with documents crossing the chunk borders in one case."""
    expected = _reference(documents)
    for positions, *got in run_distributed(_on_context_ranks, size, documents):
        for mine, full in zip(got, expected):
            assert torch.allclose(mine, full.index_select(2, positions), atol=1e-6)
