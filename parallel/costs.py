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

from parallel.hardware import GB
from parallel.shapes import ModelShape


@dataclass(frozen=True)
class ItemCost:
    name: str
    kind: str  # embed | attn | mlp | norm | head
    params: int  # full (unsharded) parameter count
    params_per_rank: int  # on one tensor-parallel rank
    flops_per_token: int  # forward + backward, whole item (all tp ranks together)
    act_bytes: int  # activations kept for backward, one micro-batch, one tp rank


def _moe(model: ModelShape):
    """model.moe, or None (dense; the shapes tests build may not have the attribute)."""
    return getattr(model, "moe", None)


def pipeline_items(model: ModelShape) -> list[tuple[str, str]]:
    """(name, kind) of every pipeline item, in forward order. An MoE layer's feed-forward
    item keeps the name mlp.{i} (its weights are layers.{i}.mlp.*) with kind `moe`."""
    moe = _moe(model)
    first_moe = model.layers if moe is None else moe.first_dense
    items = [("embed", "embed")]
    for layer in range(model.layers):
        items += [(f"attn.{layer}", "attn"), (f"mlp.{layer}", "moe" if layer >= first_moe else "mlp")]
    items += [("norm", "norm"), ("head", "head")]
    return items


RECOMPUTE_MODES = ("none", "selective", "full")

LOSS_CHUNK_ELEMENTS = 1 << 24  # logits elements per chunk of the vocabulary-parallel loss: 64 MiB in fp32


def recompute_mode(value) -> str:
    """parallel.activation_checkpointing as a mode: true = full, false = none."""
    if value is True:
        return "full"
    if value is False or value is None:
        return "none"
    return value


