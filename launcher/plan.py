"""`python -m launcher.plan`: what a config needs and how fast it could run, before launch.

    python -m launcher.plan --config configs/llama_7b.yaml --nodes 4 --gpus-per-node 8 --gpu h100
        [--gpu-memory 80GB] [--efficiency 0.5] [--intra-node-gbps 450] [--inter-node-gbps 50]
        [--pcie-gbps 50] [--top 10] [--json] [--list-gpus] [section.key=value ...]

prints, for the config's layout, the memory of one rank of every pipeline stage (weights,
gradients, optimizer states under its ZeRO stage, activations x the micro-batches 1F1B
keeps in flight, the loss's and the reduction's buffers, fixed overhead, margin) and whether
it fits; the usual rule of thumb beside it; and the layouts that fit, fastest first, with
the reason the first wins. No GPU needed. The same estimate resolves `auto` in the parallel
section at launch, and refuses a layout that cannot fit before anything is allocated
(`python -m launcher.train --force` tries anyway). The model: parallel/memory.py (bytes),
parallel/planner.py (time), parallel/hardware.py (GPU figures), docs/SCALING.md.

Also what a config means for a world size (`make_plan`, `describe`): the layout, the stage
split and its table, pure arithmetic on the config (no torch, no process group), so
`--dry-run` checks a 512-GPU config on a laptop, and the training entry point prints the
very same lines.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

from launcher.config import (CONFIG_ERROR_EXIT_CODE, Config, ConfigError, check_config, load_config,
                             sequence_parallel_on)
from launcher.precision import ASSUMED_GPU, DeviceSupport, resolve_dtype
from parallel.costs import RECOMPUTE_MODES, ItemCost, item_costs, recompute_mode
from parallel.hardware import CPU, PRESETS, Hardware, preset
from parallel.memory import dtype_bytes, state_bytes
from parallel.planner import (RUNNABLE_RECOMPUTE, Candidate, Cluster, Estimate, Workload, candidates, estimate,
                              rank_layouts, why_faster)
from parallel.partition import (
    GB,
    MemoryModel,
    PartitionError,
    format_stage_table,
    max_stage_flops,
    partition,
    stage_table,
)
from parallel.topology import Layout, resolve_layout


@dataclass(frozen=True)
class Plan:
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
                       sequence_parallel=sequence_parallel_on(cfg.parallel, cfg.model, layout.tp))
    memory = MemoryModel(stages=layout.pp, grad_accum=layout.grad_accum,
                         bytes_per_param=state_bytes(dtype, cfg.optimizer.name, cfg.zero.stage, layout.dp).total)
    cap = cfg.parallel.stage_memory_gb * GB if cfg.parallel.stage_memory_gb is not None else None
    try:
        parts = partition(cfg.parallel.partition, costs, layout.pp, memory, cap)
    except PartitionError as err:
        key = "parallel.stage_memory_gb" if "stage_memory_gb" in str(err) else "parallel.partition"
        raise ConfigError(key, str(err)) from None
    return Plan(layout=layout, dtype=dtype, costs=costs, parts=parts, memory=memory)


def default_world_size(cfg: Config, hardware: Hardware = PRESETS["h100"]) -> int:
    """The smallest world the config fits: tp * pp * (data, or 1 when auto); with an auto
    tensor or pipeline degree, the fewest whole nodes of 8 GPUs of `hardware` it fits on."""
    p = cfg.parallel
    if "auto" in (p.tensor, p.pipeline):
        return smallest_world(cfg, hardware, 8)
    return p.tensor * p.pipeline * (1 if p.data == "auto" else p.data)


def describe(cfg: Config, plan: Plan, device: str) -> str:
    """The lines printed before training (and by --dry-run)."""
    m, lay = cfg.model, plan.layout
    params = sum(c.params for c in plan.costs)
    total_flops = sum(c.flops_per_token for c in plan.costs)
    ideal = total_flops / lay.pp
    tokens = lay.global_batch * m.seq_len
    kv = f"kv {m.n_kv_heads}" + (" GQA" if m.n_kv_heads != m.heads else "")
    lines = [
        f"layout     world {lay.world_size} = tp {lay.tp} x pp {lay.pp} x dp {lay.dp} "
        f"(rank = (pp*{lay.dp} + dp)*{lay.tp} + tp; tp innermost)",
        f"batch      micro_batch {lay.micro_batch} x grad_accum {lay.grad_accum} x dp {lay.dp} "
        f"= global_batch {lay.global_batch} sequences = {tokens:,} tokens/step",
        f"model      {params / 1e9:.3f}B params: {m.layers} layers, hidden {m.hidden}, heads {m.heads} ({kv}), "
        f"ffn {m.ffn}, vocab {m.vocab}, seq {m.seq_len}, tied {'yes' if m.tie_embeddings else 'no'}",
        f"engine     device {device}, precision {plan.dtype}, ZeRO {cfg.zero.stage}, optimizer {cfg.optimizer.name}, "
        f"recompute {recompute_mode(cfg.parallel.activation_checkpointing)}, sequence parallel "
        f"{'on' if sequence_parallel_on(cfg.parallel, cfg.model, lay.tp) else 'off'}",
        f"pipeline   {lay.pp} stage(s), partition '{cfg.parallel.partition}', slowest stage "
        f"{max_stage_flops(plan.costs, plan.parts) / ideal:.3f}x the ideal (total/pp)",
        format_stage_table(stage_table(plan.costs, plan.parts, plan.memory)),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The planner applied to a config: auto keys, the fit check, smallest world
# --------------------------------------------------------------------------------------

AUTO_KEYS = ("tensor", "pipeline", "micro_batch", "activation_checkpointing")
GIB = 1024**3


def workload(cfg: Config, dtype: str) -> Workload:
    zero_block = cfg.deepspeed.get("zero_optimization") if isinstance(cfg.deepspeed, dict) else None
    bucket = (zero_block or {}).get("reduce_bucket_size", None)
    extra = {"reduce_bucket": int(bucket)} if isinstance(bucket, (int, float)) and bucket > 0 else {}
    return Workload(model=cfg.model, global_batch=cfg.parallel.global_batch, dtype=dtype,
                    optimizer=cfg.optimizer.name, compression=cfg.compression.method,
                    compression_rank=cfg.compression.rank, partition=cfg.parallel.partition,
                    sequence_parallel=cfg.parallel.sequence_parallel, **extra)


def assumed_cluster(world_size: int, hardware: Hardware = PRESETS["h100"]) -> Cluster:
    """What --dry-run plans for: nodes of up to 8 GPUs of `hardware` (H100 by default)."""
    per_node = math.gcd(max(world_size, 1), 8)
    return Cluster(nodes=max(world_size, 1) // per_node, gpus_per_node=per_node, hardware=hardware)


def detect_cluster(world_size: int, local_world_size: Optional[int], device) -> Cluster:
    """The cluster this launch runs on: the device's own memory; GPU figures from the preset
    its name matches (H100's when none does); on CPU, the available host memory shared by
    this node's ranks. `local_world_size` None (not told by the launcher): the GPUs this node
    has, on CPU every rank (the cautious share)."""
    cuda = getattr(device, "type", "cpu") == "cuda"
    if local_world_size is None:
        import torch

        local_world_size = torch.cuda.device_count() if cuda else world_size
    per_node = max(1, min(local_world_size, world_size))
    nodes = max(1, world_size // per_node)
    if cuda:
        import torch

        props = torch.cuda.get_device_properties(device)
        try:
            hardware = preset(props.name)
        except KeyError:
            hardware = dataclasses.replace(PRESETS["h100"], name=f"{props.name} (H100 figures assumed)")
        return Cluster(nodes, per_node, hardware.with_memory(props.total_memory / GIB))
    return Cluster(nodes, per_node, CPU.with_memory(host_available_bytes() / per_node / GIB))


def host_available_bytes() -> float:
    """MemAvailable from /proc/meminfo (what the kernel can give without swapping), else
    the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _pinned(cfg: Config) -> dict:
    p = cfg.parallel
    return {"tp": None if p.tensor == "auto" else p.tensor,
            "pp": None if p.pipeline == "auto" else p.pipeline,
            "micro_batch": None if p.micro_batch == "auto" else p.micro_batch,
            "recompute": None if p.activation_checkpointing == "auto" else recompute_mode(p.activation_checkpointing),
            "zero": cfg.zero.stage, "offload": (cfg.zero.offload_optimizer,)}


def plan_candidates(cfg: Config, cluster: Cluster, dtype: str) -> list[Candidate]:
    """The layouts `auto` chooses among: every value the config gives is kept."""
    pool = candidates(workload(cfg, dtype), cluster, **_pinned(cfg))
    if cfg.parallel.data != "auto":
        pool = [c for c in pool if c.dp == cfg.parallel.data]
    return pool


def choose(cfg: Config, cluster: Cluster, dtype: str) -> Optional[Estimate]:
    """The fastest layout that fits among plan_candidates; with an auto
    activation_checkpointing, the least recomputation that fits (auto recomputes only when
    it must): none when a layout without it fits, else selective, else full. None when
    nothing fits."""
    ranking = rank_layouts(workload(cfg, dtype), cluster, plan_candidates(cfg, cluster, dtype))
    if not ranking.estimates:
        return None
    if cfg.parallel.activation_checkpointing == "auto":
        for mode in RUNNABLE_RECOMPUTE:  # least recomputation first
            fitting = [e for e in ranking.estimates if e.candidate.recompute == mode]
            if fitting:
                return fitting[0]
    return ranking.estimates[0]


def planned_dtype(cfg: Config, device: DeviceSupport) -> str:
    """precision.dtype resolved for a layout not chosen yet: `auto` depends on the pipeline
    degree only through pp > 1, and the planner never picks bf16 with ZeRO 0 and pp 1
    (launcher.engine refuses it), so an auto pipeline counts as pp > 1."""
    p = cfg.parallel
    probe = dataclasses.replace(cfg, parallel=dataclasses.replace(p, pipeline=2 if p.pipeline == "auto" else p.pipeline))
    return resolve_dtype(probe, device)


def resolve_auto(cfg: Config, world_size: int, cluster: Cluster, device: DeviceSupport,
                 resume: Optional[dict] = None) -> tuple[Config, str]:
    """`cfg` with its auto parallel keys replaced by the planner's choice for this world and
    device, and the line that says so ('' when nothing was auto). `resume`: the layout record
    of the checkpoint the launch resumes; an auto tensor or pipeline degree keeps its value
    when a layout with it fits (no conversion at load), else the best layout is resharded into."""
    p = cfg.parallel
    auto = [f"parallel.{k}" for k in AUTO_KEYS if getattr(p, k) == "auto"]
    if not auto:
        return cfg, ""
    dtype = planned_dtype(cfg, device)
    best, kept = None, ""
    if resume is not None and "auto" in (p.tensor, p.pipeline):
        keep = dataclasses.replace(cfg, parallel=dataclasses.replace(
            p, tensor=resume["tp"] if p.tensor == "auto" else p.tensor,
            pipeline=resume["pp"] if p.pipeline == "auto" else p.pipeline))
        best = choose(keep, cluster, dtype)
        if best is not None:
            kept = f"; tensor {resume['tp']} x pipeline {resume['pp']} kept from the checkpoint being resumed"
    if best is None:
        best = choose(cfg, cluster, dtype)
    if best is None:
        pool = plan_candidates(cfg, cluster, dtype)
        if not pool:
            raise ConfigError("parallel.global_batch", f"auto: no tp x pp x dp of {world_size} ranks has a data "
                              f"degree dividing global_batch={p.global_batch} (and the other values the config "
                              "gives): raise the global batch or use fewer ranks")
        smallest = rank_layouts(workload(cfg, dtype), cluster, pool).smallest
        need = (f"; the smallest needs {smallest.peak.total / GIB:.1f} GiB per rank ({smallest.candidate.describe()})"
                if smallest else "")
        offload = " and optimizer offload" if cfg.zero.offload_optimizer else ""
        raise ConfigError(auto[0], f"auto: no layout of {world_size} ranks with zero.stage={cfg.zero.stage}{offload} "
                          f"fits {cluster.hardware.memory_gib:.1f} GiB per device ({cluster.hardware.name}){need}; "
                          "add nodes, or see python -m launcher.plan for other ZeRO stages and optimizer offload")
    c = best.candidate
    chosen = dataclasses.replace(p, tensor=c.tp, pipeline=c.pp, micro_batch=c.micro_batch,
                                 activation_checkpointing=c.recompute)
    resolved = dataclasses.replace(cfg, parallel=chosen)
    check_config(resolved)
    note = (f"auto       {', '.join(auto)} -> tensor {c.tp}, pipeline {c.pp}, micro_batch {c.micro_batch}, "
            f"activation_checkpointing {c.recompute} (planner: {best.peak.total / GIB:.1f} "
            f"of {cluster.hardware.memory_gib:.1f} GiB per rank, ~{best.tokens_per_s:,.0f} tokens/s on "
            f"{cluster.hardware.name}{kept})")
    return resolved, note


def config_estimate(cfg: Config, plan: Plan, cluster: Cluster) -> Estimate:
    """The planner's estimate of the config's own (resolved) layout and stage split."""
    lay = plan.layout
    c = Candidate(lay.tp, lay.pp, lay.dp, lay.micro_batch, cfg.zero.stage,
                  recompute_mode(cfg.parallel.activation_checkpointing), cfg.zero.offload_optimizer,
                  sequence_parallel_on(cfg.parallel, cfg.model, lay.tp))
    return estimate(workload(cfg, plan.dtype), cluster, c, parts=list(plan.parts))


def check_fits(cfg: Config, plan: Plan, cluster: Cluster) -> Estimate:
    """A ConfigError (exit 2) when a rank of the config's layout cannot fit the device,
    with its numbers and the fastest layout that fits; else the estimate."""
    est = config_estimate(cfg, plan, cluster)
    if est.fits:
        return est
    r = est.peak
    parts = ", ".join(f"{name} {value / GIB:.1f}" for name, value in (
        ("weights", r.weights), ("grads", r.grads), ("optimizer", r.optimizer),
        ("activations", r.activations), ("buffers", max(r.logits, r.bucket) + r.gathered),
        ("overhead+margin", r.framework + r.margin)))
    free = dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, tensor="auto", pipeline="auto", micro_batch="auto", activation_checkpointing="auto"))
    better = choose(free, cluster, plan.dtype)
    instead = (f"; fits: {better.candidate.describe()} ({better.peak.total / GIB:.1f} GiB), e.g. "
               f"parallel.tensor={better.candidate.tp} parallel.pipeline={better.candidate.pp} "
               f"parallel.micro_batch={better.candidate.micro_batch} parallel.activation_checkpointing="
               f"{better.candidate.recompute}"
               + (" zero.offload_optimizer=true" if better.candidate.offload else "") if better else
               f"; no layout of {cluster.world} ranks fits: add nodes")
    raise ConfigError("parallel", f"tp {plan.layout.tp} x pp {plan.layout.pp} x dp {plan.layout.dp} needs "
                      f"{r.total / GIB:.1f} GiB on a stage-{r.stage} rank ({parts} GiB) but the device has "
                      f"{cluster.hardware.memory_gib:.1f} GiB ({cluster.hardware.name}){instead}; "
                      "--force to try anyway")


