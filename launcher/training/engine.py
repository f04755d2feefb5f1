"""The training engine: our model, optimizer and schedule under DeepSpeed.

pipeline > 1: DeepSpeed's PipelineModule (cut at our boundaries) + PipelineEngine (1F1B),
              ZeRO 0/1.
pipeline = 1: the plain DeepSpeedEngine with our mpu (tp and dp groups), ZeRO 0-3.

An MoE whose experts span data ranks (parallel.expert > parallel.tensor) shows DeepSpeed the
expert group as its model dimension and the ranks holding the same experts as its data
dimension (parallel/layout.py); parallel/expert_grads.py averages the dense gradients over
the rest.

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

from launcher.config.derived import sequence_parallel_on
from launcher.config.schema import Config
from launcher.ds.engine import initialize
from launcher.ds.pipeline import deepspeed_topology
from launcher.ds.seams import (
    StagedPipelineModule,
    capture_timer_logs,
    dp_gradients,
    dp_parameters,
    install_dp_reduction,
    keep_fp32_grad_norm,
    quiet_memory_reports,
    skip_compile_imports,
)
from launcher.hf.weights import load_hf_weights
from launcher.model.layers import BlockOptions
from launcher.model.llama import LlamaModel, LossFn, layer_specs
from launcher.model.moe import MoEState
from launcher.planning.plan import Plan
from launcher.training.fast_start import skip_dynamo_import
from launcher.training.optim import build_optimizer, build_scheduler
from parallel.compression import PowerSGDReducer
from parallel.costs import recompute_mode
from parallel.expert_grads import average_grads_over_expert_peers, mark_grad_norm_owners
from parallel.context import cut_micro_batch
from parallel.tensor_parallel import NO_TP, TensorParallel
from parallel.topology import ModelParallelUnit, ProcessGroups


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
    moe_state: Optional[MoEState] = None  # MoE balancing biases and counters, saved in checkpoints
    context: TensorParallel = NO_TP  # context parallelism: each micro-batch cut to this rank's positions

    @property
    def reads_data(self) -> bool:
        """Only the first (inputs) and last (targets) pipeline stages consume batches."""
        return not self.pipeline or self.groups.is_first_stage or self.groups.is_last_stage

    def train_step(self, micro_batches: list) -> tuple[float, Optional[float]]:
        micro_batches = self._cut(micro_batches)
        if self.pipeline:  # DeepSpeed averages over its data group: the ranks with the same experts
            loss = self._expert_peer_mean(self.ds.train_batch(data_iter=iter(micro_batches) if self.reads_data
                                                              else None))
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

    def moe_after_step(self) -> dict:
        """Collective (every rank), after each optimizer step of an MoE model: the step's
        expert counts summed over all ranks, the balancing biases moved, the figures per MoE
        layer for metrics.jsonl ({} for a dense model)."""
        return self.moe_state.after_step() if self.moe_state is not None else {}

    @torch.no_grad()
    def eval_loss(self, micro_batches: Optional[list]) -> float:
        """Mean loss over one global batch; `micro_batches` is None on middle pipeline stages,
        which read no data but still run every micro-batch (the global batch's count)."""
        micro_batches = self._cut(micro_batches)
        if self.pipeline:
            loss = self.ds.eval_batch(data_iter=iter(micro_batches) if self.reads_data else None,
                                      num_micro_batches=self.ds.micro_batches)
            return float(self._expert_peer_mean(loss))
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
        sink = getattr(self, "_captured_ms", {})  # filled by the seam as DeepSpeed logs its timers
        captured = dict(sink)
        sink.clear()  # in place: the seam holds this very dict
        return {f"time_{name}_ms": value for name, value in captured.items()}

    def capture_timer_logs(self) -> None:
        self._captured_ms = {}
        capture_timer_logs(self.ds, self._captured_ms)

    def _expert_peer_mean(self, value: torch.Tensor) -> torch.Tensor:
        """A pipeline loss, averaged by DeepSpeed over its data group, over the expert group's
        data ranks as well (nothing to do unless experts span data ranks)."""
        peers = self.groups.layout.experts_over_dp
        if peers > 1:
            value = value.detach().float().clone()
            dist.all_reduce(value, group=self.groups.expert_peer_group)
            value = value / peers
        return value

    def _dp_mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over every rank holding the same weights (dp x cp: each context rank's
        loss is its positions' mean, the same number of them on every rank)."""
        if self.groups.layout.replicas > 1:
            dist.all_reduce(value, group=self.groups.dp_group)
            value = value / self.groups.layout.replicas
        return value

    def _cut(self, micro_batches: Optional[list]) -> Optional[list]:
        if micro_batches is None or self.context.size == 1:
            return micro_batches
        return [cut_micro_batch(b, self.context) for b in micro_batches]


def build_engine(cfg: Config, plan: Plan, groups: ProcessGroups, device: torch.device,
                 ds_config: dict, init_from: Optional[str] = None) -> TrainEngine:
    """`init_from`: a Hugging Face directory whose weights replace the random init, each rank
    reading its own slices, before DeepSpeed copies them into its (fp32 master) buffers."""
    tp = TensorParallel(groups.tp_group if plan.layout.tp > 1 else None, groups.coord.tp, plan.layout.tp,
                        sequence_parallel=sequence_parallel_on(cfg.parallel, cfg.model, plan.layout.tp))
    ep = TensorParallel(groups.ep_group, groups.ep_rank, plan.layout.expert_degree) if plan.layout.ep else tp
    context = TensorParallel(groups.cp_group, groups.coord.cp, plan.layout.cp) if plan.layout.cp > 1 else NO_TP
    options = BlockOptions(fused=cfg.parallel.fused_projections, compile=cfg.model.compile,
                           recompute=recompute_mode(cfg.parallel.activation_checkpointing), context=context)
    full_recompute = options.recompute == "full"
    # seed None: no random draw for weights that init_from is about to overwrite
    moe_state = MoEState.build(cfg.model, device)
    if moe_state is not None:  # the aux loss's gradient is scaled as DeepSpeed scales the loss
        moe_state.aux_grad_scale = 1.0 / plan.layout.grad_accum
    specs = layer_specs(cfg.model, tp, seed=None if init_from else cfg.train.seed, options=options,
                        moe_state=moe_state, ep=ep)
    loss_fn = LossFn(tp, context)
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
        load_hf_weights(model, Path(init_from), tp.rank, tp.size, experts=(ep.rank, ep.size))
    mark_grad_norm_owners(model, groups)
    average_grads_over_expert_peers(model, groups)
    if not cfg.model.compile:
        skip_compile_imports()
        skip_dynamo_import()
    if cfg.logging.level != "debug":
        quiet_memory_reports()
    optimizer = build_optimizer(model, cfg.optimizer)
    # DeepSpeed's elastic ZeRO checkpoint (resume on another dp) records the optimizer step
    # from param_groups, where its own FusedAdam keeps it, and refuses to load without it.
    # torch's AdamW keeps the real count per parameter (carried through the elastic merge);
    # a constant group entry satisfies the bookkeeping and is read by nothing else.
    for group in optimizer.param_groups:
        group.setdefault("step", 0)
    scheduler = build_scheduler(optimizer, cfg.optimizer, cfg.schedule, cfg.train.steps)
    # DeepSpeed picks its device from $LOCAL_RANK, which export_env set to our device index.
    engine = initialize(model, optimizer, scheduler, ds_config, mpu=mpu)
    if plan.dtype == "fp32" and cfg.zero.stage == 0:
        keep_fp32_grad_norm(engine)
    compressor = None
    # nothing to communicate unless several ranks hold the same weights (dp, or with experts
    # over data ranks dp / (ep / tp): DeepSpeed's data group, parallel/layout.py)
    if cfg.compression.method == "powersgd" and plan.layout.ds_data > 1:
        compressor = build_compressor(engine, cfg, groups.expert_dp_group, pipeline)
    train_engine = TrainEngine(ds=engine, groups=groups, loss_fn=loss_fn, device=device, pipeline=pipeline,
                               compressor=compressor, moe_state=moe_state, context=context)
    if cfg.logging.time_breakdown:
        train_engine.capture_timer_logs()
    return train_engine


def build_compressor(engine, cfg: Config, dp_group, pipeline: bool) -> PowerSGDReducer:
    """PowerSGD as the engine's data-parallel gradient reduction (compression.method=powersgd,
    ZeRO 0/1); its state is what checkpoints save for compression."""
    params = dp_parameters(engine)
    # A weight tied across pipeline stages has a copy on each; both must get the same update.
    tied = {id(p) for p in engine.module.tied_modules.parameters()} if pipeline else set()
    c = cfg.compression
    reducer = PowerSGDReducer([p.shape for p in params], [id(p) in tied for p in params], dp_group,
                              rank=c.rank, warmup_steps=c.warmup_steps, error_feedback=c.error_feedback,
                              min_compression_rate=c.min_compression_rate, seed=cfg.train.seed)
    install_dp_reduction(engine, lambda: reducer.reduce_(dp_gradients(engine)))
    return reducer
