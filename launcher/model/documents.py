"""Packed documents: a sample's tokens may come from several documents. `segments` (B, T)
gives each position's document; attention stays inside it (flex attention where it
compiles, else a masked SDPA) and RoPE positions restart at each document's start.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from parallel.context import compiled_flex

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


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor,
                            gqa: bool, compiled: bool = True) -> torch.Tensor:
    """Causal attention within each document with FlexAttention. q (B, Hq, T, D), k and v
    (B, Hkv, T, D). `compiled=False` runs it eagerly (forward only on CPU: for tests)."""
    attend, block_mask_fn = compiled_flex() if compiled else (flex_attention, create_block_mask)
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