def activation_bytes(model: ModelShape, kind: str, tp: int, micro_batch: int, dtype_bytes: int,
                     recompute: str = "none", sequence_parallel: bool = False, context: int = 1) -> int:
    """Bytes one pipeline item saves for its backward pass, for one micro-batch on one tp rank.

    Counted tensor by tensor from what this model's autograd graph keeps (distinct storages,
    measured with `torch.autograd.graph.saved_tensors_hooks` in tests/test_plan.py), in the
    spirit of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
    Transformer Models", sec. 4), whose 34sbh + 5as^2b assumes dropout and an unfused
    softmax; fused SDPA (flash) keeps no s x s matrix, only the log-sum-exp per query.
    e = compute dtype; b, s, h, kv, f, V, a: micro-batch, sequence, hidden, kv width
    (kv heads x head dim), ffn, vocabulary, query heads. r = s / tp positions of the
    residual stream with sequence parallelism (r = s without): the norms and each block's
    input live on r positions; what lies between a block's two collectives (q, k, v, the
    attention output, the MLP's ffn-wide tensors) on all s positions, sharded by heads/ffn.

      norm (RMSNorm, in fp32)    fp32 input (4brh: the input itself in fp32, a copy in
                                 bf16), 1/rms (4br), normalised x and x*g (2ebrh; x*g is
                                 the saved input of the column-parallel matmul: with sequence
                                 parallelism its local shard, backward gathers it again)
      attention core             q, k after RoPE, v, the output (e bs(2h + 2kv)/tp); the lse
                                 (4bas/tp, fp32). RoPE keeps only its tables (persistent)
      MLP (SwiGLU)               gate and up (one fused buffer), silu(gate), the product
                                 that w_down reads: 4ebsf/tp
      final norm                 4brh + ebrh + 4br (x*g is the head's input, counted there)
      head + loss                the head's input (ebrh); the loss keeps the logits shard
                                 (ebsV/tp), the lse (fp32), int64 targets and a bool mask
      embedding                  int64 ids (with tp: the shard's local ids and a bool mask)

    `selective` (launcher/model/layers.py BlockOptions) recomputes each block's norm and attention
    core: a norm keeps only its input and output (2ebrh instead of (4 + 2e)brh + 4br), the
    attention core its inputs (the fused q|k|v buffer) and output: only the lse is dropped.
    So the norms are where selective saves: in bf16 about 17% of a block's activations at
    tp 1 or with sequence parallelism (Llama 7B/70B), 40% at tp 8 without it; the MLP's
    ffn-wide tensors stay. `full` keeps only each item's input (ebrh; the loss its own).
    `context` C (parallel/context.py): every term is on a rank's s / C positions; attention
    without recomputation also keeps the gathered keys and values of all s (2ebs kv/tp)."""
    s, b, e, h, kv_dim = model.seq_len // context, micro_batch, dtype_bytes, model.hidden, model.n_kv_heads * model.head_dim
    r = s // tp if sequence_parallel and tp > 1 else s  # residual-stream positions on this rank
    bs, brh = b * s, b * r * h
    if recompute == "selective" and kind in ("attn", "mlp", "moe"):
        norm = 2 * e * brh  # the checkpoint's input and the norm's output
    else:
        norm = 4 * brh + 2 * e * brh + 4 * b * r  # fp32 input, 1/rms, x_hat, x_hat * g
    loss = e * bs * model.vocab // tp + 13 * bs  # logits shard, fp32 lse, int64 targets, bool mask
    lse = 4 * b * model.heads * s // tp
    if kind == "embed":
        return 8 * bs + (bs if tp > 1 else 0)  # ids; with tp, the shard's local ids and a mask
    if recompute == "full":
        return e * brh + (loss if kind == "head" else 0)
    if kind == "attn":
        gathered = 2 * e * b * model.seq_len * kv_dim // tp if context > 1 and recompute == "none" else 0
        return norm + e * bs * (2 * h + 2 * kv_dim) // tp + (0 if recompute == "selective" else lse + gathered)
    if kind in ("mlp", "moe"):
        return norm + (4 * e * bs * model.ffn // tp if kind == "mlp"
                       else moe_activation_bytes(model, micro_batch, e) // (tp * context))
    if kind == "norm":
        return 4 * brh + e * brh + 4 * b * r
    if kind == "head":
        return e * brh + loss
    raise ValueError(kind)


def moe_activation_bytes(model: ModelShape, micro_batch: int, dtype_bytes: int) -> int:
    """An MoE item's activations past its norm (launcher/model/moe.py, dropless; with tp each
    rank routes 1/tp of the tokens: the caller divides), as autograd keeps them, with n = b s
    tokens, k = top_k, E experts, f = expert ffn, S f the shared width: the fp32 routing
    scores and top-k sums (4 n E + 4 n), the chosen experts, their sort and the kept
    positions (int64) with their fp32 weights (32 n k), the tokens gathered in expert order and
    the experts' output (2 e n k h, the one autograd node of the experts keeps its input and
    gate and up: 2 e n k f), the output's fp32 copy that the weights multiply (4 n k h), and
    the shared experts' 4 e n S f."""
    moe, n, e, h = model.moe, micro_batch * model.seq_len, dtype_bytes, model.hidden
    k = moe.top_k
    router = 4 * n * moe.experts + 4 * n
    routed = 32 * n * k + 2 * e * n * k * h + 4 * n * k * h + 2 * e * n * k * moe.ffn
    return router + routed + 4 * e * n * moe.shared_experts * moe.ffn


def moe_params(model: ModelShape, ep: int = 1) -> tuple[int, int, int]:
    """(total, active per token, on one rank) matmul parameters of one MoE item: the router,
    every routed expert (top_k of them active; E/ep of them on a rank: expert parallelism
    over ep ranks) and the shared experts."""
    moe, h = model.moe, model.hidden
    expert = 3 * h * moe.ffn
    shared = moe.shared_experts * expert
    router = moe.experts * h
    return (router + moe.experts * expert + shared, router + moe.top_k * expert + shared,
            router + moe.experts // ep * expert + shared)


def replicated_moe_params(model: ModelShape) -> int:
    """An MoE item's weights that every tp rank holds whole: router, shared experts, norm."""
    moe = model.moe
    return moe.experts * model.hidden + 3 * model.hidden * moe.ffn * moe.shared_experts + model.hidden


def moe_all_to_all_bytes(model: ModelShape, tp: int, tokens: int, dtype_bytes: int, full_recompute: bool,
                         ep: int = 0) -> float:
    """Bytes one rank sends to other ranks in one MoE item's all-to-alls per micro-batch of
    `tokens` with expert parallelism over `ep` ranks (0: over tp): its tokens / tp x top_k
    assignments of `hidden` values, (ep - 1) / ep of them off-rank, there and back in forward
    and again in backward (forward twice with full recomputation)."""
    ep = ep or tp
    if ep <= 1:
        return 0.0
    payload = tokens / tp * model.moe.top_k * model.hidden * dtype_bytes * (ep - 1) / ep
    return (6 if full_recompute else 4) * payload


def item_costs(model: ModelShape, tp: int = 1, micro_batch: int = 1, dtype_bytes: int = 2,
               recompute="none", sequence_parallel: bool = False, ep: int = 0, context: int = 1) -> list[ItemCost]:
    """Cost of each pipeline item for one tp rank and one micro-batch of `micro_batch` sequences.
    `recompute`: none | selective | full (or parallel.activation_checkpointing's bool);
    `sequence_parallel`: as resolved for this tp (resolved by the caller for this tp);
    `ep`: the expert-parallel degree (0: tp); `context`: the context-parallel degree (the
    activations of s / context positions; FLOPs stay per token)."""
    h, s = model.hidden, model.seq_len
    kv_dim = model.n_kv_heads * model.head_dim
    mode = recompute_mode(recompute)
    attn_matmul = h * h + 2 * h * kv_dim + h * h  # wq, wk, wv, wo
    mlp_matmul = 3 * h * model.ffn  # gate, up, down
    head_matmul = model.vocab * h
    act = {kind: activation_bytes(model, kind, tp, micro_batch, dtype_bytes, mode, sequence_parallel, context)
           for kind in ("embed", "attn", "mlp", "norm", "head") + (("moe",) if _moe(model) else ())}

    table = {
        "embed": (model.vocab * h, model.vocab * h // tp, 0),
        "attn": (attn_matmul + h, attn_matmul // tp + h, 6 * attn_matmul + 12 * s * h),
        "mlp": (mlp_matmul + h, mlp_matmul // tp + h, 6 * mlp_matmul),
        "norm": (h, h, 0),
        "head": (head_matmul, head_matmul // tp, 6 * head_matmul),
    }
    if _moe(model) is not None:  # the experts split over ep; FLOPs from the active parameters
        total, active, per_rank = moe_params(model, ep or tp)
        table["moe"] = (total + h, per_rank + h, 6 * active)
    if model.tie_embeddings:  # the head reuses the embedding's weight (counted once, in embed)
        table["head"] = (0, 0, 6 * head_matmul)
    return [ItemCost(name, kind, *table[kind], act_bytes=act[kind]) for name, kind in pipeline_items(model)]


def flops_per_token(model: ModelShape) -> int:
    """Training FLOPs per token (forward + backward), for throughput and MFU: with MoE, of
    the parameters a token is active on (the router, top_k routed and the shared experts)."""
    return sum(c.flops_per_token for c in item_costs(model))


def parameter_counts(model: ModelShape) -> tuple[int, int]:
    """(total, active per token) parameters of the model; equal for a dense model."""
    costs = item_costs(model)
    total = sum(c.params for c in costs)
    if _moe(model) is None:
        return total, total
    moe_total, moe_active, _ = moe_params(model)
    return total, total - sum(1 for c in costs if c.kind == "moe") * (moe_total - moe_active)


def powersgd_ratio(model: ModelShape, tp: int, rank: int) -> float:
    """Bytes PowerSGD sends (rank x (rows + columns) per matrix) over the dense gradient's,
    over one block's weight matrices on a tp rank (norm gains, a sliver, ignored)."""
    h, kv, f = model.hidden, model.n_kv_heads * model.head_dim, model.ffn
    shapes = [(h // tp, h), (kv // tp, h), (kv // tp, h), (h, h // tp), (f // tp, h), (f // tp, h), (h, f // tp)]
    dense = sum(a * b for a, b in shapes)
    low = sum(min(rank, a, b) * (a + b) for a, b in shapes)
    return min(1.0, low / dense)


# Tensor-parallel collectives of the hidden states per item, (forward, backward), in
# all-reduces' worth of ring traffic (an all-gather or a reduce-scatter is half of one), as
# parallel/tensor_parallel.py issues them (parallel/comm_bytes.py lists them call by call).
# Without sequence parallelism: all-reduces. The norm weights' gradient all-reduces under
# sequence parallelism (H floats each) are left out.
# MoE: all-gathers of its output and input gradient; all-to-alls in `stage_costs`.
TP_ALLREDUCES = {"embed": (1, 0), "attn": (1, 1), "mlp": (1, 1), "moe": (0.5, 0.5), "norm": (0, 0), "head": (0, 1)}
# With it: embed reduce-scatters forward (its gradient all-gathered back); a block
# all-gathers its input and reduce-scatters its output forward; backward all-gathers the
# output gradient, all-gathers the saved input shard again and reduce-scatters the input
# gradient; the head all-gathers its input forward, and backward as a block input.
SP_ALLREDUCES = {"embed": (0.5, 0.5), "attn": (1, 1.5), "mlp": (1, 1.5), "moe": (0, 0), "norm": (0, 0), "head": (0.5, 1)}


def ring_seconds(n: int, payload: float, gbps: float, all_reduce: bool = True) -> float:
    """Seconds of a ring collective moving `payload` bytes per rank among n ranks."""
    if n <= 1 or payload <= 0:
        return 0.0
    return (2 if all_reduce else 1) * (n - 1) / n * payload / (gbps * GB)


def gradient_wire_bytes(model: ModelShape, dtype: str, compression: str, compression_rank: int, params: int,
                        tp: int) -> float:
    """Bytes of one rank's gradients as they travel over data parallel (compression: none |
    fp16 | bf16 | powersgd)."""
    if compression in ("fp16", "bf16"):
        return params * 2
    per = 4 if dtype in ("fp32", "bf16") else 2
    if compression == "powersgd":
        return params * per * powersgd_ratio(model, tp, compression_rank)
    return params * per
