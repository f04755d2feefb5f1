"""The model as DeepSpeed layer specs, one per pipeline item (`layer_specs`), the same specs
built into a plain sequential module when there is no pipeline (`LlamaModel`), and the loss
(`LossFn`: vocabulary-parallel cross-entropy, optional end-of-document masking).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Optional

import torch
import torch.utils.checkpoint
from torch import nn

from launcher.config.schema import ModelConfig
from launcher.model.attention import Attention, KVCache
from launcher.model.documents import split_segments
from launcher.model.moe import MoE, MoEState
from launcher.model.layers import (
    MLP,
    BlockOptions,
    Embedding,
    FinalNorm,
    Head,
    tied_head_forward,
)
from parallel.costs import pipeline_items
from parallel.tensor_parallel import (
    NO_TP,
    TensorParallel,
    vocab_parallel_cross_entropy,
)

if TYPE_CHECKING:  # annotations only
    from deepspeed.pipe import LayerSpec


def layer_specs(cfg: ModelConfig, tp: TensorParallel, seed: Optional[int],
                options: BlockOptions = BlockOptions(), moe_state: Optional[MoEState] = None,
                ep: Optional[TensorParallel] = None) -> list[LayerSpec]:
    """The model as DeepSpeed layer specs, one per pipeline item (parallel.costs order).
    `seed=None` leaves the weights uninitialised, for loading (parallel.tensor_parallel.init_shard).
    `moe_state`: the balancing state every MoE item of this process shares (launcher/model/moe.py)."""
    # lazy: DeepSpeed is imported after launcher/ds has chosen its accelerator
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    specs = []
    for name, kind in pipeline_items(cfg):
        if kind == "embed":
            specs.append(TiedLayerSpec("embed", Embedding, cfg, tp, seed, tied_weight_attr=["embed.weight"])
                         if cfg.tie_embeddings else LayerSpec(Embedding, cfg, tp, seed))
        elif kind in ("attn", "mlp"):
            layer = int(name.split(".")[1])
            specs.append(LayerSpec(Attention if kind == "attn" else MLP, cfg, tp, seed, layer, options))
        elif kind == "moe":
            specs.append(LayerSpec(MoE, cfg, tp, seed, int(name.split(".")[1]), options, moe_state, ep))
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
        # lazy: DeepSpeed is imported after launcher/ds has chosen its accelerator
        from deepspeed.pipe import TiedLayerSpec

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

    def __init__(self, tp: TensorParallel, context: TensorParallel = NO_TP):
        self.tp, self.context = tp, context
        self.__name__ = "vocab_parallel_cross_entropy"

    def __call__(self, logits_shard: torch.Tensor, targets) -> torch.Tensor:
        if isinstance(targets, (tuple, list)):  # data.eod_mask_loss
            targets, mask = targets
            loss = vocab_parallel_cross_entropy(logits_shard, targets, self.tp)  # (B, T) fp32
            counted = mask.sum()
            if self.context.size > 1:  # the sequence's count, times cp: the average over the cp ranks is the mean
                counted = counted.detach().clone()
                torch.distributed.all_reduce(counted, group=self.context.group)
                counted = counted / self.context.size
            return (loss * mask).sum() / counted.clamp(min=1.0)
        return vocab_parallel_cross_entropy(logits_shard, targets, self.tp).mean()
