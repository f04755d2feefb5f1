"""Tensor-parallel layers (Megatron-style): column/row-parallel linears, a vocab-parallel
embedding and a vocab-parallel cross-entropy, so full-vocabulary logits never exist on one
rank.

Why by hand and not torch's DTensor `parallelize_module`: DeepSpeed's ZeRO and pipeline
engine flatten and partition plain `torch.Tensor` parameters and do not accept DTensors, and
DeepSpeed's own AutoTP targets inference and a global mpu. These ~150 lines are the standard
pattern, with explicit groups (no module-level state).

Every parameter carries `logical_name` (its full tensor's name, launcher/model/weights.py, for
loading and exporting weights in any layout); every sharded one `tp_shard_dim` (the
dimension split over tp) and
`tensor_model_parallel = True` (what DeepSpeed's grad-norm checks look for to avoid counting
replicated parameters tp times).

Initialisation is layout independent: each parameter draws its *full* tensor from a
generator seeded by (seed, logical name), then keeps its own slice, so the same seed gives
the same full weights for any tp and pp.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from parallel.costs import LOSS_CHUNK_ELEMENTS  # logits elements per chunk of the loss


@dataclass(frozen=True)
class TensorParallel:
    """This rank's tensor-parallel group; `group=None` with size 1 means no tp.
    `sequence_parallel`: between blocks the residual stream (and the norms on it) is split
    along the sequence over the group (Korthikanti et al. 2022), see `column_parallel`."""

    group: Any = None
    rank: int = 0
    size: int = 1
    sequence_parallel: bool = False

    @property
    def splits_sequence(self) -> bool:
        return self.sequence_parallel and self.size > 1

    def shard(self, n: int) -> tuple[int, int]:
        """(start, length) of this rank's contiguous share of n items."""
        per = n // self.size
        return self.rank * per, per


NO_TP = TensorParallel()


