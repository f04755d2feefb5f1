"""What a config means for a world size: the `Plan` value (the resolved Layout, the stage
boundaries over the pipeline items, the training dtype, the items' costs and the memory
model the partitioner used), `make_plan` that builds it, and `describe`, the lines printed
before training.

Pure arithmetic on the config (no torch, no process group), so `--dry-run` checks a
512-GPU config on a laptop, and the training entry point prints the very same lines.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.config.derived import sequence_parallel_on
from launcher.config.schema import Config
from launcher.errors import ConfigError
from launcher.planning.precision import DeviceSupport, resolve_dtype
from parallel.costs import ItemCost, item_costs, parameter_counts, recompute_mode
from parallel.layout import Layout, resolve_layout
from parallel.memory import dtype_bytes, state_bytes
from parallel.partition import (
    GB,
    MemoryModel,
    PartitionError,
    format_stage_table,
    max_stage_flops,
    partition,
    stage_table,
)


@dataclass(frozen=True)
class Plan:
    """A config resolved for one world size and device (its auto keys already resolved)."""

    layout: Layout
    dtype: str  # resolved: fp32 | bf16 | fp16
    costs: list[ItemCost]
    parts: list[int]  # pipeline stage boundaries over the items
    memory: MemoryModel


def make_plan(cfg: Config, world_size: int, device: DeviceSupport) -> Plan:
    """Resolve the layout, dtype and stage boundaries; every problem is a ConfigError."""
    layout = resolve_layout(cfg.parallel, world_size)
    dtype = resolve_dtype(cfg, device)
    if "auto" in (cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.micro_batch,
                  cfg.parallel.activation_checkpointing):
        raise ValueError("make_plan needs a config whose auto keys are resolved (resolve_auto)")
    costs = item_costs(cfg.model, tp=layout.tp, micro_batch=layout.micro_batch,
                       dtype_bytes=dtype_bytes(dtype),
                       recompute=cfg.parallel.activation_checkpointing,
                       sequence_parallel=sequence_parallel_on(cfg.parallel, cfg.model, layout.tp), ep=layout.ep)
    # ZeRO shards over DeepSpeed's data group: the ranks holding the same experts (parallel/layout.py)
    memory = MemoryModel(stages=layout.pp, grad_accum=layout.grad_accum,
                         bytes_per_param=state_bytes(dtype, cfg.optimizer.name, cfg.zero.stage, layout.ds_data).total)
    cap = cfg.parallel.stage_memory_gb * GB if cfg.parallel.stage_memory_gb is not None else None
    try:
        parts = partition(cfg.parallel.partition, costs, layout.pp, memory, cap)
    except PartitionError as err:
        key = "parallel.stage_memory_gb" if "stage_memory_gb" in str(err) else "parallel.partition"
        raise ConfigError(key, str(err)) from None
    return Plan(layout=layout, dtype=dtype, costs=costs, parts=parts, memory=memory)


def moe_line(m) -> str:
    """The MoE part of the model (model.moe): total and active parameters, the experts."""
    total, active = parameter_counts(m)
    e = m.moe
    balance = {"aux_loss": f"aux loss x {e.aux_loss_coef:g}", "bias": f"bias, rate {e.bias_rate:g}",
               "none": "none"}[e.balance]
    drops = "dropless" if e.capacity_factor is None else f"capacity factor {e.capacity_factor:g}"
    def size(n: int) -> str:
        return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"

    return (f"moe        {size(total)} params, {size(active)} active per token: layers "
            f"{e.first_dense}-{m.layers - 1} route to {e.top_k} of {e.experts} experts (ffn {e.ffn}) + "
            f"{e.shared_experts} shared, {e.router} router, balance {balance}, {drops}")


def experts_line(m, lay: Layout) -> str:
    """Where an MoE's experts live: the expert groups and the ranks holding the same experts."""
    ep, over = lay.expert_degree, lay.experts_over_dp
    group = (f"tp {lay.tp} x {over} consecutive dp ranks; expert rank = (dp % {over})*{lay.tp} + tp"
             if over > 1 else "the tp group")
    return (f"experts    ep {ep} = {group}: {m.moe.experts // ep} of {m.moe.experts} experts per rank, each "
            f"held by {lay.ds_data} rank(s): its expert-data-parallel replicas")


def describe(cfg: Config, plan: Plan, device: str) -> str:
    """The lines printed before training (and by --dry-run)."""
    m, lay = cfg.model, plan.layout
    params = sum(c.params for c in plan.costs)
    total_flops = sum(c.flops_per_token for c in plan.costs)
    ideal = total_flops / lay.pp
    tokens = lay.global_batch * m.seq_len
    kv = f"kv {m.n_kv_heads}" + (" GQA" if m.n_kv_heads != m.heads else "")
    if lay.cp > 1:
        order = (f"layout     world {lay.world_size} = tp {lay.tp} x cp {lay.cp} x pp {lay.pp} x dp {lay.dp} "
                 f"(rank = ((pp*{lay.dp} + dp)*{lay.cp} + cp)*{lay.tp} + tp; tp innermost, then cp)")
    else:
        order = (f"layout     world {lay.world_size} = tp {lay.tp} x pp {lay.pp} x dp {lay.dp} "
                 f"(rank = (pp*{lay.dp} + dp)*{lay.tp} + tp; tp innermost)")
    lines = [
        order,
        f"batch      micro_batch {lay.micro_batch} x grad_accum {lay.grad_accum} x dp {lay.dp} "
        f"= global_batch {lay.global_batch} sequences = {tokens:,} tokens/step",
        f"model      {params / 1e9:.3f}B params: {m.layers} layers, hidden {m.hidden}, heads {m.heads} ({kv}), "
        f"ffn {m.ffn}, vocab {m.vocab}, seq {m.seq_len}, tied {'yes' if m.tie_embeddings else 'no'}",
        *([moe_line(m), experts_line(m, lay)] if m.moe is not None else []),
        f"engine     device {device}, precision {plan.dtype}, ZeRO {cfg.zero.stage}, optimizer {cfg.optimizer.name}, "
        f"recompute {recompute_mode(cfg.parallel.activation_checkpointing)}, sequence parallel "
        f"{'on' if sequence_parallel_on(cfg.parallel, cfg.model, lay.tp) else 'off'}",
        f"pipeline   {lay.pp} stage(s), partition '{cfg.parallel.partition}', slowest stage "
        f"{max_stage_flops(plan.costs, plan.parts) / ideal:.3f}x the ideal (total/pp)",
        format_stage_table(stage_table(plan.costs, plan.parts, plan.memory)),
    ]
    return "\n".join(lines)
