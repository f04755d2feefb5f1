"""Context parallelism's building blocks: a sequence cut over the ranks of a context group,
and causal attention across the cut.

Each sequence of T positions is cut into 2C chunks of T/2C; context rank i holds chunks i
and 2C-1-i (a early one and a late one), so that under a causal mask every rank has the same
number of (query, key) pairs to compute. Everything outside attention is per position and
runs on a rank's own T/C positions unchanged. Attention needs every earlier key: the keys
and values of the whole sequence are all-gathered over the group (grouped-query attention
makes them hidden x kv_heads / heads wide, a fraction of the queries), each rank attends its
own queries to them under a mask built from the global positions, and backward sends each
rank's gradient of the gathered keys and values back to their owner (a reduce-scatter).

Pure torch.distributed, any backend (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from parallel.tensor_parallel import TensorParallel


def chunk_positions(seq_len: int, cp: TensorParallel, device=None) -> torch.Tensor:
    """The global positions (T/C,) this context rank holds: chunks rank and 2C-1-rank of 2C,
    in that order. Built once per (seq_len, rank, size, device) and shared: read-only."""
    return _positions(seq_len, cp.rank, cp.size, None if device is None else torch.device(device))


@functools.lru_cache(maxsize=256)
def _positions(seq_len: int, rank: int, size: int, device) -> torch.Tensor:
    # cached: every attention layer of every micro-batch asks for the same few index tensors
    if size == 1:
        return torch.arange(seq_len, device=device)
    if seq_len % (2 * size):
        raise ValueError(f"seq_len {seq_len} is not divisible by 2 x context degree {size}")
    width = seq_len // (2 * size)
    first, second = rank, 2 * size - 1 - rank
    return torch.cat([torch.arange(first * width, (first + 1) * width, device=device),
                      torch.arange(second * width, (second + 1) * width, device=device)])


def local_chunks(x: torch.Tensor, cp: TensorParallel, dim: int = 1) -> torch.Tensor:
    """This rank's positions of a whole-sequence tensor (ids, targets, segments) along `dim`."""
    if cp.size == 1:
        return x
    return x.index_select(dim, chunk_positions(x.shape[dim], cp, x.device))


@functools.lru_cache(maxsize=64)
def _gather_orders(seq_len: int, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(every rank's positions, rank 0's first: the order the ranks' parts are concatenated
    in; its inverse, the order that puts the concatenation back in sequence order)."""
    rank_major = torch.cat([_positions(seq_len, r, size, device) for r in range(size)])
    return rank_major, torch.argsort(rank_major)


class _GatherSequence(torch.autograd.Function):
    """(B, H, T/C, D) of each context rank -> (B, H, T, D) in sequence order; backward: the
    sum over ranks of the whole-sequence gradient, each rank receiving its own positions'
    (one reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cp: TensorParallel, seq_len: int):
        ctx.cp, ctx.seq_len = cp, seq_len
        parts = [torch.empty_like(x) for _ in range(cp.size)]
        dist.all_gather(parts, x.contiguous(), group=cp.group)
        return torch.cat(parts, dim=2).index_select(2, _gather_orders(seq_len, cp.size, x.device)[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cp, seq_len = ctx.cp, ctx.seq_len
        B, H, _, D = grad.shape
        per_rank = grad.index_select(2, _gather_orders(seq_len, cp.size, grad.device)[0])
        per_rank = per_rank.view(B, H, cp.size, seq_len // cp.size, D).movedim(2, 0).reshape(
            cp.size * B, H, seq_len // cp.size, D)  # rank r's positions are rows r*B ... (r+1)*B - 1
        mine = torch.empty(B, H, seq_len // cp.size, D, dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_single(mine, per_rank, group=cp.group)
        return mine, None, None


def gather_sequence(x: torch.Tensor, cp: TensorParallel, seq_len: int) -> torch.Tensor:
    """x (B, heads, T/C, D) on each context rank -> (B, heads, T, D), differentiably."""
    if cp.size == 1:
        return x
    return _GatherSequence.apply(x, cp, seq_len)


def context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: TensorParallel, seq_len: int,
                      segments: Optional[torch.Tensor] = None, gqa: bool = False) -> torch.Tensor:
    """Causal attention of this rank's queries q (B, Hq, T/C, D) to the whole sequence's keys
    and values, given this rank's k, v (B, Hkv, T/C, D), RoPE already applied at the global
    positions. `segments` (B, T), whole-sequence document indices: attention also stays
    inside each document. Returns (B, Hq, T/C, D)."""
    keys, values = gather_sequence(k, cp, seq_len), gather_sequence(v, cp, seq_len)
    mine = chunk_positions(seq_len, cp, q.device)
    if q.device.type == "cuda" and q.shape[-1] >= 16:  # FlexAttention's kernels need head_dim >= 16
        return flex_context_attention(q, keys, values, mine, segments, gqa)
    return _dense_mask_attention(q, keys, values, mine, segments, gqa)


def _dense_mask_attention(q, keys, values, mine: torch.Tensor, segments: Optional[torch.Tensor],
                          gqa: bool) -> torch.Tensor:
    """SDPA under a dense boolean mask (T/C, T) or (B, 1, T/C, T): CPU runs and tests (at
    128k positions the mask alone would be gigabytes per layer: CUDA takes the flex path)."""
    mask = mine[:, None] >= torch.arange(keys.shape[2], device=q.device)[None, :]
    if segments is not None:
        same = segments.index_select(1, mine)[:, :, None] == segments[:, None, :]  # (B, T/C, T)
        mask = (mask[None] & same)[:, None]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)


@functools.cache
def compiled_flex():
    """(flex_attention, create_block_mask) compiled, once, on first use (document attention
    shares them): eager flex_attention materialises the scores; compiled it is one fused
    kernel that skips the (query, key) blocks the block mask marks empty."""
    return torch.compile(flex_attention), torch.compile(create_block_mask)


def flex_context_attention(q, keys, values, mine: torch.Tensor, segments: Optional[torch.Tensor], gqa: bool,
                           compiled: bool = True) -> torch.Tensor:
    """The same with FlexAttention: query row i is global position mine[i]; it sees key j
    when j <= mine[i] (and, with documents, j is in its document). The block mask skips the
    key blocks wholly after a query block, so a rank computes about its causal share of the
    (T/C) x T rectangle, the same on every rank (chunks i and 2C-1-i); no mask is stored.
    `compiled=False` runs it eagerly (forward only on CPU: tests)."""
    attend, block_mask_fn = compiled_flex() if compiled else (flex_attention, create_block_mask)

    if segments is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= mine[q_idx]
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= mine[q_idx]) & (segments[b, mine[q_idx]] == segments[b, kv_idx])
    batch = None if segments is None else q.shape[0]
    block_mask = block_mask_fn(mask_mod, batch, None, q.shape[2], keys.shape[2], device=q.device)
    return attend(q, keys, values, block_mask=block_mask, enable_gqa=gqa)


def cut_micro_batch(batch, cp: TensorParallel):
    """This context rank's part of one (inputs, targets) micro-batch: ids, targets and the
    loss mask cut to its positions; document segments left whole (attention needs the whole
    sequence's, launcher/model/attention.py)."""
    if cp.size == 1:
        return batch
    inputs, targets = batch
    inputs = ((local_chunks(inputs[0], cp), inputs[1]) if isinstance(inputs, (tuple, list))
              else local_chunks(inputs, cp))
    targets = (tuple(local_chunks(t, cp) for t in targets) if isinstance(targets, (tuple, list))
               else local_chunks(targets, cp))
    return inputs, targets