def _all_reduce(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    if tp.size > 1:
        dist.all_reduce(x, group=tp.group)
    return x


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward; identity backward (output of a row-parallel op)."""

    @staticmethod
    def forward(ctx, x, tp):
        return _all_reduce(x.contiguous(), tp)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


SEQ_DIM = 1  # hidden states are (B, T, H)


def _start_gather_sequence(x: torch.Tensor, tp: TensorParallel, async_op: bool = False):
    """All-gather of (B, T/tp, ..) shards along the sequence: (buffer, work); the result is
    `_sequence_last(buffer)` once work is done. all_gather_single concatenates along dim 0,
    so the sequence goes first: the transposes are views when B = 1 (the usual large-model
    micro-batch) and copies otherwise (Megatron keeps (T, B, H) throughout)."""
    local = x.transpose(0, SEQ_DIM).contiguous()
    out = local.new_empty((local.shape[0] * tp.size, *local.shape[1:]))
    return out, dist.all_gather_single(out, local, group=tp.group, async_op=async_op)


def _start_reduce_scatter_sequence(x: torch.Tensor, tp: TensorParallel, async_op: bool = False):
    """(B, T, ..) partial sums -> (buffer, work) for this rank's (B, T/tp, ..) share of their sum."""
    full = x.transpose(0, SEQ_DIM).contiguous()
    out = full.new_empty((full.shape[0] // tp.size, *full.shape[1:]))
    return out, dist.reduce_scatter_single(out, full, group=tp.group, async_op=async_op)


def _sequence_last(buffer: torch.Tensor) -> torch.Tensor:
    return buffer.transpose(0, SEQ_DIM).contiguous()  # the residual stream (and pipeline sends) stay dense


def _gather_sequence(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """(B, T/tp, ..) shards -> (B, T, ..), in rank order."""
    return _sequence_last(_start_gather_sequence(x, tp)[0])


def _reduce_scatter_sequence(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """(B, T, ..) partial sums -> this rank's (B, T/tp, ..) share of their sum."""
    return _sequence_last(_start_reduce_scatter_sequence(x, tp)[0])


class _ReduceScatterSequence(torch.autograd.Function):
    """Reduce-scatter along the sequence forward; all-gather of the gradient backward."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _reduce_scatter_sequence(x, tp)

    @staticmethod
    def backward(ctx, grad):
        return _gather_sequence(grad, ctx.tp), None


def block_output(y: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """A row-parallel matmul's (or the vocab-parallel embedding's) partial sums -> the
    residual stream's layout: all-reduced (replicated), or with sequence parallelism
    reduce-scattered along the sequence (each rank keeps T/tp positions)."""
    if tp.size == 1:
        return y
    return _ReduceScatterSequence.apply(y, tp) if tp.splits_sequence else _ReduceFromTP.apply(y, tp)


def sum_grad_over_tp(param: nn.Parameter, tp: TensorParallel, always: bool = False) -> None:
    """With sequence parallelism a replicated weight applied to sequence shards (the norms)
    gets a partial gradient on each tp rank: sum it over tp as it is produced (a hook on the
    parameter, before accumulation, so gradient accumulation stays exact). `always`: a
    weight applied to sequence shards whether or not the residual stream is split (MoE)."""
    if tp.splits_sequence or (always and tp.size > 1):
        param.register_hook(lambda grad: _all_reduce(grad.contiguous(), tp))



class _ColumnParallel(torch.autograd.Function):
    """The column-parallel matmuls that read one block input: x @ W_i^T for each weight.

    One collective per block input, however many weights read it (Megatron's placement):
    without sequence parallelism the input gradient is all-reduced once in backward; with
    it the sequence shards are all-gathered forward and the input gradient
    reduce-scattered backward. Like Megatron, only the local shard is saved: backward
    gathers it again, so the full-sequence input is never kept between forward and backward.

    `fused`: the weights stay separate parameters (same names and checkpoints, HF interop
    unchanged) but run as one matmul on their concatenation; the concatenation lives only
    for the matmul (backward rebuilds it), so fusing costs no activation memory."""

    @staticmethod
    def forward(ctx, x, tp, fused, *weights):
        ctx.tp, ctx.fused = tp, fused
        ctx.save_for_backward(x, *weights)
        full = _gather_sequence(x, tp) if tp.splits_sequence else x
        if fused:
            return tuple(nn.functional.linear(full, torch.cat(weights)).split([w.shape[0] for w in weights], dim=-1))
        return tuple(nn.functional.linear(full, w) for w in weights)

    @staticmethod
    def backward(ctx, *grads):
        # Megatron's overlap: the re-gather of the input runs while the input gradient is
        # computed (it needs only the weights), and the input gradient's reduction while the
        # weight gradient is computed.
        x, *weights = ctx.saved_tensors
        tp = ctx.tp
        if tp.splits_sequence:
            gathered, gathering = _start_gather_sequence(x, tp, async_op=True)
        if ctx.fused:
            grad = torch.cat(grads, dim=-1)
            grad_x = grad @ torch.cat(weights)
        else:
            grad_x = sum(g @ w for g, w in zip(grads, weights))
        reducing = None
        if tp.splits_sequence:
            grad_x, reducing = _start_reduce_scatter_sequence(grad_x, tp, async_op=True)
            gathering.wait()
            full = _sequence_last(gathered)
        else:
            full = x
            if tp.size > 1:
                grad_x = grad_x.contiguous()
                reducing = dist.all_reduce(grad_x, group=tp.group, async_op=True)
        flat_x = full.reshape(-1, full.shape[-1])
        if ctx.fused:
            grad_w = (grad.reshape(-1, grad.shape[-1]).t() @ flat_x).split([w.shape[0] for w in weights])
        else:
            grad_w = [g.reshape(-1, g.shape[-1]).t() @ flat_x for g in grads]
        if reducing is not None:
            reducing.wait()
        if tp.splits_sequence:
            grad_x = _sequence_last(grad_x)
        return (grad_x, None, None, *grad_w)


def column_parallel(x: torch.Tensor, weights: list[torch.Tensor], tp: TensorParallel,
                    fused: bool = True) -> tuple[torch.Tensor, ...]:
    """x @ W^T for each column-parallel weight (out/tp rows) reading block input x: (B, T, H)
    replicated, or (B, T/tp, H) with sequence parallelism -> one (B, T, out_i/tp) per weight."""
    return _ColumnParallel.apply(x, tp, fused, *weights)


def name_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one logical parameter (independent of layout and process)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_shard(full_shape: tuple[int, ...], std: float, seed: Optional[int], name: str,
               shard_dim: Optional[int], tp: TensorParallel) -> torch.Tensor:
    """Normal(0, std) init of the full tensor, keeping this rank's slice along shard_dim.
    Drawn on CPU in fp32 so every layout and device type gets the same numbers. `seed=None`:
    the slice uninitialised (its values are about to be loaded, e.g. model.init_from), so no
    rank draws, nor holds, the full tensor."""
    if seed is None:
        shape = list(full_shape)
        if shard_dim is not None and tp.size > 1:
            shape[shard_dim] = tp.shard(full_shape[shard_dim])[1]
        return torch.empty(shape)
    gen = torch.Generator().manual_seed(name_seed(seed, name))
    full = torch.empty(full_shape).normal_(0.0, std, generator=gen)
    if shard_dim is None or tp.size == 1:
        return full
    start, length = tp.shard(full_shape[shard_dim])
    return full.narrow(shard_dim, start, length).clone()


def _sharded_param(data: torch.Tensor, shard_dim: Optional[int], tp: TensorParallel, name: str) -> nn.Parameter:
    param = nn.Parameter(data)
    param.tp_shard_dim = shard_dim
    param.logical_name = weight_name(name)
    if shard_dim is not None and tp.size > 1:
        param.tensor_model_parallel = True
    return param


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by output rows: (.., in) replicated -> (.., out/tp) sharded."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, *,
                 seed: int, name: str, std: float):
        super().__init__()
        self.tp = tp
        self.weight = _sharded_param(init_shard((out_features, in_features), std, seed, name, 0, tp), 0, tp, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return column_parallel(x, [self.weight], self.tp)[0]


class RowParallelLinear(nn.Module):
    """y = x W^T with W split by input columns: (.., in/tp) sharded -> (.., out) replicated."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, *,
                 seed: int, name: str, std: float):
        super().__init__()
        self.tp = tp
        self.weight = _sharded_param(init_shard((out_features, in_features), std, seed, name, 1, tp), 1, tp, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_output(nn.functional.linear(x, self.weight), self.tp)


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; each rank looks up the ids it owns and the
    partial results are summed over tp. Its weight doubles as the (tied) output head."""

    def __init__(self, vocab: int, hidden: int, tp: TensorParallel, *, seed: int, name: str, std: float):
        super().__init__()
        self.tp = tp
        self.vocab_start, self.vocab_per_rank = tp.shard(vocab)
        self.weight = _sharded_param(init_shard((vocab, hidden), std, seed, name, 0, tp), 0, tp, name)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return nn.functional.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_per_rank)
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return block_output(out, self.tp)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Tied output head: (.., hidden) -> this rank's vocab shard of the logits."""
        return column_parallel(x, [self.weight], self.tp)[0]




def _row_chunks(rows: int, width: int) -> list[tuple[int, int]]:
    per = max(1, LOSS_CHUNK_ELEMENTS // max(width, 1))
    return [(start, min(start + per, rows)) for start in range(0, rows, per)]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over vocab-sharded logits (B, T, V/tp) without gathering them, in
    chunks of tokens so that its own memory is one fp32 chunk, not fp32 copies of the
    logits shard (written by hand: torch's cross_entropy needs the full vocabulary row).

    Forward, one pass: per chunk, each token's local max m, sum of exp(logit - m) and the
    target's logit (0 where another rank owns it); then one MAX all-reduce of m and one SUM
    all-reduce of (sum * exp(m - M), target logit) give the global log-sum-exp. Saved for
    backward: the logits (already in memory) and the log-sum-exp per token. Backward is
    local, chunk by chunk: softmax rebuilt from the log-sum-exp, minus the one-hot."""

    @staticmethod
    def forward(ctx, logits, targets, tp, vocab_start):
        width = logits.shape[-1]
        flat = logits.reshape(-1, width)
        local_t = targets.reshape(-1) - vocab_start
        outside = (local_t < 0) | (local_t >= width)
        safe_t = local_t.masked_fill(outside, 0)
        rows = flat.shape[0]
        local_max = torch.empty(rows, dtype=torch.float32, device=flat.device)
        sums = torch.empty(2, rows, dtype=torch.float32, device=flat.device)  # sum of exp, target logit
        for start, end in _row_chunks(rows, width):
            chunk = flat[start:end].float()
            m = chunk.max(dim=-1).values
            local_max[start:end] = m
            sums[0, start:end] = (chunk - m.unsqueeze(-1)).exp_().sum(dim=-1)
            sums[1, start:end] = chunk.gather(-1, safe_t[start:end].unsqueeze(-1)).squeeze(-1)
        sums[1].masked_fill_(outside, 0.0)
        global_max = local_max.clone()
        if tp.size > 1:
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp.group)
        sums[0].mul_((local_max - global_max).exp_())
        _all_reduce(sums, tp)
        lse = sums[0].log_().add_(global_max)
        ctx.save_for_backward(logits, lse, safe_t, outside)
        return (lse - sums[1]).view(targets.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, lse, safe_t, outside = ctx.saved_tensors
        width = logits.shape[-1]
        flat = logits.reshape(-1, width)
        grad_flat = grad_loss.reshape(-1).float()
        grad = torch.empty_like(flat)
        for start, end in _row_chunks(flat.shape[0], width):
            g = (flat[start:end].float() - lse[start:end].unsqueeze(-1)).exp_()  # softmax (a new tensor: never the logits)
            inside = (~outside[start:end]).to(g.dtype).unsqueeze(-1)
            g.scatter_add_(-1, safe_t[start:end].unsqueeze(-1), -inside)
            grad[start:end] = g.mul_(grad_flat[start:end].unsqueeze(-1))
        return grad.view_as(logits), None, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, targets: torch.Tensor,
                                 tp: TensorParallel) -> torch.Tensor:
    """Per-token loss (B, T) from this rank's logits shard (B, T, V/tp) and full targets."""
    vocab_start = tp.rank * logits_shard.shape[-1]
    return _VocabParallelCrossEntropy.apply(logits_shard, targets, tp, vocab_start)


def gather_shards(t: torch.Tensor, dim: int, tp: TensorParallel) -> torch.Tensor:
    """All-gather a tp-sharded tensor along dim (for tests, export and inspection)."""
    if tp.size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(tp.size)]
    dist.all_gather(parts, t.contiguous(), group=tp.group)
    return torch.cat(parts, dim=dim)


def weight_name(name: str) -> str:
    """The logical name of a layer's weight (launcher/model/weights.py) from the name its init is
    seeded with: 'layers.0.attention.wq' -> 'layers.0.attention.wq.weight'. The linears' seed
    names predate the logical names; they are kept so every run's initial weights stay the same."""
    return name if name.endswith(".weight") else f"{name}.weight"


def scaled_init_std(base_std: float, layers: int) -> float:
    """Std for projections that write into the residual stream (GPT-2 / Megatron)."""
    return base_std / math.sqrt(2.0 * layers)
