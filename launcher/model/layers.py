"""The layers of the tensor-parallel Llama, as pipeline items (attention: attention.py).

    ids (B, T) -> Embedding -> [Attention, MLP] x layers -> FinalNorm -> Head -> logits shard (B, T, V/tp)

Each item maps one tensor to one tensor (hidden states (B, T, H), replicated over tp), so
DeepSpeed's PipelineModule can cut the list anywhere; the order comes from
`parallel.costs.pipeline_items`, the same list the partitioner prices. With pipeline = 1
the same specs are built into `LlamaModel`, a plain sequential module.

Document attention (packed samples): the input is `(ids, segments)`, segments (B, T) int64
the index of each position's document within its sample (non-decreasing from 0). Then every
item maps `(hidden, segments)` to `(hidden, segments)` (`carry_segments`), except the head,
which returns the logits only. DeepSpeed's pipeline engine sends such tuples between stages
and sends no gradient for the integer segments. Attention stays inside each document and
RoPE positions restart at 0 at each document start.

The tensor-parallel plan is the weight table's `tp_dim` column (launcher/model/weights.py):
`sharded_linear` builds each linear layer as the table splits it (0: column-parallel, the
output dim split; 1: row-parallel, the input dim split, its output all-reduced); the
embedding's vocabulary rows are split, and a tied head reuses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from launcher.config.schema import ModelConfig, RopeScaling
from launcher.model.documents import Segments, carry_segments
from launcher.model.weights import tp_dim
from parallel.tensor_parallel import (
    NO_TP,
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallel,
    VocabParallelEmbedding,
    block_output,
    column_parallel,
    scaled_init_std,
    sum_grad_over_tp,
)


@dataclass(frozen=True)
class BlockOptions:
    """How each transformer block runs (parallel.* and model.compile; none changes what it
    computes). `recompute`: `selective` recomputes, in backward, the regions whose
    activations are large and cheap to rebuild: each norm and the attention core (RoPE and
    SDPA); `full` is applied per pipeline item outside the blocks (LlamaModel / DeepSpeed)."""

    fused: bool = True  # q, k, v (and gate, up) as one matmul
    recompute: str = "none"  # none | selective | full
    compile: bool = False  # torch.compile each block's local compute
    context: TensorParallel = NO_TP  # context parallelism: the sequence cut over this group


def _maybe_compile(fn: Callable, options: BlockOptions) -> Callable:
    """A block's local compute between its tp collectives: compiled when asked. Collectives
    stay outside the compiled regions, so no graph break and no collective traced by dynamo."""
    return torch.compile(fn) if options.compile else fn


def _recomputed(fn: Callable, *args):
    """fn(*args), its activations rebuilt in backward instead of kept (selective recompute)."""
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def sharded_linear(name: str, in_features: int, out_features: int, tp: TensorParallel, *, seed: int,
                   std: float) -> nn.Module:
    """The linear layer `name` as the weight table (launcher/model/weights.py) splits it over
    tensor parallelism: its `tp_dim` 0 is column-parallel (output rows), 1 row-parallel
    (input columns). The table is the one place a weight's split is declared."""
    layer = {0: ColumnParallelLinear, 1: RowParallelLinear}[tp_dim(f"{name}.weight")]
    return layer(in_features, out_features, tp, seed=seed, name=name, std=std)


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, name: str, tp: TensorParallel = NO_TP):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden))
        self.weight.tp_shard_dim = None
        self.weight.logical_name = name
        sum_grad_over_tp(self.weight, tp)  # applied to sequence shards under sequence parallelism

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 (as Llama does), scale in the compute dtype
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return y * self.weight


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1's frequency scaling: a frequency whose wavelength (2 pi / freq) exceeds
    original_max_position_embeddings / low_freq_factor is divided by `factor`; one whose
    wavelength is below original_max_position_embeddings / high_freq_factor is kept; in
    between, a linear blend of the two in original_max_position_embeddings / wavelength."""
    wavelength = 2 * math.pi / inv_freq
    context = scaling.original_max_position_embeddings
    blend = (context / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - blend) * inv_freq / scaling.factor + blend * inv_freq
    long = wavelength > context / scaling.low_freq_factor
    short = wavelength < context / scaling.high_freq_factor
    return torch.where(long, inv_freq / scaling.factor, torch.where(short, inv_freq, blended))


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device,
                 scaling: Optional[RopeScaling] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, head_dim) cos and sin tables in fp32, Hugging Face's `rotate_half` layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, D); cos, sin: (T, D), or (B, 1, T, D) with per-sample positions."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class Embedding(nn.Module):
    """Pipeline item 0: token ids (B, T) -> hidden (B, T, H) (segments carried along)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, seed: int):
        super().__init__()
        self.embed = VocabParallelEmbedding(cfg.vocab, cfg.hidden, tp, seed=seed, name="embed.weight",
                                            std=cfg.init_std)

    def forward(self, ids):
        return carry_segments(lambda i, _: self.embed(i), ids)


def tied_head_forward(embedding: Embedding, x) -> torch.Tensor:
    """The output head when tied: the embedding table as a column-parallel projection."""
    return carry_segments(lambda h, _: embedding.embed.logits(h), x, last=True)


class MLP(nn.Module):
    """x + w_down(silu(w_gate x') * w_up x'), x' = norm(x): gate and up one column-parallel
    matmul (one collective at the input), w_down row-parallel (one at the output)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, seed: int, layer: int,
                 options: BlockOptions = BlockOptions()):
        super().__init__()
        self.tp, self.options = tp, options
        p = f"layers.{layer}.mlp"
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps, f"{p}.norm.weight", tp)
        self.w_gate = sharded_linear(f"{p}.w_gate", cfg.hidden, cfg.ffn, tp, seed=seed, std=cfg.init_std)
        self.w_up = sharded_linear(f"{p}.w_up", cfg.hidden, cfg.ffn, tp, seed=seed, std=cfg.init_std)
        self.w_down = sharded_linear(f"{p}.w_down", cfg.ffn, cfg.hidden, tp, seed=seed,
                                     std=scaled_init_std(cfg.init_std, cfg.layers))
        self._normed = _maybe_compile(self.norm.forward, options)  # a method: not registered as a submodule
        self._down = _maybe_compile(self._swiglu_down, options)

    def forward(self, x):
        return carry_segments(self._mlp, x)

    def _mlp(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        h = _recomputed(self._normed, x) if self.options.recompute == "selective" else self._normed(x)
        gate, up = column_parallel(h, [self.w_gate.weight, self.w_up.weight], self.tp, self.options.fused)
        return x + block_output(self._down(gate, up), self.tp)  # (B, T, ffn/tp) inside

    def _swiglu_down(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(gate) * up, self.w_down.weight)


class FinalNorm(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = NO_TP):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps, "norm.weight", tp)

    def forward(self, x):
        return carry_segments(lambda h, _: self.norm(h), x)


class Head(nn.Module):
    """Untied output head: hidden (B, T, H) -> this rank's logits shard (B, T, V/tp)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, seed: int):
        super().__init__()
        self.proj = sharded_linear("head", cfg.hidden, cfg.vocab, tp, seed=seed, std=cfg.init_std)

    def forward(self, x):
        return carry_segments(lambda h, _: self.proj(h), x, last=True)
