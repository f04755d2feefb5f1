"""Grouped-query attention with RoPE, tensor-parallel over heads, with an optional KV cache
for generation (launcher/inference). Packed documents: launcher/model/documents.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from launcher.config.schema import ModelConfig
from launcher.model.documents import (
    Segments,
    carry_segments,
    document_attention,
    document_positions,
)
from launcher.model.layers import (
    BlockOptions,
    RMSNorm,
    _maybe_compile,
    _recomputed,
    apply_rope,
    rope_cos_sin,
    sharded_linear,
)
from parallel.context import chunk_positions, context_attention
from parallel.tensor_parallel import (
    TensorParallel,
    block_output,
    column_parallel,
    scaled_init_std,
)


@dataclass
class KVCache:
    """One attention layer's keys and values for incremental decoding (launcher/inference/sampling.py):
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
        self.wq = sharded_linear(f"{p}.wq", cfg.hidden, cfg.hidden, tp, seed=seed, std=cfg.init_std)
        self.wk = sharded_linear(f"{p}.wk", cfg.hidden, kv_dim, tp, seed=seed, std=cfg.init_std)
        self.wv = sharded_linear(f"{p}.wv", cfg.hidden, kv_dim, tp, seed=seed, std=cfg.init_std)
        self.wo = sharded_linear(f"{p}.wo", cfg.hidden, cfg.hidden, tp, seed=seed,
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
        if self.options.context.size > 1:  # selective: the K/V gather is recomputed too, so
            # backward keeps this rank's k, v and not the whole sequence's
            core = (lambda *a: _recomputed(self._context_core, *a)) if selective else self._context_core
            return x + block_output(self._out(core(q, k, v, segments)), self.tp)
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

    def _context_core(self, q, k, v, segments: Segments) -> torch.Tensor:
        """Context parallelism (parallel/context.py): this rank's T/C positions (chunks i and
        2C-1-i) attend to the whole sequence's keys and values, gathered over the context
        group; RoPE at the global positions (restarted at each document). `segments` are the
        whole sequence's (B, T): the data loader does not cut them."""
        cp = self.options.context
        seq_len = q.shape[1] * cp.size
        mine = chunk_positions(seq_len, cp, q.device)
        cos, sin = self._rope_tables(seq_len, q.device)
        if segments is None:
            cos, sin = cos[mine], sin[mine]
        else:
            pos = document_positions(segments)[:, mine]
            cos, sin = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T/C, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = context_attention(q, k, v, cp, seq_len, segments, gqa=self.kv_heads != self.heads)
        B, _, T, _ = q.shape
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
