"""The table of the model's weights: our name, Hugging Face's Llama name, the tensor-parallel split.

The one map between our parameter names and Hugging Face's (export, import, generate).

Our names are the logical (full, unsharded) tensors of launcher/model/, whatever the layout;
`{i}` is the layer index. RoPE already uses Hugging Face's `rotate_half` layout, so q and k
need no permutation: every tensor maps as is (the vocabulary may be trimmed, see export).

`tp_dim` is the dimension split over tensor parallelism (None: replicated). It is declared
here only: the model's layers are built from it (launcher/model/layers.py `sharded_linear`),
the Hugging Face import/export and the checkpoint reshard read it (tests/test_export.py
checks that every built parameter's `tp_shard_dim` agrees).
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

from launcher.config.schema import ModelConfig


class Weight(NamedTuple):
    ours: str
    hf: str
    tp_dim: Optional[int]


# One line per weight, in Hugging Face's order.            shape (full)
TABLE = [
    Weight("embed.weight", "model.embed_tokens.weight", 0),  # (vocab, hidden)
    Weight("layers.{i}.attention.norm.weight", "model.layers.{i}.input_layernorm.weight", None),  # (hidden,)
    Weight("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight", 0),  # (hidden, hidden)
    Weight("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight", 0),  # (kv_dim, hidden)
    Weight("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight", 0),  # (kv_dim, hidden)
    Weight("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", 1),  # (hidden, hidden)
    Weight("layers.{i}.mlp.norm.weight", "model.layers.{i}.post_attention_layernorm.weight", None),  # (hidden,)
    Weight("layers.{i}.mlp.w_gate.weight", "model.layers.{i}.mlp.gate_proj.weight", 0),  # (ffn, hidden)
    Weight("layers.{i}.mlp.w_up.weight", "model.layers.{i}.mlp.up_proj.weight", 0),  # (ffn, hidden)
    Weight("layers.{i}.mlp.w_down.weight", "model.layers.{i}.mlp.down_proj.weight", 1),  # (hidden, ffn)
    # MoE layers (model.moe; launcher/model/moe.py), as Mixtral names them. Our experts are
    # stacked along dim 0 (experts.w_gate: (experts, moe.ffn, hidden)); Mixtral keeps one tensor
    # per expert {j}: `experts.{j}.w_gate` is our stacked tensor's row j (`stacked_expert`).
    Weight("layers.{i}.mlp.router.weight", "model.layers.{i}.block_sparse_moe.gate.weight", None),  # (experts, hidden)
    Weight("layers.{i}.mlp.experts.{j}.w_gate", "model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight",
           None),  # (moe.ffn, hidden)
    Weight("layers.{i}.mlp.experts.{j}.w_down", "model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight",
           None),  # (hidden, moe.ffn)
    Weight("layers.{i}.mlp.experts.{j}.w_up", "model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight",
           None),  # (moe.ffn, hidden)
    # the stacked tensors themselves, split by experts over the tp ranks (expert parallelism)
    Weight("layers.{i}.mlp.experts.w_gate", "", 0),
    Weight("layers.{i}.mlp.experts.w_up", "", 0),
    Weight("layers.{i}.mlp.experts.w_down", "", 0),
    # DeepSeekMoE's shared experts: no transformers architecture holds them (refused on export)
    Weight("layers.{i}.mlp.shared.w_gate", "", None),  # (shared_experts * moe.ffn, hidden)
    Weight("layers.{i}.mlp.shared.w_up", "", None),  # (shared_experts * moe.ffn, hidden)
    Weight("layers.{i}.mlp.shared.w_down", "", None),  # (hidden, shared_experts * moe.ffn)
    Weight("norm.weight", "model.norm.weight", None),  # (hidden,)
    Weight("head.weight", "lm_head.weight", 0),  # (vocab, hidden); absent when tied
]


def _pattern(template: str) -> re.Pattern:
    escaped = re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)").replace(re.escape("{j}"), r"(?P<j>\d+)")
    return re.compile("^" + escaped + "$")


_BY_OURS = [(_pattern(w.ours), w) for w in TABLE]
_BY_HF = [(_pattern(w.hf), w) for w in TABLE if w.hf]


def _lookup(name: str, patterns) -> tuple[Weight, dict]:
    for pattern, weight in patterns:
        match = pattern.match(name)
        if match:
            return weight, match.groupdict()
    raise KeyError(f"{name}: not a Llama weight name (launcher/model/weights.py TABLE)")


def to_hf(ours: str) -> str:
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    weight, index = _lookup(ours, _BY_OURS)
    if not weight.hf:
        raise KeyError(f"{ours}: no Hugging Face name (launcher/model/weights.py TABLE)")
    return weight.hf.format(**index)


def from_hf(hf: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'layers.3.attention.wq.weight'."""
    weight, index = _lookup(hf, _BY_HF)
    return weight.ours.format(**index)


