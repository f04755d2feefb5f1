"""The DeepSpeed engine: its config generated from ours, the model, optimizer and schedule.

pipeline > 1: DeepSpeed's PipelineModule (cut at our boundaries) + PipelineEngine (1F1B),
              ZeRO 0/1.
pipeline = 1: the plain DeepSpeedEngine with our mpu (tp and dp groups), ZeRO 0-3.

`TrainEngine.train_step` runs one optimizer step over this rank's micro-batches and returns
the loss averaged over the whole global batch (what a single process would report) and the
global gradient norm.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from launcher.config import Config, ConfigError, sequence_parallel_on
from launcher.hf_weights import load_hf_weights
from launcher.model import BlockOptions, LlamaModel, LossFn, layer_specs
from launcher.optim import build_optimizer, build_scheduler
from launcher.plan import Plan
from parallel.comm_bytes import CollectiveBytes
from parallel.compression import PowerSGDReducer
from parallel.costs import recompute_mode
from parallel.pipeline import StagedPipelineModule
from parallel.tensor_parallel import TensorParallel
from parallel.topology import ModelParallelUnit, ProcessGroups, deepspeed_topology


def deepspeed_config(cfg: Config, plan: Plan) -> dict:
    """The DeepSpeed config, generated from ours, with the user's `deepspeed:` block merged
    in. A user key that contradicts a generated one is a ConfigError (one source of truth)."""
    lay = plan.layout
    generated = {
        "train_batch_size": lay.global_batch,
        "train_micro_batch_size_per_gpu": lay.micro_batch,
        "gradient_accumulation_steps": lay.grad_accum,
        "gradient_clipping": cfg.optimizer.grad_clip,
        # elastic_checkpoint: ZeRO 1/2 optimizer shards saved so that a resume may change dp
        "zero_optimization": {"stage": cfg.zero.stage, **({"elastic_checkpoint": True} if cfg.zero.stage in (1, 2) else {})},
        "bf16": {"enabled": plan.dtype == "bf16"},
        "fp16": {"enabled": plan.dtype == "fp16", "loss_scale": 0,
                 "initial_scale_power": cfg.precision.fp16_initial_scale_power},
        "zero_allow_untested_optimizer": True,  # Lion is ours; ZeRO wraps any torch optimizer
        "steps_per_print": 2**31 - 1,  # we log; keep DeepSpeed's own step prints quiet
        "wall_clock_breakdown": cfg.logging.time_breakdown,
    }
    if lay.pp > 1 and sequence_parallel_on(cfg.parallel, cfg.model, lay.tp):
        # DeepSpeed's pipeline sends each activation split over the tensor group and
        # all-gathers it on the receiving stage, which is right only for tp-replicated
        # activations; with sequence parallelism each tp rank sends its own sequence shard.
        generated["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if plan.dtype == "bf16":
        generated.update(bf16_gradient_settings(cfg, plan))
    if cfg.zero.offload_optimizer:
        # The config's own optimizer steps the host-side partitions; DeepSpeed would otherwise
        # insist on its compiled CPU Adam (a C++ build at first use).
        generated["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        generated["zero_force_ds_cpu_optimizer"] = False
    method = cfg.compression.method
    if method in ("fp16", "bf16"):
        generated["communication_data_type"] = method
    elif method == "powersgd" and cfg.zero.stage == 1:
        # ZeRO 1's own reduction stays in place for its bookkeeping (each rank's partition of
        # the already averaged gradient into the optimizer's buffers) with its collective made
        # the identity (`route_dp_reduction`). These settings make that collective a single
        # full-gradient all-reduce per bucket, in the step, in the order we reduce.
        generated["zero_optimization"].update(reduce_scatter=False, overlap_comm=False, contiguous_gradients=True)
    return merge_user_block(generated, cfg.deepspeed)


def bf16_gradient_settings(cfg: Config, plan: Plan) -> dict:
    """bf16 training accumulates micro-batch gradients and reduces them over data parallel
    in fp32, as Megatron and torchtitan do: a bf16 sum of 16+ micro-batches loses the
    small ones (8 bits of mantissa). DeepSpeed's paths:
      - pipeline, ZeRO 0: its bf16 optimizer, which accumulates in fp32 by construction;
      - ZeRO 1: `grad_accum_dtype: fp32` selects that same bf16 optimizer (fp32 master
        weights and gradients, optimizer state sharded);
      - ZeRO 2/3: `grad_accum_dtype: fp32` gives its partitions fp32 gradient buffers;
      - no pipeline, ZeRO 0: DeepSpeed's bf16 wrapper sums micro-batch gradients in the bf16
        `.grad` and refuses `grad_accum_dtype: fp32` (NotImplementedError), so it is refused.
    The reduction's dtype follows `communication_data_type` (default: the model's, bf16),
    so it is set to fp32 unless compression.method asks for less."""
    if plan.layout.pp == 1 and cfg.zero.stage == 0:
        raise ConfigError("zero.stage", "bf16 with zero.stage=0 and parallel.pipeline=1 would accumulate gradients "
                          "in bf16 (DeepSpeed has no fp32 accumulation there); use zero.stage=1 (its bf16 "
                          "optimizer, fp32 gradients), or precision.dtype=fp32")
    settings: dict = {"communication_data_type": "fp32"}
    if cfg.zero.stage > 0:
        settings["data_types"] = {"grad_accum_dtype": "fp32"}
    return settings


def merge_user_block(generated: dict, user: dict, prefix: str = "deepspeed") -> dict:
    merged = dict(generated)
    for key, value in user.items():
        path = f"{prefix}.{key}"
        if key not in generated:
            merged[key] = value
        elif isinstance(generated[key], dict) and isinstance(value, dict):
            merged[key] = merge_user_block(generated[key], value, path)
        elif generated[key] != value:
            raise ConfigError(path, f"{value!r} contradicts the value generated from the config "
                              f"({generated[key]!r}); set it through the launcher's own keys")
    return merged


def mark_grad_norm_owners(model: torch.nn.Module, tp_rank: int) -> None:
    """Make DeepSpeed count every parameter once in the global grad norm: tp-sharded
    parameters on every rank (already `tensor_model_parallel`), tp-replicated ones (norm
    gains) on tp rank 0 only. DeepSpeed's norm code counts a parameter when it is marked
    model-parallel or when the rank is model-parallel rank 0."""
    for p in model.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            p.model_parallel = tp_rank == 0


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


def to_device(x, device: torch.device):
    """A micro-batch's inputs or targets onto the device: a tensor, or a tuple of them
    ((ids, segments) with document attention, (targets, loss_mask) with eod_mask_loss)."""
    if isinstance(x, (tuple, list)):
        return tuple(t.to(device) for t in x)
    return x.to(device)


@dataclass
class TrainEngine:
    ds: Any  # deepspeed DeepSpeedEngine or PipelineEngine
    groups: ProcessGroups
    loss_fn: LossFn
    device: torch.device
    pipeline: bool
    compressor: Optional[PowerSGDReducer] = None  # PowerSGD's state, saved in checkpoints

    @property
    def reads_data(self) -> bool:
        """Only the first (inputs) and last (targets) pipeline stages consume batches."""
        return not self.pipeline or self.groups.is_first_stage or self.groups.is_last_stage

    def train_step(self, micro_batches: list) -> tuple[float, Optional[float]]:
        if self.pipeline:
            loss = self.ds.train_batch(data_iter=iter(micro_batches) if self.reads_data else None)
        else:
            losses = []
            for inputs, targets in micro_batches:
                micro_loss = self.loss_fn(self.ds(to_device(inputs, self.device)), to_device(targets, self.device))
                self.ds.backward(micro_loss)
                self.ds.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
                losses.append(micro_loss.detach().float())
            loss = self._dp_mean(torch.stack(losses).mean())
        grad_norm = self.ds.get_global_grad_norm()
        return float(loss), (float(grad_norm) if grad_norm is not None else None)

    @torch.no_grad()
    def eval_loss(self, micro_batches: Optional[list]) -> float:
        """Mean loss over one global batch; `micro_batches` is None on middle pipeline stages,
        which read no data but still run every micro-batch (the global batch's count)."""
        if self.pipeline:
            loss = self.ds.eval_batch(data_iter=iter(micro_batches) if self.reads_data else None,
                                      num_micro_batches=self.ds.micro_batches)
            return float(loss)
        self.ds.eval()
        losses = [self.loss_fn(self.ds(to_device(i, self.device)), to_device(t, self.device)).float()
                  for i, t in micro_batches]
        self.ds.train()
        return float(self._dp_mean(torch.stack(losses).mean()))

    def loss_scale(self) -> Optional[float]:
        """fp16's dynamic loss scale (None in fp32/bf16)."""
        if not self.ds.fp16_enabled():
            return None
        scale = getattr(self.ds.optimizer, "cur_scale", None) or getattr(self.ds.optimizer, "loss_scale", None)
        return float(scale) if scale is not None else None

    def time_breakdown_ms(self) -> dict:
        """What DeepSpeed's wall-clock breakdown reported since the last call, in ms
        (forward, backward, allreduce, optimizer step; send/recv with pipelines); empty
        unless logging.time_breakdown. DeepSpeed prints and resets its timers itself at each
        step, so the values are caught as it logs them (see `capture_timer_logs`)."""
        captured, self._captured_ms = getattr(self, "_captured_ms", {}), {}
        return {f"time_{name}_ms": value for name, value in captured.items()}

    def capture_timer_logs(self) -> None:
        timers, real_log = self.ds.timers, self.ds.timers.log
        self._captured_ms = {}

        def log(names, normalizer=1.0, reset=True, **kwargs):
            for name in names:
                if name in timers.get_timers():
                    value = timers.get_timers()[name].elapsed(reset=False) / normalizer
                    self._captured_ms[name] = self._captured_ms.get(name, 0.0) + value
            return real_log(names, normalizer=normalizer, reset=reset, **kwargs)

        timers.log = log

    def _dp_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.groups.layout.dp > 1:
            dist.all_reduce(value, group=self.groups.dp_group)
            value = value / self.groups.layout.dp
        return value


def build_engine(cfg: Config, plan: Plan, groups: ProcessGroups, device: torch.device,
                 ds_config: dict, init_from: Optional[str] = None) -> TrainEngine:
    """`init_from`: a Hugging Face directory whose weights replace the random init, each rank
    reading its own slices, before DeepSpeed copies them into its (fp32 master) buffers."""
    import deepspeed

    tp = TensorParallel(groups.tp_group if plan.layout.tp > 1 else None, groups.coord.tp, plan.layout.tp,
                        sequence_parallel=sequence_parallel_on(cfg.parallel, cfg.model, plan.layout.tp))
    options = BlockOptions(fused=cfg.parallel.fused_projections, compile=cfg.model.compile,
                           recompute=recompute_mode(cfg.parallel.activation_checkpointing))
    full_recompute = options.recompute == "full"
    # seed None: no random draw for weights that init_from is about to overwrite
    specs = layer_specs(cfg.model, tp, seed=None if init_from else cfg.train.seed, options=options)
    loss_fn = LossFn(tp)
    checkpoint_fn = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    pipeline = plan.layout.pp > 1
    if pipeline:
        model = StagedPipelineModule(
            specs, plan.parts, topology=deepspeed_topology(plan.layout), loss_fn=loss_fn,
            activation_checkpoint_interval=1 if full_recompute else 0,
            activation_checkpoint_func=checkpoint_fn)
        mpu = None  # the pipeline engine builds its grid from the topology
    else:
        model = LlamaModel(specs, checkpoint_fn if full_recompute else None).to(device)
        mpu = ModelParallelUnit(groups)
    if init_from:
        load_hf_weights(model, Path(init_from), tp.rank, tp.size)
    mark_grad_norm_owners(model, groups.coord.tp)
    optimizer = build_optimizer(model, cfg.optimizer)
    # DeepSpeed's elastic ZeRO checkpoint (resume on another dp) records the optimizer step
    # from param_groups, where its own FusedAdam keeps it, and refuses to load without it.
    # torch's AdamW keeps the real count per parameter (carried through the elastic merge);
    # a constant group entry satisfies the bookkeeping and is read by nothing else.
    for group in optimizer.param_groups:
        group.setdefault("step", 0)
    scheduler = build_scheduler(optimizer, cfg.optimizer, cfg.schedule, cfg.train.steps)
    # DeepSpeed picks its device from $LOCAL_RANK, which export_env set to our device index.
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, mpu=mpu)
    if plan.dtype == "fp32" and cfg.zero.stage == 0:
        keep_fp32_grad_norm(engine)
    compressor = None
    if cfg.compression.method == "powersgd" and plan.layout.dp > 1:  # dp 1 has nothing to communicate
        compressor = route_dp_reduction(engine, cfg, groups.dp_group, pipeline)
    train_engine = TrainEngine(ds=engine, groups=groups, loss_fn=loss_fn, device=device, pipeline=pipeline,
                               compressor=compressor)
    if cfg.logging.time_breakdown:
        train_engine.capture_timer_logs()
    return train_engine
