"""The Mixture-of-Experts feed-forward item (model.moe), in place of the dense MLP:

    x + routed(h) + shared(h),  h = norm(x)
    routed(h)_t = sum over the top_k experts e chosen for token t of  w_te * expert_e(h_t)

Each expert is a SwiGLU of width moe.ffn; the `shared_experts` (DeepSeekMoE) see every token
and are one SwiGLU of width shared_experts x moe.ffn (the sum of S SwiGLUs is exactly one
SwiGLU over their concatenated hidden units). Routing runs in fp32 whatever the compute dtype.

Dispatch is dropless by default: the tokens are sorted by expert (a stable sort, so each
expert sees its tokens in sequence order) and each expert runs on its contiguous slice. With
`capacity_factor` (in training only), an expert keeps its first ceil(cf x tokens x top_k /
experts) assignments of the micro-batch, in position-major order, and drops the rest (their
weight is not renormalised over the survivors); the same on any layout.

Balancing never travels between pipeline stages:
- `aux_loss`: the Switch/GShard loss coef x E x sum_e f_e P_e (f_e: the share of this
  micro-batch's assignments that chose e; P_e: the mean routing probability of e) enters the
  backward pass here, at the item's output (`_AuxLossGrad`), scaled like the language-model
  loss (1 / gradient-accumulation steps), so each stage's backward carries its own layers'.
- `bias`: DeepSeek-V3's auxiliary-loss-free balancing. A per-expert bias is added to the
  scores for the choice of experts only (the weights use the unbiased scores). After each
  optimizer step every rank moves it by bias_rate x sign(mean load - load), from the step's
  token counts summed over all ranks (`MoEState.after_step`): identical on every rank.

`MoEState` holds what is not a parameter, for all MoE layers of the model on every rank
(a few floats per expert): the biases (saved in checkpoints, independent of the layout) and
the step's counters, which metrics.jsonl reports per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from launcher.config.schema import ModelConfig, MoEConfig
from launcher.model.documents import Segments, carry_segments
from launcher.model.experts import Routing, dispatch, earlier_assignments, expert_capacity, swiglu
from launcher.model.layers import BlockOptions, RMSNorm, _maybe_compile, _recomputed
from parallel.expert_grads import is_expert
from parallel.tensor_parallel import NO_TP, TensorParallel, init_shard, scaled_init_std, sum_grad_over_tp
from parallel.token_split import gather_sequence, shard_sequence


def moe_layers(model: ModelConfig) -> list[int]:
    """The indices of the layers whose feed-forward block is an MoE (after first_dense)."""
    return [] if model.moe is None else list(range(model.moe.first_dense, model.layers))


def route(logits: torch.Tensor, moe: MoEConfig, bias: Optional[torch.Tensor] = None) -> Routing:
    """Router logits (N, E) -> the top_k experts per token and their weights.
    softmax (Mixtral): probabilities over all experts, the top_k renormalised to sum 1 (the same
    as a softmax over the top_k logits). sigmoid (DeepSeek-V3): independent scores, the top_k
    normalised to sum 1. `bias` (E,) moves the choice only, never the weights."""
    logits = logits.float()
    scores = logits.softmax(-1) if moe.router == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias
    experts = choice.topk(moe.top_k, dim=-1).indices
    picked = scores.gather(-1, experts)
    weights = picked / picked.sum(-1, keepdim=True)
    probs = scores if moe.router == "softmax" else scores / scores.sum(-1, keepdim=True)
    return Routing(experts, weights, probs, torch.bincount(experts.reshape(-1), minlength=moe.experts))


def aux_loss(routing: Routing, coef: float, tp: TensorParallel = NO_TP,
             context: TensorParallel = NO_TP) -> torch.Tensor:
    """coef x E x sum_e f_e P_e: f_e the share of assignments routed to e (no gradient), P_e
    the mean probability of e over the tokens (the gradient flows through it). With tp (and
    context parallelism) the micro-batch's tokens are split over the tp (and context) ranks:
    f_e is summed over them (one small all-reduce each) and each rank returns its tokens' part
    of the sum over P_e, so the parts add up to the micro-batch's loss and each part's
    gradient is that loss's on those tokens."""
    experts = routing.probs.shape[1]
    counts = routing.counts.float()
    tokens = routing.probs.shape[0] * tp.size * context.size
    for group in (tp, context):
        if group.size > 1:
            dist.all_reduce(counts, group=group.group)
    share = counts / (tokens * routing.experts.shape[1])
    return coef * experts * (share * routing.probs.sum(0) / tokens).sum()