_EXPERT_ROW = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(w_gate|w_up|w_down)$")


def stacked_expert(ours: str) -> Optional[tuple[str, int]]:
    """'layers.3.mlp.experts.5.w_up' -> ('layers.3.mlp.experts.w_up', 5): one expert's row of
    the stacked tensor; None for any other name."""
    match = _EXPERT_ROW.match(ours)
    return (f"{match.group(1)}.{match.group(3)}", int(match.group(2))) if match else None


def expert_rows(stacked: str, experts: int) -> list[str]:
    """'layers.3.mlp.experts.w_up' -> ['layers.3.mlp.experts.0.w_up', ...]: the per-expert
    names Mixtral's files use, in row order."""
    head, leaf = stacked.rsplit(".", 1)
    return [f"{head}.{j}.{leaf}" for j in range(experts)]


def is_expert(ours: str) -> bool:
    """A stacked expert weight: split along the experts over the expert-parallel ranks, which
    are the tp ranks and, when parallel.expert > parallel.tensor, data ranks too."""
    return ".mlp.experts." in ours


def tp_dim(ours: str) -> Optional[int]:
    return _lookup(ours, _BY_OURS)[0].tp_dim


def weights(model: ModelConfig) -> list[tuple[str, str]]:
    """(ours, hf) of every weight of this model, in Hugging Face's order (no head when tied)."""
    out = []
    for w in TABLE:
        if "{i}" in w.ours:
            continue
        if w.ours == "embed.weight":
            out.append((w.ours, w.hf))
            for i in range(model.layers):
                out += _layer_weights(model, i)
        elif not (w.ours == "head.weight" and model.tie_embeddings):
            out.append((w.ours, w.hf))
    return out


def _layer_weights(model: ModelConfig, i: int) -> list[tuple[str, str]]:
    """(ours, hf) of layer i: attention, then the dense MLP's or the MoE's (per expert)."""
    moe = model.moe is not None and i >= model.moe.first_dense
    out = []
    for t in TABLE:
        if "{i}" not in t.ours or not t.hf:
            continue
        is_moe = ".router." in t.ours or ".experts." in t.ours
        if ".mlp." not in t.ours or t.ours.endswith("mlp.norm.weight") or is_moe == moe:
            experts = range(model.moe.experts) if "{j}" in t.ours else [None]
            out += [(t.ours.format(i=i, j=j), t.hf.format(i=i, j=j)) for j in experts]
    return out


def full_shape(model: ModelConfig, ours: str, vocab: Optional[int] = None) -> tuple[int, ...]:
    """Shape of the full tensor; `vocab` (default model.vocab) for the embedding and head rows."""
    h, kv_dim = model.hidden, model.n_kv_heads * model.head_dim
    row = stacked_expert(ours)
    if row is not None:  # one expert of a stacked tensor
        return full_shape(model, row[0])[1:]
    if ".mlp.router." in ours or ".mlp.experts." in ours or ".mlp.shared." in ours:
        moe = model.moe
        e, f, width = moe.experts, moe.ffn, moe.shared_experts * moe.ffn
        leaf = ours.split(".mlp.", 1)[1]
        return {"router.weight": (e, h), "experts.w_gate": (e, f, h), "experts.w_up": (e, f, h),
                "experts.w_down": (e, h, f), "shared.w_gate": (width, h), "shared.w_up": (width, h),
                "shared.w_down": (h, width)}[leaf]
    leaf = ours.split(".")[-2]
    shapes = {"embed": (vocab or model.vocab, h), "head": (vocab or model.vocab, h), "norm": (h,),
              "wq": (h, h), "wk": (kv_dim, h), "wv": (kv_dim, h), "wo": (h, h),
              "w_gate": (model.ffn, h), "w_up": (model.ffn, h), "w_down": (h, model.ffn)}
    return shapes[leaf]
