"""What the gradients need when an MoE's experts span data ranks (parallel/layout.py): the
dense weights' gradients averaged over the expert group's data ranks, and which rank counts
each weight in the global gradient norm.

DeepSpeed is shown the expert group as its model-parallel dimension and the ranks holding the
same experts as its data dimension (launcher/ds/pipeline.py, parallel/topology.py), so it
reduces every gradient over those ranks only: right for an expert, whose replicas they are,
and short of the expert group's other data ranks for a dense weight. The hooks below close
that gap before DeepSpeed sees the gradient. Written here rather than taken from
DeepSpeed's MoE support (its expert parameter groups and `groups` helpers), which expects
its own MoE layer classes and per-expert checkpoint files: docs/MOE.md has the comparison.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.topology import ProcessGroups


def is_expert(param: torch.nn.Parameter) -> bool:
    """An expert's weights: different on every rank of the expert group (launcher/model/moe.py)."""
    return getattr(param, "expert_parallel", False)


def average_grads_over_expert_peers(model: torch.nn.Module, groups: ProcessGroups) -> None:
    """With experts over data ranks (`peers` data ranks per expert group), bring every
    gradient to what DeepSpeed's average over its data group expects: a rank's local
    gradient of its own micro-batch's mean loss.

    - A dense weight: averaged over this rank's expert-group peers (same tp rank, the other
      data ranks of its expert group).
    - An expert: its gradient already holds the tokens of all `peers` micro-batches (they
      came by all-to-all), each scaled as its own rank's mean loss: divided by `peers`.

    Hooks on the weights, before accumulation, so gradient accumulation stays exact and ZeRO
    2's reduction, which starts from the accumulated gradient, sees the result. They run in
    autograd's order, which is the same on every peer (one graph shape, launcher/model/experts.py)."""
    peers = groups.layout.experts_over_dp
    if peers == 1:
        return
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if is_expert(param):
            param.register_hook(lambda grad: grad / peers)
        else:
            param.register_hook(lambda grad: _mean(grad, groups.expert_peer_group, peers))


def _mean(grad: torch.Tensor, group, size: int) -> torch.Tensor:
    grad = grad.contiguous()
    dist.all_reduce(grad, group=group)
    return grad.div_(size)


def mark_grad_norm_owners(model: torch.nn.Module, groups: ProcessGroups) -> None:
    """Make DeepSpeed count every weight once in the global gradient norm. Its norm code
    counts a weight when it is marked model-parallel or the rank is model-parallel rank 0,
    then sums over its model group (the expert group). So: an expert's weights on every
    rank; a tp-split weight on each tp rank of the expert group's first data rank (its copies
    on the other data ranks are unmarked); a replicated weight (norm gains, router) on expert
    rank 0 only."""
    first_data_rank = groups.coord.dp % groups.layout.experts_over_dp == 0
    for param in model.parameters():
        if is_expert(param):
            param.model_parallel = True
        elif getattr(param, "tensor_model_parallel", False):
            param.tensor_model_parallel = param.model_parallel = first_data_rank
        else:
            param.model_parallel = groups.ep_rank == 0