def fit_line(cfg: Config, plan: Plan, cluster: Cluster, force: bool) -> str:
    """The line printed at launch about the estimate; a ConfigError when it does not fit
    (unless `force`)."""
    try:
        est = check_fits(cfg, plan, cluster)
    except ConfigError as err:
        if not force:
            raise
        return f"memory     --force: starting although {err.message.split('; --force')[0]}"
    return (f"memory     est. {est.peak.total / GIB:.2f} GiB on the largest rank (stage {est.peak.stage}) of "
            f"{cluster.hardware.memory_gib:.2f} GiB per device ({cluster.hardware.name}; "
            "python -m launcher.plan for the breakdown)")


def smallest_world(cfg: Config, hardware: Hardware, gpus_per_node: int, limit: int = 1 << 16) -> int:
    """Fewest GPUs (whole nodes, then doubling) on which some layout of the config fits."""
    free = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, data="auto"))
    dtype = planned_dtype(free, ASSUMED_GPU)
    world = gpus_per_node
    while world <= limit:
        cluster = Cluster(world // gpus_per_node, gpus_per_node, hardware)
        if choose(free, cluster, dtype) is not None:
            return world
        world *= 2
    raise ConfigError("parallel", f"no layout fits {hardware.name} up to {limit} GPUs")


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

MEMORY_ROWS = (("params (this rank)", "params"), ("weights", "weights"), ("gradients", "grads"),
               ("optimizer states", "optimizer"), ("activations", "activations"),
               ("loss logits buffers", "logits"), ("reduce bucket", "bucket"), ("ZeRO-3 gathered", "gathered"),
               ("framework overhead", "framework"), ("margin", "margin"), ("total", "total"))


def _size_gib(text: str) -> float:
    """'80GB', '80GiB', '80' -> 80.0 GiB (a GPU's "80GB" are 80 GiB)."""
    cleaned = text.strip().upper().removesuffix("GB").removesuffix("GIB").removesuffix("I").strip()
    try:
        value = float(cleaned)
    except ValueError:
        raise ConfigError("--gpu-memory", f"expected a size such as 80GB, got {text!r}") from None
    if not 0 < value < 1e6:
        raise ConfigError("--gpu-memory", f"must be > 0 GiB, got {text!r}")
    return value


def parse_args(argv: list[str]):
    from launcher.train import DEFAULT_CONFIG, _ArgumentParser

    parser = _ArgumentParser(prog="python -m launcher.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--gpu", default="h100", help=f"GPU preset: {', '.join(PRESETS)} (default h100)")
    parser.add_argument("--gpu-memory", default=None, help="device memory instead of the preset's, in GiB, e.g. 24GB")
    parser.add_argument("--efficiency", type=float, default=None,
                        help="achievable fraction of peak FLOP/s for the matmuls (default: the preset's)")
    for name in ("intra-node-gbps", "inter-node-gbps", "pcie-gbps"):
        parser.add_argument(f"--{name}", type=float, default=None, help="GB/s per GPU, per direction")
    parser.add_argument("--top", type=int, default=10, help="layouts to list (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--list-gpus", action="store_true", help="print the GPU presets and their sources")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser.parse_args(argv)


def gpu_preset(name: str) -> Hardware:
    try:
        return preset(name)
    except KeyError:
        raise ConfigError("--gpu", f"unknown GPU {name!r}; presets: {', '.join(PRESETS)} "
                          "(python -m launcher.plan takes --gpu-memory and bandwidths for others)") from None


def cluster_from_args(args) -> Cluster:
    hardware = gpu_preset(args.gpu)
    if args.gpu_memory is not None:
        hardware = hardware.with_memory(_size_gib(args.gpu_memory))
    changes = {}
    for field_name, arg in (("intra_node_gbps", args.intra_node_gbps), ("inter_node_gbps", args.inter_node_gbps),
                            ("pcie_gbps", args.pcie_gbps), ("efficiency", args.efficiency)):
        if arg is not None:
            if not (0 < arg < 1e6) or (field_name == "efficiency" and arg > 1):
                raise ConfigError(f"--{field_name.replace('_', '-')}", f"out of range: {arg}")
            changes[field_name] = arg
    hardware = dataclasses.replace(hardware, **{k: v for k, v in changes.items() if k != "efficiency"})
    for name, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node), ("--top", args.top)):
        if not 1 <= value <= 1 << 20:
            raise ConfigError(name, f"must be 1 to {1 << 20}, got {value}")
    return Cluster(args.nodes, args.gpus_per_node, hardware, changes.get("efficiency", hardware.efficiency))


