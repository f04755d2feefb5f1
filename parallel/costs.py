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


RECOMPUTE_MODES = ("none", "selective", "full")


def recompute_mode(value) -> str:
    """parallel.activation_checkpointing as a mode: true = full, false = none."""
    if value is True:
        return "full"
    if value is False or value is None:
        return "none"
    return value


def activation_bytes(model: ModelConfig, kind: str, tp: int, micro_batch: int, dtype_bytes: int,
                     recompute: str = "none") -> int:
    """Bytes one pipeline item saves for its backward pass, for one micro-batch on one tp rank.

    Counted tensor by tensor from what this model's autograd graph keeps (measured with
    `torch.autograd.graph.saved_tensors_hooks` in tests/test_plan.py), in the spirit of
    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    Models", sec. 4), whose 34sbh + 5as^2b assumes dropout and an unfused softmax; fused
    SDPA (flash) keeps no s x s matrix, only the log-sum-exp per query. e = compute dtype.
      norm (RMSNorm, in fp32):   its fp32 input, 1/rms (fp32 per token), normalised x and x*g (e each)
      attention:                 q, k, v after RoPE and the attention output (sharded); lse (fp32)
      MLP (SwiGLU):              gate, silu(gate), up, their product (sharded, ffn wide)
      head + loss:               the head's input; the loss keeps an fp32 softmax of the
                                 logits shard, int64 targets and a bool mask
    `full` keeps only each item's input (and the loss's softmax, which is outside the
    items); `selective` recomputes the attention core, dropping what SDPA keeps beyond its
    inputs and the output the projection needs: the lse. With a fused kernel that is all
    selective recomputation can save."""
    s, b, e = model.seq_len, micro_batch, dtype_bytes
    kv_dim = model.n_kv_heads * model.head_dim
    bs, bsh = b * s, b * s * model.hidden
    norm = 4 * bsh + 2 * e * bsh + 4 * bs  # fp32 input, 1/rms, x_hat, x_hat * g
    loss = 4 * bs * model.vocab // tp + 9 * bs  # fp32 softmax of the logits shard, targets, mask
    lse = 4 * b * model.heads * s // tp
    if kind == "embed":
        return 8 * bs + (9 * bs if tp > 1 else 0)  # ids; with tp, the shard's local ids and mask
    if recompute == "full":
        return e * bsh + (loss if kind == "head" else 0)
    if kind == "attn":
        qkvo = e * (2 * bsh + 2 * bs * kv_dim) // tp
        return norm + qkvo + (0 if recompute == "selective" else lse)
    if kind == "mlp":
        return norm + 4 * e * bs * model.ffn // tp
    if kind == "norm":
        return 4 * bsh + e * bsh + 4 * bs
    if kind == "head":
        return e * bsh + loss
    raise ValueError(kind)


def item_costs(model: ModelConfig, tp: int = 1, micro_batch: int = 1, dtype_bytes: int = 2,
               recompute="none") -> list[ItemCost]:
    """Cost of each pipeline item for one tp rank and one micro-batch of `micro_batch` sequences.
    `recompute`: none | selective | full (or parallel.activation_checkpointing's bool)."""
    h, s = model.hidden, model.seq_len
    kv_dim = model.n_kv_heads * model.head_dim
    mode = recompute_mode(recompute)
    attn_matmul = h * h + 2 * h * kv_dim + h * h  # wq, wk, wv, wo
    mlp_matmul = 3 * h * model.ffn  # gate, up, down
    head_matmul = model.vocab * h
    act = {kind: activation_bytes(model, kind, tp, micro_batch, dtype_bytes, mode)
           for kind in ("embed", "attn", "mlp", "norm", "head")}

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
