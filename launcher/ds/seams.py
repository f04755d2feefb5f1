

from __future__ import annotations

from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule

from launcher.config.schema import Config
from parallel.comm_bytes import CollectiveBytes
from parallel.compression import PowerSGDReducer
from parallel.topology import ProcessGroups


def keep_fp32_grad_norm(engine) -> None:
    """fp32 with ZeRO 0: DeepSpeed's `clip_fp32_gradients` clips but throws the norm away
    (`get_global_grad_norm()` stays None), and counts a pipeline-tied weight on both of its
    stages. This replacement counts each parameter once (the marks above, skipping
    DeepSpeed's `ds_pipe_replicated` copies), clips by the same rule and keeps the norm."""
    from deepspeed.runtime.utils import is_model_parallel_parameter

    def clip() -> None:
        params = [p for p in engine.module.parameters() if p.grad is not None]
        counted = [p.grad.detach().float().pow(2).sum() for p in params
                   if is_model_parallel_parameter(p) and not getattr(p, "ds_pipe_replicated", False)]
        sq = torch.stack(counted).sum() if counted else torch.zeros((), device=params[0].device)
        dist.all_reduce(sq, group=engine.mpu.get_model_parallel_group())  # the ranks holding one model replica
        norm = sq.sqrt()
        coef = torch.clamp(engine.gradient_clipping() / (norm + 1e-6), max=1.0)
        for p in params:
            p.grad.detach().mul_(coef)
        engine._global_grad_norm = norm.item()

    engine.clip_fp32_gradients = clip


def dp_parameters(engine) -> list[torch.nn.Parameter]:
    """The parameters whose gradients DeepSpeed averages over data parallel, in a fixed
    order (the same on every data-parallel peer)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if isinstance(engine.optimizer, BF16_Optimizer):
        return [p for params in engine.optimizer.bf16_groups for p in params]
    return [p for p in engine.module.parameters() if p.requires_grad]


def dp_gradients(engine) -> list[torch.Tensor]:
    """Where those gradients are at the accumulation boundary: `param.grad`, or with the bf16
    optimizer (bf16 with ZeRO 0/1) its fp32 accumulators, flat per param group."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    opt = engine.optimizer
    if isinstance(opt, BF16_Optimizer):
        return [g.view(p.shape) for params, grads in zip(opt.bf16_groups, opt.fp32_groups_gradients)
                for p, g in zip(params, grads)]
    grads = [p.grad for p in dp_parameters(engine)]
    if any(g is None for g in grads):
        raise RuntimeError("compression: a parameter got no gradient; every parameter must take part in the step")
    return grads


def route_dp_reduction(engine, cfg: Config, dp_group, pipeline: bool) -> PowerSGDReducer:
    """Make PowerSGD the data-parallel gradient reduction of a DeepSpeed engine (ZeRO 0/1).

    DeepSpeed reduces gradients in `allreduce_gradients` (called by `backward`, and by the
    pipeline engine's ReduceGrads instruction) or, for the pipeline engine with its bf16
    optimizer, in `_bf16_reduce_grads`. Both become: our reduction at the accumulation
    boundary, after which every data-parallel rank holds the same averaged gradients. ZeRO
    0 and the bf16 optimizer have nothing left to do. ZeRO 1's optimizer still runs its
    reduction to file each rank's partition of the gradient, with its collective
    (`gradient_reduction_w_predivide`, an averaging all-reduce) replaced by the identity:
    the average of equal tensors is the tensor. DeepSpeed has no hook for this; these are
    the narrowest seams, and the equivalence tests (exact warm-up = `none`) guard them."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    params = dp_parameters(engine)
    # A weight tied across pipeline stages has a copy on each; both must get the same update.
    tied = {id(p) for p in engine.module.tied_modules.parameters()} if pipeline else set()
    c = cfg.compression
    reducer = PowerSGDReducer([p.shape for p in params], [id(p) in tied for p in params], dp_group,
                              rank=c.rank, warmup_steps=c.warmup_steps, error_feedback=c.error_feedback,
                              min_compression_rate=c.min_compression_rate, seed=cfg.train.seed)
    zero_reduce = engine.allreduce_gradients if isinstance(engine.optimizer, DeepSpeedZeroOptimizer) else None

    def allreduce_gradients(bucket_size=None) -> None:
        if not engine.is_gradient_accumulation_boundary():
            return  # ZeRO 0/1 reduce only at the boundary
        reducer.reduce_(dp_gradients(engine))
        if zero_reduce is not None:
            zero_reduce()

    if zero_reduce is not None:
        engine.optimizer.gradient_reduction_w_predivide = lambda tensor, communication_data_type: tensor
    engine.allreduce_gradients = allreduce_gradients
    engine._bf16_reduce_grads = allreduce_gradients
    return reducer


def count_dp_bytes(groups: ProcessGroups) -> CollectiveBytes:
    """Start counting this rank's data-parallel collective bytes (logging.comm_bytes)."""
    from deepspeed.comm import comm as ds_comm

    counter = CollectiveBytes(groups.dp_ranks).install()
    backend = ds_comm.cdb
    if backend is not None:  # it picked its all-gather / reduce-scatter before the wrapper existed
        backend.all_gather_function = backend.get_all_gather_function()
        backend.reduce_scatter_function = backend.get_reduce_scatter_function()
    return counter


def _deepspeed_groups_get_timeout(timeout: timedelta) -> None:
    """Make the groups DeepSpeed creates itself (pipeline grid, p2p, tied weights, ZeRO,
    deepspeed.utils.groups) carry our timeout.

    torch gives a group made without `timeout=` its backend's default (30 min gloo, 10 min
    NCCL; torch 2.13 `_new_group_with_tag` -> `_get_default_timeout`), not the world group's.
    Every DeepSpeed group goes through `deepspeed.comm.new_group(ranks)` ->
    `TorchBackend.new_group(ranks)` -> `torch.distributed.new_group(ranks)`, with no timeout.
    So we replace that one method on DeepSpeed's backend object (`deepspeed.comm.comm.cdb`),
    leaving torch.distributed itself untouched; assigning it again on a second call replaces,
    never stacks. (DeepSpeed's `init_device_mesh` path is not covered; we do not use it.)"""
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist

    def new_group(ranks, **kwargs):
        kwargs.setdefault("timeout", timeout)
        return dist.new_group(ranks, **kwargs)

    ds_comm.cdb.new_group = new_group


class StagedPipelineModule(PipelineModule):
    def __init__(self, layers: Sequence, parts: Sequence[int], **kwargs):
        layers = list(layers)
        stages = kwargs["topology"].get_dim("pipe")
        if len(parts) != stages + 1 or parts[0] != 0 or parts[-1] != len(layers):
            raise ValueError(f"boundaries {list(parts)} do not cover {len(layers)} layers in {stages} stages")
        if any(b <= a for a, b in zip(parts, parts[1:])):
            raise ValueError(f"boundaries {list(parts)} leave a stage empty")
        self._explicit_parts = [int(p) for p in parts]
        # (DeepSpeed's constructor ends with `self.to(cuda:$LOCAL_RANK)`: launcher.launch_env.
        # export_env makes LOCAL_RANK the device index we picked.)
        super().__init__(layers, partition_method="explicit", **kwargs)

    def _partition_layers(self, method: str = "explicit") -> None:
        self.parts = list(self._explicit_parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])