def rule_of_thumb_gpus(params: float, memory_gb: float) -> float:
    """The seeds' rule of thumb: params (B) x 18 bytes x 1.25 / GPU GB (its nominal size: 80)."""
    return params / 1e9 * 18 * 1.25 / memory_gb


def report(cfg: Config, config_path: str, cluster: Cluster, top: int) -> dict:
    """Everything `python -m launcher.plan` prints, as data."""
    world = cluster.world
    try:
        resolved, note = resolve_auto(cfg, world, cluster, ASSUMED_GPU)
    except ConfigError as err:  # nothing fits: show the layout that comes closest
        dtype = planned_dtype(cfg, ASSUMED_GPU)
        pool = plan_candidates(cfg, cluster, dtype)
        closest = rank_layouts(workload(cfg, dtype), cluster, pool).smallest if pool else None
        if closest is None:
            raise
        c = closest.candidate
        resolved = dataclasses.replace(cfg, parallel=dataclasses.replace(
            cfg.parallel, tensor=c.tp, pipeline=c.pp, micro_batch=c.micro_batch,
            activation_checkpointing=c.recompute))
        note = f"auto       {err.message.split('; add nodes')[0].removeprefix('auto: ')}; shown: the layout of that ZeRO stage needing the least memory"
    plan = make_plan(resolved, world, ASSUMED_GPU)
    own = config_estimate(resolved, plan, cluster)
    work = workload(resolved, plan.dtype)
    free = dataclasses.replace(resolved, parallel=dataclasses.replace(
        resolved.parallel, tensor="auto", pipeline="auto", micro_batch="auto", activation_checkpointing="auto",
        data="auto"))
    pool = candidates(work, cluster, zero=None, offload=(False, True))
    ranking = rank_layouts(work, cluster, pool)
    params = sum(c.params for c in plan.costs)
    sp = sequence_parallel_on(resolved.parallel, resolved.model, plan.layout.tp)
    stage0 = {mode: sum(c.act_bytes for c in item_costs(resolved.model, plan.layout.tp, plan.layout.micro_batch,
                                                         dtype_bytes(plan.dtype), mode, sp)
                        [plan.parts[0]:plan.parts[1]])
              for mode in RECOMPUTE_MODES}
    try:
        smallest = smallest_world(free, cluster.hardware, cluster.gpus_per_node)
    except ConfigError:
        smallest = None
    why = {}
    # Each of the first structurally different layouts (tp, pp, micro-batch, recomputation,
    # offload) against the next: ZeRO 0 and 1 alone often tie.
    distinct: list[Estimate] = []
    for e in ranking.estimates:
        c = e.candidate
        if all((c.tp, c.pp, c.micro_batch, c.recompute, c.offload) != (d.candidate.tp, d.candidate.pp,
               d.candidate.micro_batch, d.candidate.recompute, d.candidate.offload) for d in distinct):
            distinct.append(e)
        if len(distinct) == 4:
            break
    for a, b in zip(distinct, distinct[1:]):
        why[f"{a.candidate.describe()} over {b.candidate.describe()}"] = why_faster(a, b)
    if distinct and distinct[0].candidate != own.candidate:
        why[f"{distinct[0].candidate.describe()} over the config's layout"] = why_faster(distinct[0], own)
    return {"config": config_path, "auto": note, "hardware": dataclasses.asdict(cluster.hardware),
            "nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node, "efficiency": cluster.efficiency,
            "params": params, "dtype": plan.dtype, "optimizer": resolved.optimizer.name,
            "global_batch": resolved.parallel.global_batch, "seq_len": resolved.model.seq_len,
            "layout": own.as_dict(), "activations_per_micro_batch_stage0": stage0,
            "nominal_gb": nominal_gb(cluster.hardware), "rule_of_thumb_gpus": rule_of_thumb_gpus(params, nominal_gb(cluster.hardware)),
            "smallest_world": smallest, "considered": ranking.considered,
            "ranked": [e.as_dict() for e in ranking.estimates[:top]], "fitting": len(ranking.estimates),
            "why": why}