class _AuxLossGrad(torch.autograd.Function):
    """Returns `out` unchanged; its backward also starts the aux loss's own backward with
    gradient `scale` (the language-model loss's 1 / accumulation steps). So the aux loss is
    part of this stage's backward without being added to the loss the last stage sees."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad.device), None


def _in_backward() -> bool:
    """True while autograd runs a backward pass: a recomputed forward (activation
    checkpointing replays the item's forward inside backward) must not count its tokens twice.
    torch has no public name for this; `_current_graph_task_id` is -1 outside backward."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class MoEState:
    """The balancing biases and this step's counters of every MoE layer of the model (rows in
    `moe_layers` order), replicated on every rank. Counters are summed over this rank's
    micro-batches, then over all ranks at the end of the step (`after_step`)."""

    moe: MoEConfig
    layers: list[int]
    bias: torch.Tensor  # (L, E) fp32: the balancing bias (zeros unless balance=bias)
    counts: torch.Tensor = field(init=False)  # (L, E) assignments per expert this step (before drops)
    dropped: torch.Tensor = field(init=False)  # (L,) assignments dropped for capacity
    aux: torch.Tensor = field(init=False)  # (L,) sum of the micro-batches' aux losses
    micro: torch.Tensor = field(init=False)  # (L,) micro-batches counted
    aux_grad_scale: float = 1.0  # the LM loss's scale in backward: 1 / gradient-accumulation steps

    def __post_init__(self):
        self.reset()

    @classmethod
    def build(cls, model: ModelConfig, device: Optional[torch.device] = None) -> Optional["MoEState"]:
        layers = moe_layers(model)
        if not layers:
            return None
        return cls(model.moe, layers, torch.zeros(len(layers), model.moe.experts, device=device))

    def row(self, layer: int) -> int:
        return self.layers.index(layer)

    def reset(self) -> None:
        n, e = self.bias.shape
        self.counts = torch.zeros(n, e, dtype=torch.float64, device=self.bias.device)
        self.dropped, self.aux, self.micro = (torch.zeros(n, dtype=torch.float64, device=self.bias.device)
                                              for _ in range(3))

    def record(self, layer: int, counts: torch.Tensor, dropped: torch.Tensor, aux: Optional[torch.Tensor],
               share: float = 1.0) -> None:
        """One micro-batch's figures on this rank; `share`: the part of the micro-batch's
        tokens it routed (1 / tp: the tp ranks split them)."""
        r = self.row(layer)
        self.counts[r] += counts.to(self.counts)
        self.dropped[r] += dropped.to(self.dropped)
        if aux is not None:
            self.aux[r] += aux.detach().to(self.aux)
        self.micro[r] += share

    def after_step(self, group=None) -> dict:
        """Collective over `group` (every rank of the run: each layer lives on one pipeline
        stage and its counts on each of that stage's data-parallel ranks): sum the step's
        counters, move the biases (balance=bias), reset. Returns the step's figures per layer
        for metrics.jsonl: moe.{i}.load_max_over_mean, dropped_fraction, aux_loss / bias_spread."""
        packed = torch.cat([self.counts, self.dropped[:, None], self.aux[:, None], self.micro[:, None]], dim=1)
        if dist.is_initialized():
            dist.all_reduce(packed, group=group)
        e = self.bias.shape[1]
        counts, dropped, aux, micro = packed[:, :e], packed[:, e], packed[:, e + 1], packed[:, e + 2]
        if self.moe.balance == "bias":
            # DeepSeek-V3: an overloaded expert's bias goes down, an underloaded one's up
            mean = counts.mean(dim=1, keepdim=True)
            self.bias += (self.moe.bias_rate * torch.sign(mean - counts)).to(self.bias)
        figures = {}
        for r, layer in enumerate(self.layers):
            total = counts[r].sum().item()
            if total == 0:
                continue  # no forward this step (e.g. a layer never reached)
            figures[f"moe.{layer}.load_max_over_mean"] = counts[r].max().item() / (total / e)
            figures[f"moe.{layer}.dropped_fraction"] = dropped[r].item() / total
            if self.moe.balance == "aux_loss":
                figures[f"moe.{layer}.aux_loss"] = aux[r].item() / max(micro[r].item(), 1.0)
            if self.moe.balance == "bias":
                figures[f"moe.{layer}.bias_spread"] = (self.bias[r].max() - self.bias[r].min()).item()
        self.reset()
        return figures

    def state_dict(self) -> dict:
        return {"layers": list(self.layers), "bias": self.bias.detach().cpu().clone()}

    def load_state_dict(self, saved: dict) -> None:
        if list(saved["layers"]) != self.layers or tuple(saved["bias"].shape) != tuple(self.bias.shape):
            raise ValueError(f"MoE balancing state of layers {saved['layers']} x {tuple(saved['bias'].shape)}, "
                             f"this model has {self.layers} x {tuple(self.bias.shape)}")
        self.bias.copy_(saved["bias"])


def _holder(seed: Optional[int], prefix: str, tp: TensorParallel = NO_TP, **shapes) -> nn.Module:
    """A module holding parameters `prefix.<key>` (full shape, init std) for state-dict keys
    that read as the weight table's names (launcher/model/weights.py); with `tp` (for the
    experts: the expert-parallel group), each split along dim 0 (the experts) over its ranks,
    else whole on every rank."""
    holder = nn.Module()
    dim = 0 if tp.size > 1 else None
    for key, (shape, std) in shapes.items():
        param = nn.Parameter(init_shard(shape, std, seed, f"{prefix}.{key}", dim, tp))
        param.tp_shard_dim = dim
        param.logical_name = f"{prefix}.{key}"
        if dim is not None:
            param.tensor_model_parallel = True  # counted on every rank in the grad norm
        holder.register_parameter(key, param)
    return holder


class MoE(nn.Module):
    """Pipeline item `mlp.{layer}` of an MoE layer: x + routed(h) + shared(h), h = norm(x).
    Weights (full shapes; launcher/model/weights.py): router.weight (E, H); experts.w_gate,
    w_up (E, f, H), experts.w_down (E, H, f); shared.w_gate, w_up (S f, H), shared.w_down (H, S f)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, seed: Optional[int], layer: int,
                 options: BlockOptions = BlockOptions(), state: Optional[MoEState] = None,
                 ep: Optional[TensorParallel] = None):
        """`ep`: the expert-parallel group, when it is more than the tp group (experts over
        data ranks too: parallel/layout.py); by default the tp group."""
        super().__init__()
        moe, h = cfg.moe, cfg.hidden
        self.moe, self.layer, self.options, self.state, self.tp = moe, layer, options, state, tp
        self.ep = ep if ep is not None else tp
        p = f"layers.{layer}.mlp"
        self.norm = RMSNorm(h, cfg.norm_eps, f"{p}.norm.weight", NO_TP)
        out_std = scaled_init_std(cfg.init_std, cfg.layers)
        e, f = moe.experts, moe.ffn
        self.router = _holder(seed, f"{p}.router", weight=((e, h), cfg.init_std))
        self.experts = _holder(seed, f"{p}.experts", self.ep, w_gate=((e, f, h), cfg.init_std),
                               w_up=((e, f, h), cfg.init_std), w_down=((e, h, f), out_std))
        width = moe.shared_experts * f
        self.shared = _holder(seed, f"{p}.shared", w_gate=((width, h), cfg.init_std),
                              w_up=((width, h), cfg.init_std), w_down=((h, width), out_std)) if width else None
        self._normed = _maybe_compile(self.norm.forward, options)
        for param in self.experts.parameters():
            param.expert_parallel = True  # different on each rank of the expert group
        for param in self.parameters():  # each tp rank routes its own tokens: partial gradients
            if not is_expert(param):  # an expert's is whole on its own rank
                sum_grad_over_tp(param, tp, always=True)

    def forward(self, x):
        return carry_segments(self._moe, x)

    def _moe(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        """With tp the experts are whole on every tp rank and the tokens are split: with
        sequence parallelism the residual stream already is, else each rank takes its T/tp
        positions here and the outputs are gathered again (one all-gather)."""
        if self.tp.splits_sequence:
            return self._local(x)
        return gather_sequence(self._local(shard_sequence(x, self.tp)), self.tp)

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's positions (B, T/tp, H), routed as tokens in position-major order (every
        sequence's position 0, then 1, ...): the order in which a capacity keeps assignments,
        which the tp ranks' contiguous position blocks continue exactly."""
        h = _recomputed(self._normed, x) if self.options.recompute == "selective" else self._normed(x)
        tokens = h.transpose(0, 1).reshape(-1, h.shape[-1])
        bias = None
        if self.state is not None and self.moe.balance == "bias":
            bias = self.state.bias[self.state.row(self.layer)]
        routing = route(F.linear(tokens, self.router.weight), self.moe, bias)
        # capacity applies in training only: evaluation and generation run dropless, as
        # Mixtral and DeepSeek serve (a token's output must not depend on its batch)
        capacity = expert_capacity(self.moe, tokens.shape[0] * self.tp.size) if self.training else None
        earlier = earlier_assignments(routing, self.tp) if capacity is not None else None
        w = self.experts
        out, counts, dropped = dispatch(tokens, routing, (w.w_gate, w.w_up, w.w_down), capacity, earlier,
                                        self.ep)
        if self.shared is not None:
            out = out + swiglu(tokens, self.shared.w_gate, self.shared.w_up, self.shared.w_down)
        out = x + out.view(h.shape[1], h.shape[0], -1).transpose(0, 1)
        aux = None
        if self.moe.balance == "aux_loss" and self.training and torch.is_grad_enabled():
            context = self.options.context
            aux = aux_loss(routing, self.moe.aux_loss_coef, self.tp, context)
            scale = self.state.aux_grad_scale if self.state is not None else 1.0
            # x context: the context ranks' gradients are averaged as data ranks' are, and
            # each holds a part of one sequence (as LossFn scales its part of the mean)
            out = _AuxLossGrad.apply(out, aux, scale * context.size)
        if self.state is not None and self.training and not _in_backward():
            self.state.record(self.layer, counts, dropped, aux,
                              share=1.0 / (self.tp.size * self.options.context.size))
        return out
