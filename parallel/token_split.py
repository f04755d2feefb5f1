"""An item that is not tensor-parallel (the MoE item: launcher/model/moe.py) splits its
tokens over the tp ranks instead: each rank computes its T/tp positions with whole weights.
Without sequence parallelism the residual stream is replicated, so the item takes its
positions on the way in (`shard_sequence`) and all-gathers them on the way out
(`gather_sequence`); with it, the stream is already split and neither is needed.
"""

from __future__ import annotations

import torch

# the all-gather along the sequence that sequence parallelism uses, shared rather than repeated
from parallel.tensor_parallel import SEQ_DIM, TensorParallel, _gather_sequence


class _ShardSequence(torch.autograd.Function):
    """A replicated (B, T, ..) -> this rank's (B, T/tp, ..) positions; backward all-gathers
    the gradient (each rank's gradient covers its own positions only)."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        start, length = tp.shard(x.shape[SEQ_DIM])
        return x.narrow(SEQ_DIM, start, length).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _gather_sequence(grad.contiguous(), ctx.tp), None


class _GatherSequence(torch.autograd.Function):
    """(B, T/tp, ..) shards -> the replicated (B, T, ..); backward keeps this rank's
    positions of the gradient, which without sequence parallelism is the same on every rank."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _gather_sequence(x, tp)

    @staticmethod
    def backward(ctx, grad):
        start, length = ctx.tp.shard(grad.shape[SEQ_DIM])
        return grad.narrow(SEQ_DIM, start, length).contiguous(), None


def shard_sequence(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Replicated hidden states -> this tp rank's T/tp positions (no communication forward):
    an item that is not tensor-parallel (MoE) splits its tokens over the tp ranks instead."""
    return _ShardSequence.apply(x, tp) if tp.size > 1 else x


def gather_sequence(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """The inverse of `shard_sequence`: every rank's positions, replicated again."""
    return _GatherSequence.apply(x, tp) if tp.size > 1 else x