def nominal_gb(hardware: Hardware) -> float:
    """The size a GPU is sold as (80 for 79.6 GiB usable), for the rule of thumb."""
    return float(round(hardware.memory_gib)) if hardware.memory_gib < 100 else float(math.ceil(hardware.memory_gib))


def _has_auto(cfg: Config) -> bool:
    return any(getattr(cfg.parallel, key) == "auto" for key in AUTO_KEYS)


def format_report(r: dict) -> str:
    hw = r["hardware"]
    lay = r["layout"]
    gib = lambda b: b / GIB  # noqa: E731
    lines = [
        f"plan       {r['config']} on {r['nodes']} x {r['gpus_per_node']} {hw['name']} ({hw['memory_gib']:g} GiB, "
        f"{hw['peak_tflops']:g} TFLOP/s, NVLink {hw['intra_node_gbps']:g} GB/s, network {hw['inter_node_gbps']:g} "
        f"GB/s per GPU; {100 * r['efficiency']:.0f}% of peak assumed for matmuls)",
        f"model      {r['params'] / 1e9:.3f}B params, {r['dtype']}, {r['optimizer']}, global batch "
        f"{r['global_batch']} x {r['seq_len']} tokens",
    ]
    if r["auto"]:
        lines.append(r["auto"])
    lines.append(f"layout     tp {lay['tp']} x pp {lay['pp']} x dp {lay['dp']}, micro_batch {lay['micro_batch']}, "
                 f"ZeRO {lay['zero']}, recompute {lay['recompute']}, sequence parallel "
                 f"{'on' if lay['sequence_parallel'] else 'off'}: {'fits' if lay['fits'] else 'DOES NOT FIT'} "
                 f"({lay['peak_gib']:.1f} of {hw['memory_gib']:.1f} GiB), "
                 f"~{lay['tokens_per_s']:,.0f} tokens/s, MFU {100 * lay['mfu']:.1f}%")
    stages = lay["stages"]
    shown = list(range(len(stages))) if len(stages) <= 8 else sorted(
        {0, 1, len(stages) // 2, len(stages) - 2, len(stages) - 1})
    lines.append("")
    lines.append(f"{'one rank, GiB':<22}" + "".join(f"{'stage ' + str(s):>11}" for s in shown))
    for label, key in MEMORY_ROWS:
        cells = []
        for s in shown:
            v = stages[s][key]
            if key == "params":
                cells.append(f"{v / 1e6:>10.1f}M")
            elif key == "activations":
                cells.append(f"{gib(v):>6.2f} ({stages[s]['in_flight']}x)".rjust(11))
            else:
                cells.append(f"{gib(v):>11.2f}")
        lines.append(f"{label:<22}" + "".join(cells))
    acts = r["activations_per_micro_batch_stage0"]
    lines.append(f"activations of one micro-batch on stage 0, by recomputation: none {gib(acts['none']):.2f}, "
                 f"selective {gib(acts['selective']):.2f}, full {gib(acts['full']):.2f} GiB"
                 + (" (sequence parallel)" if lay["sequence_parallel"] else ""))
    lines.append("")
    smallest = r["smallest_world"]
    lines.append(f"rule of thumb  params(B) x 18 x 1.25 / GPU GB = {r['params'] / 1e9:.2f} x 18 x 1.25 / "
                 f"{r['nominal_gb']:g} = {r['rule_of_thumb_gpus']:.1f} GPUs; per rank the planner needs "
                 f"{'no layout under 65536 GPUs' if smallest is None else f'{smallest} GPUs at least'}: the rule "
                 "counts model states only (16 bytes + 2 of buffers, 25% slack), not activations "
                 "(x micro-batches in flight), the reduction bucket, or the replicated weights and "
                 "gradients that ZeRO 1-2 and tensor/pipeline degrees leave on every rank")
    lines.append("")
    lines.append(f"layouts that fit: {r['fitting']} of {r['considered']} considered, fastest first")
    lines.append(f"{'#':>3} {'tp':>3} {'pp':>3} {'dp':>5} {'mb':>3} {'ZeRO':>4} {'recompute':>9} {'SP':>3} {'offload':>7} "
                 f"{'GiB':>6} {'step s':>8} {'tokens/s':>11} {'MFU':>6} {'bubble':>6}")
    for i, e in enumerate(r["ranked"], 1):
        lines.append(f"{i:>3} {e['tp']:>3} {e['pp']:>3} {e['dp']:>5} {e['micro_batch']:>3} {e['zero']:>4} "
                     f"{e['recompute']:>9} {'yes' if e['sequence_parallel'] else 'no':>3} "
                     f"{'yes*' if e['offload'] else 'no':>7} {e['peak_gib']:>6.1f} "
                     f"{e['step_s']:>8.3f} {e['tokens_per_s']:>11,.0f} {100 * e['mfu']:>5.1f}% "
                     f"{100 * e['bubble']:>5.1f}%")
    if any(e["offload"] for e in r["ranked"]):
        lines.append("  * zero.offload_optimizer: true (the optimizer steps in host memory; its PCIe and CPU time "
                     "are in the step time)")
    for what, text in r["why"].items():
        lines.append(f"why {what}: {text}")
    return "\n".join(lines)


def format_presets() -> str:
    lines = [f"{'preset':<7} {'name':<16} {'GiB':>6} {'TFLOP/s':>8} {'HBM GB/s':>9} {'NVLink':>7} {'network':>8} "
             f"{'PCIe':>5}  source"]
    for key, h in PRESETS.items():
        lines.append(f"{key:<7} {h.name:<16} {h.memory_gib:>6g} {h.peak_tflops:>8g} {h.hbm_gbps:>9g} "
                     f"{h.intra_node_gbps:>7g} {h.inter_node_gbps:>8g} {h.pcie_gbps:>5g}  {h.source}")
    lines.append("bandwidths per GPU and per direction; TFLOP/s dense bf16")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.list_gpus:
            print(format_presets())
            return 0
        cluster = cluster_from_args(args)
        cfg = load_config(args.config, args.overrides)
        result = report(cfg, args.config, cluster, args.top)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    print(json.dumps(result, indent=1) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
