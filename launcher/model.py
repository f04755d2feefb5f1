"""Tensor-parallel Llama as a flat list of pipeline items.

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

Tensor-parallel plan (column = output dim split, row = input dim split):
    attention.wq, wk, wv   column   (heads and kv heads split over tp)
    attention.wo           row      (all-reduce of the output)
    mlp.w_gate, w_up       column
    mlp.w_down             row
    embed.weight           vocab rows split; tied head reuses it
    head.weight            column over the vocabulary (logits stay sharded)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from launcher.config import ModelConfig, RopeScaling
from parallel.costs import pipeline_items
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
    vocab_parallel_cross_entropy,
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


def _maybe_compile(fn: Callable, options: BlockOptions) -> Callable:
    """A block's local compute between its tp collectives: compiled when asked. Collectives
    stay outside the compiled regions, so no graph break and no collective traced by dynamo."""
    return torch.compile(fn) if options.compile else fn


def _recomputed(fn: Callable, *args):
    """fn(*args), its activations rebuilt in backward instead of kept (selective recompute)."""
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


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


Segments = Optional[torch.Tensor]  # (B, T) int64 document index of each position, or None


def split_segments(x) -> tuple[torch.Tensor, Segments]:
    """A pipeline item's input: `hidden` (or ids), or `(hidden, segments)` (document attention)."""
    if isinstance(x, tuple):
        hidden, segments = x
        return hidden, segments
    return x, None


def carry_segments(run: Callable[[torch.Tensor, Segments], torch.Tensor], x, last: bool = False):
    """Apply run(hidden, segments) -> hidden to an item's input and hand the segments on in
    the same form, so the next item (maybe on the next stage) gets them too; the last item
    (the head) returns its output alone, which is what the loss takes."""
    hidden, segments = split_segments(x)
    out = run(hidden, segments)
    return out if segments is None or last else (out, segments)


def document_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token within its document: t minus the t where its document
    starts (a start is where the segment index changes), on the device, no host loop."""
    t = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return t - torch.where(starts, t, 0).cummax(dim=1).values


def same_document_causal(segments: torch.Tensor):
    """FlexAttention mask_mod: query q sees key k when k <= q in the same document."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (segments[b, q_idx] == segments[b, kv_idx])
    return mask_mod


