"""Per-item cost model of the Llama pipeline: parameters, FLOPs and activation memory.

The pipeline items, in order (the model builds its layer specs from `pipeline_items`, so
the two cannot drift apart):

    embed, attn.0, mlp.0, attn.1, mlp.1, ..., attn.{L-1}, mlp.{L-1}, norm, head

A transformer block is two items (attention and MLP, each with its own norm and residual),
so a stage boundary may fall inside a block.

FLOPs per token (forward + backward) follow the usual convention (Megatron, PaLM appendix):
6 x matmul parameters, plus 12 x seq x hidden per layer for the attention scores and the
weighted sum. The embedding is a lookup (no matmul FLOPs); the head is a V x H matmul.
Pure integer arithmetic: no torch, usable on a laptop and by the memory/throughput planner.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.config import ModelConfig


@dataclass(frozen=True)
class ItemCost:
    name: str
    kind: str  # embed | attn | mlp | norm | head
    params: int  # full (unsharded) parameter count
    params_per_rank: int  # on one tensor-parallel rank
    flops_per_token: int  # forward + backward, whole item (all tp ranks together)
    act_bytes: int  # activations kept for backward, one micro-batch, one tp rank


def pipeline_items(model: ModelConfig) -> list[tuple[str, str]]:
    """(name, kind) of every pipeline item, in forward order."""
    items = [("embed", "embed")]
    for layer in range(model.layers):
        items += [(f"attn.{layer}", "attn"), (f"mlp.{layer}", "mlp")]
    items += [("norm", "norm"), ("head", "head")]
    return items


def item_costs(model: ModelConfig, tp: int = 1, micro_batch: int = 1, dtype_bytes: int = 2,
               activation_checkpointing: bool = False) -> list[ItemCost]:
    """Cost of each pipeline item for one tp rank and one micro-batch of `micro_batch` sequences."""
    h, s, b, e = model.hidden, model.seq_len, micro_batch, dtype_bytes
    kv_dim = model.n_kv_heads * model.head_dim
    bsh = b * s * h
    attn_matmul = h * h + 2 * h * kv_dim + h * h  # wq, wk, wv, wo
    mlp_matmul = 3 * h * model.ffn  # gate, up, down
    head_matmul = model.vocab * h

    # Activations saved for backward (per tp rank). Attention: norm input and output, q, k,
    # v and the attention output (sharded), the softmax statistics (fused SDPA keeps no
    # s x s matrix). MLP: norm input and output, gate, up and their product (sharded).
    act = {
        "embed": b * s * 8,
        "attn": 2 * bsh * e + (b * s * (h + 2 * kv_dim) * e + bsh * e) // tp + b * model.heads * s * 4 // tp,
        "mlp": 2 * bsh * e + 3 * b * s * model.ffn * e // tp,
        "norm": bsh * e,
        "head": bsh * e + b * s * model.vocab * 4 // tp,  # fp32 softmax of the logits shard
    }
    if activation_checkpointing:  # only each item's input survives; recomputed in backward
        act = {kind: (b * s * 8 if kind == "embed" else bsh * e) for kind in act}

    table = {
        "embed": (model.vocab * h, model.vocab * h // tp, 0),
        "attn": (attn_matmul + h, attn_matmul // tp + h, 6 * attn_matmul + 12 * s * h),
        "mlp": (mlp_matmul + h, mlp_matmul // tp + h, 6 * mlp_matmul),
        "norm": (h, h, 0),
        "head": (head_matmul, head_matmul // tp, 6 * head_matmul),
    }
    if model.tie_embeddings:  # the head reuses the embedding's weight (counted once, in embed)
        table["head"] = (0, 0, 6 * head_matmul)
    return [ItemCost(name, kind, *table[kind], act_bytes=act[kind]) for name, kind in pipeline_items(model)]


def flops_per_token(model: ModelConfig) -> int:
    """Training FLOPs per token (forward + backward), for throughput and MFU."""
    return sum(c.flops_per_token for c in item_costs(model))


def state_bytes_per_param(dtype: str, optimizer: str, zero_stage: int, dp: int) -> float:
    """Bytes of weights + gradients + optimizer state per parameter on one rank.

    Mixed precision (bf16/fp16) keeps 16-bit weights and grads plus an fp32 master copy;
    AdamW keeps two fp32 moments, Lion one. ZeRO-1 shards the optimizer state (and master
    weights) over dp, ZeRO-2 the gradients too, ZeRO-3 everything."""
    weight = 4 if dtype == "fp32" else 2
    master = 0 if dtype == "fp32" else 4
    moments = 8 if optimizer == "adamw" else 4
    optim = master + moments
    grads = weight
    if zero_stage >= 1:
        optim /= dp
    if zero_stage >= 2:
        grads /= dp
    if zero_stage >= 3:
        weight /= dp
    return weight + grads + optim