@functools.cache
def _compiled_flex() -> tuple[Callable, Callable]:
    """Compiled once, on first use: eager flex_attention materialises the full score matrix;
    compiled it is one fused kernel that skips the blocks its block mask marks empty."""
    return torch.compile(flex_attention), torch.compile(create_block_mask)


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor,
                            gqa: bool, compiled: bool = True) -> torch.Tensor:
    """Causal attention within each document with FlexAttention. q (B, Hq, T, D), k and v
    (B, Hkv, T, D). `compiled=False` runs it eagerly (forward only on CPU: for tests)."""
    attend, block_mask_fn = _compiled_flex() if compiled else (flex_attention, create_block_mask)
    B, _, T, _ = q.shape
    block_mask = block_mask_fn(same_document_causal(segments), B, None, T, T, device=q.device)  # shared by heads
    return attend(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def sdpa_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor,
                            gqa: bool) -> torch.Tensor:
    """The same with a dense boolean mask (B, 1, T, T) built on the device: B*T^2 bytes per
    layer, and every masked score is still computed."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    mask = (segments.unsqueeze(2) == segments.unsqueeze(1)) & causal  # (B, T, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), enable_gqa=gqa)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor,
                       gqa: bool) -> torch.Tensor:
    """The one device choice. CUDA: FlexAttention, whose block mask (B, T/128, T/128) lets the
    fused kernel skip the blocks between documents (cost ~ sum of len_doc^2, not T^2).
    Elsewhere (CPU runs and tests; FlexAttention has no CPU backward): dense-mask SDPA."""
    if q.device.type == "cuda" and q.shape[-1] >= 16:  # FlexAttention's kernels need head_dim >= 16
        return flex_document_attention(q, k, v, segments, gqa)
    return sdpa_document_attention(q, k, v, segments, gqa)


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


@dataclass
class KVCache:
    """One attention layer's keys and values for incremental decoding (launcher.generate):
    preallocated (B, kv_heads, capacity, head_dim), the first `length` positions filled."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, batch: int, kv_heads: int, capacity: int, head_dim: int, like: torch.Tensor) -> "KVCache":
        shape = (batch, kv_heads, capacity, head_dim)
        return cls(like.new_zeros(shape), like.new_zeros(shape))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add k, v (B, kv_heads, T, D) at the next positions; all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache full: {end} positions, capacity {self.k.shape[2]}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """x + wo(attention(rope(wq x'), rope(wk x'), wv x')), x' = norm(x). Causal, GQA.

    Tensor parallel: one collective at the block input (q, k, v read it as one
    column-parallel matmul) and one at its output (wo, row-parallel). With sequence
    parallelism x and the norm hold T/tp positions; the input is all-gathered and the
    output reduce-scattered."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, seed: int, layer: int,
                 options: BlockOptions = BlockOptions()):
        super().__init__()
        self.tp, self.options = tp, options
        self.heads = cfg.heads // tp.size  # this rank's query heads
        self.kv_heads = cfg.n_kv_heads // tp.size
        self.head_dim = cfg.head_dim
        self.rope_theta, self.rope_scaling = cfg.rope_theta, cfg.rope_scaling
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        p = f"layers.{layer}.attention"
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps, f"{p}.norm.weight", tp)
        self.wq = ColumnParallelLinear(cfg.hidden, cfg.hidden, tp, seed=seed, name=f"{p}.wq", std=cfg.init_std)
        self.wk = ColumnParallelLinear(cfg.hidden, kv_dim, tp, seed=seed, name=f"{p}.wk", std=cfg.init_std)
        self.wv = ColumnParallelLinear(cfg.hidden, kv_dim, tp, seed=seed, name=f"{p}.wv", std=cfg.init_std)
        self.wo = RowParallelLinear(cfg.hidden, cfg.hidden, tp, seed=seed, name=f"{p}.wo",
                                    std=scaled_init_std(cfg.init_std, cfg.layers))
        # RoPE tables: a plain attribute, not a buffer, so engines that cast the module to
        # bf16 leave them in fp32; rebuilt when the length or device changes.
        self._rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._normed = _maybe_compile(self.norm.forward, options)  # a method: not registered as a submodule
        self._core = _maybe_compile(self._attention_core, options)
        self._out = _maybe_compile(self._output_projection, options)

    def _rope_tables(self, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].shape[0] != seq_len or self._rope[0].device != device:
            self._rope = rope_cos_sin(seq_len, self.head_dim, self.rope_theta, device, self.rope_scaling)
        return self._rope

    def forward(self, x):
        return carry_segments(self._attend, x)

    def _qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, Hq/tp, D) queries and (B, T, Hkv/tp, D) keys and values of the normed input."""
        q, k, v = column_parallel(h, [self.wq.weight, self.wk.weight, self.wv.weight], self.tp, self.options.fused)
        B, T = q.shape[:2]
        return (q.view(B, T, self.heads, self.head_dim), k.view(B, T, self.kv_heads, self.head_dim),
                v.view(B, T, self.kv_heads, self.head_dim))

    def _attend(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        selective = self.options.recompute == "selective"
        h = _recomputed(self._normed, x) if selective else self._normed(x)
        q, k, v = self._qkv(h)
        cos, sin = self._rope_tables(q.shape[1], x.device)  # (T, D): the full sequence
        if not selective:
            # v is a view of the fused projection's output: SDPA keeping it would keep q's
            # and k's columns alive too; its own copy (kv wide) is what backward needs.
            v = v.contiguous()
        core = (lambda *a: _recomputed(self._core, *a)) if selective else self._core
        out = core(q, k, v, cos, sin) if segments is None else core(q, k, v, cos, sin, segments)
        return x + block_output(self._out(out), self.tp)

    def _attention_core(self, q, k, v, cos, sin, segments: Segments = None) -> torch.Tensor:
        """RoPE and causal attention: (B, T, heads, D) each -> (B, T, Hq/tp * D)."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        B, _, T, _ = q.shape
        gqa = self.kv_heads != self.heads
        if segments is None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # positions restart at each document: per-sample tables (B, 1, T, D)
            pos = document_positions(segments)
            cos, sin = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            out = document_attention(q, k, v, segments, gqa)
        return out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim)

    def _output_projection(self, out: torch.Tensor) -> torch.Tensor:
        """wo's local partial sums (row-parallel), before the tp reduction."""
        return F.linear(out, self.wo.weight)

    def decode(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The same block for generation: x (B, T, H) are the positions after the cache's;
        their keys and values join the cache; each attends to the cache and causally within x."""
        B, T, _ = x.shape
        start = cache.length
        q, k, v = (t.transpose(1, 2) for t in self._qkv(self.norm(x)))
        cos, sin = self._rope_tables(cache.k.shape[2], x.device)  # for the whole capacity: built once
        cos, sin = cos[start:start + T], sin[start:start + T]
        keys, values = cache.append(apply_rope(k, cos, sin), v)
        # query i (position start + i) sees keys 0 .. start + i
        mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        out = F.scaled_dot_product_attention(apply_rope(q, cos, sin), keys, values, attn_mask=mask,
                                             enable_gqa=self.kv_heads != self.heads)
        return x + self.wo(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class MLP(nn.Module):
    """x + w_down(silu(w_gate x') * w_up x'), x' = norm(x): gate and up one column-parallel
    matmul (one collective at the input), w_down row-parallel (one at the output)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, seed: int, layer: int,
                 options: BlockOptions = BlockOptions()):
        super().__init__()
        self.tp, self.options = tp, options
        p = f"layers.{layer}.mlp"
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps, f"{p}.norm.weight", tp)
        self.w_gate = ColumnParallelLinear(cfg.hidden, cfg.ffn, tp, seed=seed, name=f"{p}.w_gate", std=cfg.init_std)
        self.w_up = ColumnParallelLinear(cfg.hidden, cfg.ffn, tp, seed=seed, name=f"{p}.w_up", std=cfg.init_std)
        self.w_down = RowParallelLinear(cfg.ffn, cfg.hidden, tp, seed=seed, name=f"{p}.w_down",
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
        self.proj = ColumnParallelLinear(cfg.hidden, cfg.vocab, tp, seed=seed, name="head.weight", std=cfg.init_std)

    def forward(self, x):
        return carry_segments(lambda h, _: self.proj(h), x, last=True)


def layer_specs(cfg: ModelConfig, tp: TensorParallel, seed: Optional[int],
                options: BlockOptions = BlockOptions()) -> list[LayerSpec]:
    """The model as DeepSpeed layer specs, one per pipeline item (parallel.costs order).
    `seed=None` leaves the weights uninitialised, for loading (parallel.tensor_parallel.init_shard)."""
    specs = []
    for name, kind in pipeline_items(cfg):
        if kind == "embed":
            specs.append(TiedLayerSpec("embed", Embedding, cfg, tp, seed, tied_weight_attr=["embed.weight"])
                         if cfg.tie_embeddings else LayerSpec(Embedding, cfg, tp, seed))
        elif kind in ("attn", "mlp"):
            layer = int(name.split(".")[1])
            specs.append(LayerSpec(Attention if kind == "attn" else MLP, cfg, tp, seed, layer, options))
        elif kind == "norm":
            specs.append(LayerSpec(FinalNorm, cfg, tp))
        elif cfg.tie_embeddings:
            specs.append(TiedLayerSpec("embed", Embedding, cfg, tp, seed, forward_fn=tied_head_forward,
                                       tied_weight_attr=["embed.weight"]))
        else:
            specs.append(LayerSpec(Head, cfg, tp, seed))
    return specs


class LlamaModel(nn.Module):
    """All pipeline items on one stage (pipeline = 1): ids (B, T), or (ids, segments) with
    document attention -> logits shard (B, T, V/tp).
    Tied specs are built once and reused, as PipelineModule does within a stage."""

    def __init__(self, specs: list[LayerSpec], checkpoint_fn=None):
        super().__init__()
        self.checkpoint_fn = checkpoint_fn  # recompute each item in backward when set
        self.items = nn.ModuleList()
        self._forward_fns = []
        tied: dict[str, nn.Module] = {}
        for spec in specs:
            if isinstance(spec, TiedLayerSpec) and spec.key in tied:
                module = tied[spec.key]
            else:
                module = spec.build()
                if isinstance(spec, TiedLayerSpec):
                    tied[spec.key] = module
            self.items.append(module)
            self._forward_fns.append(getattr(spec, "forward_fn", None))

    def forward(self, ids) -> torch.Tensor:
        x = ids
        for module, forward_fn in zip(self.items, self._forward_fns):
            run = functools.partial(forward_fn, module) if forward_fn is not None else module
            hidden, _ = split_segments(x)
            grad_input = hidden.requires_grad or any(p.requires_grad for p in module.parameters())
            if self.checkpoint_fn is not None and self.training and hidden.is_floating_point() and grad_input:
                x = self.checkpoint_fn(run, x)
            else:
                x = run(x)
        return x


    @torch.no_grad()
    def decode(self, ids: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """Logits shard (B, T, V/tp) of the positions `ids` (B, T) that follow those already in
        `caches` (one per attention layer, filled as they go): generation with a KV cache."""
        x, layer = ids, 0
        for module, forward_fn in zip(self.items, self._forward_fns):
            if isinstance(module, Attention):
                x, layer = module.decode(x, caches[layer]), layer + 1
            else:
                x = forward_fn(module, x) if forward_fn is not None else module(x)
        return x


class LossFn:
    """Mean next-token cross-entropy from vocab-sharded logits (the pipeline's loss_fn).
    Targets may be `(targets, loss_mask)` (float (B, T), 1 = counts): then the mean over the
    positions that count, sum(loss * mask) / max(sum(mask), 1), per micro-batch as Megatron."""

    def __init__(self, tp: TensorParallel):
        self.tp = tp
        self.__name__ = "vocab_parallel_cross_entropy"

    def __call__(self, logits_shard: torch.Tensor, targets) -> torch.Tensor:
        if isinstance(targets, (tuple, list)):  # data.eod_mask_loss
            targets, mask = targets
            loss = vocab_parallel_cross_entropy(logits_shard, targets, self.tp)  # (B, T) fp32
            return (loss * mask).sum() / mask.sum().clamp(min=1.0)
        return vocab_parallel_cross_entropy(logits_shard, targets, self.tp).mean()
