"""Resolving `auto` in the parallel section with the planner (parallel/planner.py).

`resolve_auto` replaces the auto keys (tensor, pipeline, micro_batch,
activation_checkpointing) with the fastest layout that fits the world and device, keeping
every value the config gives and, on resume, the checkpoint's degrees when they fit
(`choose_auto`: the same, with the choice as data, an `AutoChoice`);
`check_fits` and `fit_line` refuse (or, with --force, report) a resolved layout whose
largest rank cannot fit the device; `smallest_world` and `default_world_size` find the
fewest GPUs a config fits on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Protocol

from launcher.config.checks import check_config
from launcher.config.derived import sequence_parallel_on
from launcher.config.schema import Config
from launcher.errors import ConfigError
from launcher.planning.plan import Plan
from launcher.planning.precision import ASSUMED_GPU, DeviceSupport, resolve_dtype
from parallel.costs import recompute_mode
from parallel.hardware import GIB, PRESETS, Hardware
from parallel.planner import (
    RUNNABLE_RECOMPUTE,
    Candidate,
    Cluster,
    Estimate,
    Pinned,
    Workload,
    candidates,
    estimate,
    rank_layouts,
)


def default_world_size(cfg: Config, hardware: Hardware = PRESETS["h100"]) -> int:
    """The smallest world the config fits: tp * pp * (data, or 1 when auto); with an auto
    tensor or pipeline degree, the fewest whole nodes of 8 GPUs of `hardware` it fits on."""
    p = cfg.parallel
    if "auto" in (p.tensor, p.pipeline):
        return smallest_world(cfg, hardware, 8)
    return p.tensor * p.pipeline * (p.context if isinstance(p.context, int) else 1) * (1 if p.data == "auto" else p.data)


AUTO_KEYS = ("tensor", "pipeline", "micro_batch", "activation_checkpointing")


def auto_keys(cfg: Config) -> list[str]:
    """The parallel keys the planner resolves for this config: those of AUTO_KEYS left auto,
    parallel.context when auto, and an MoE's parallel.expert when auto (a dense model's is
    always 1)."""
    keys = [k for k in AUTO_KEYS if getattr(cfg.parallel, k) == "auto"]
    keys += ["context"] if cfg.parallel.context == "auto" else []
    return keys + (["expert"] if cfg.model.moe is not None and cfg.parallel.expert == "auto" else [])


def workload(cfg: Config, dtype: str) -> Workload:
    zero_block = cfg.deepspeed.get("zero_optimization") if isinstance(cfg.deepspeed, dict) else None
    bucket = (zero_block or {}).get("reduce_bucket_size", None)
    extra = {"reduce_bucket": int(bucket)} if isinstance(bucket, (int, float)) and bucket > 0 else {}
    return Workload(model=cfg.model, global_batch=cfg.parallel.global_batch, dtype=dtype,
                    optimizer=cfg.optimizer.name, compression=cfg.compression.method,
                    compression_rank=cfg.compression.rank, partition=cfg.parallel.partition,
                    sequence_parallel=cfg.parallel.sequence_parallel, **extra)


def _pinned(cfg: Config, context: Optional[int] = None) -> Pinned:
    """The config's values as the planner's fixed axes; `context` replaces an auto
    parallel.context (None: every degree)."""
    p = cfg.parallel
    # an MoE's expert degree is tp x a divisor of dp (parallel/layout.py): the candidates keep
    # a given one and try them all (within a node) for `auto`
    moe = cfg.model.moe is not None
    ep = p.expert if moe and p.expert != "auto" else None
    return Pinned(tp=None if p.tensor == "auto" else p.tensor, ep=ep, search_ep=moe and p.expert == "auto",
                  pp=None if p.pipeline == "auto" else p.pipeline,
                  micro_batch=None if p.micro_batch == "auto" else p.micro_batch,
                  recompute=(None if p.activation_checkpointing == "auto"
                             else recompute_mode(p.activation_checkpointing)),
                  zero=cfg.zero.stage, offload=(cfg.zero.offload_optimizer,),
                  cp=context if p.context == "auto" else p.context)


def plan_candidates(cfg: Config, cluster: Cluster, dtype: str, context: Optional[int] = 1) -> list[Candidate]:
    """The layouts `auto` chooses among: every value the config gives is kept (an auto
    parallel.context: `context`, None for every degree)."""
    pool = candidates(workload(cfg, dtype), cluster, _pinned(cfg, context))
    if cfg.parallel.data != "auto":
        pool = [c for c in pool if c.layout.dp == cfg.parallel.data]
    return pool


def choose(cfg: Config, cluster: Cluster, dtype: str) -> Optional[Estimate]:
    """The fastest layout that fits among plan_candidates; with an auto
    activation_checkpointing, the least recomputation that fits (auto recomputes only when
    it must): none when a layout without it fits, else selective, else full. An auto
    parallel.context joins in the same way, for what activations do not let fit: at the
    recomputation chosen, context 1 when a layout fits without cutting the sequence, else
    the fastest context degree that fits (so a long sequence is cut over ranks before its
    whole forward is recomputed). None when nothing fits."""
    auto_context = cfg.parallel.context == "auto"
    pool = plan_candidates(cfg, cluster, dtype, context=None if auto_context else 1)
    ranking = rank_layouts(workload(cfg, dtype), cluster, pool)
    modes = RUNNABLE_RECOMPUTE if cfg.parallel.activation_checkpointing == "auto" else (None,)
    for mode in modes:  # least recomputation first
        fitting = [e for e in ranking.estimates if mode in (None, e.candidate.recompute)]
        uncut = [e for e in fitting if e.candidate.layout.cp == 1]
        if fitting:
            return (uncut or fitting)[0]
    return None


def planned_dtype(cfg: Config, device: DeviceSupport) -> str:
    """precision.dtype resolved for a layout not chosen yet: `auto` depends on the pipeline
    degree only through pp > 1, and the planner never picks bf16 with ZeRO 0 and pp 1
    (launcher/ds/config.py refuses it), so an auto pipeline counts as pp > 1."""
    p = cfg.parallel
    probe = dataclasses.replace(cfg, parallel=dataclasses.replace(p, pipeline=2 if p.pipeline == "auto" else p.pipeline))
    return resolve_dtype(probe, device)


class ResumedDegrees(Protocol):
    """What `resolve_auto` reads of the checkpoint a launch resumes: its SavedLayout
    (launcher/checkpoint/state.py, a layer above this one)."""

    tp: int
    pp: int


@dataclass(frozen=True)
class AutoChoice:
    """What `auto` chose, as data (`plan --json` prints it): the keys that were auto with the
    value each got, the whole layout, and the planner's figures for it on that device."""

    keys: dict  # "parallel.tensor" -> 8, for each key that was auto
    layout: dict  # tensor, pipeline, data, micro_batch, activation_checkpointing (an MoE: expert)
    fits: bool
    peak_gib: float  # the largest rank's estimate
    memory_gib: float  # per device
    tokens_per_s: float
    gpu: str
    kept_from_checkpoint: Optional[dict] = None  # {"tensor", "pipeline"} a resume kept

    def line(self) -> str:
        lay = self.layout
        kept = self.kept_from_checkpoint
        expert = f", expert {lay['expert']}" if "expert" in lay else ""
        expert += f", context {lay['context']}" if "context" in lay else ""
        return (f"auto       {', '.join(self.keys)} -> tensor {lay['tensor']}, pipeline {lay['pipeline']}, "
                f"micro_batch {lay['micro_batch']}, activation_checkpointing {lay['activation_checkpointing']}{expert} "
                f"(planner: {self.peak_gib:.1f} of {self.memory_gib:.1f} GiB per rank, ~{self.tokens_per_s:,.0f} "
                f"tokens/s on {self.gpu}"
                + (f"; tensor {kept['tensor']} x pipeline {kept['pipeline']} kept from the checkpoint being resumed"
                   if kept else "") + ")")


def auto_choice(cfg: Config, best: Estimate, cluster: Cluster, kept: Optional[dict] = None) -> AutoChoice:
    """The AutoChoice of the config's auto keys when the planner picks `best`."""
    c, lay = best.candidate, best.candidate.layout
    layout = {"tensor": lay.tp, "pipeline": lay.pp, "data": lay.dp, "micro_batch": lay.micro_batch,
              "activation_checkpointing": c.recompute}
    if cfg.model.moe is not None:
        layout["expert"] = lay.expert_degree
    if lay.cp > 1 or cfg.parallel.context == "auto":
        layout["context"] = lay.cp
    keys = {f"parallel.{k}": layout[k] for k in auto_keys(cfg)}
    return AutoChoice(keys=keys, layout=layout, fits=best.fits, peak_gib=best.peak.total / GIB,
                      memory_gib=cluster.hardware.memory_gib, tokens_per_s=best.tokens_per_s,
                      gpu=cluster.hardware.name, kept_from_checkpoint=kept)


def resolve_auto(cfg: Config, world_size: int, cluster: Cluster, device: DeviceSupport,
                 resume: Optional[ResumedDegrees] = None) -> tuple[Config, str]:
    """`cfg` with its auto parallel keys replaced by the planner's choice, and the line that
    says so ('' when nothing was auto): `choose_auto`'s choice as a line."""
    resolved, choice = choose_auto(cfg, world_size, cluster, device, resume)
    return resolved, choice.line() if choice else ""


def choose_auto(cfg: Config, world_size: int, cluster: Cluster, device: DeviceSupport,
                resume: Optional[ResumedDegrees] = None) -> tuple[Config, Optional[AutoChoice]]:
    """`cfg` with its auto parallel keys replaced by the planner's choice for this world and
    device, and that choice (None when nothing was auto). `resume`: the saved layout
    of the checkpoint the launch resumes; an auto tensor or pipeline degree keeps its value
    when a layout with it fits (no conversion at load), else the best layout is resharded into."""
    p = cfg.parallel
    auto = [f"parallel.{k}" for k in auto_keys(cfg)]
    if not auto:
        return with_expert_degree(cfg), None
    dtype = planned_dtype(cfg, device)
    best, kept = None, None
    if resume is not None and "auto" in (p.tensor, p.pipeline):
        keep = dataclasses.replace(cfg, parallel=dataclasses.replace(
            p, tensor=resume.tp if p.tensor == "auto" else p.tensor,
            pipeline=resume.pp if p.pipeline == "auto" else p.pipeline))
        best = choose(keep, cluster, dtype)
        if best is not None:
            kept = {"tensor": resume.tp, "pipeline": resume.pp}
    if best is None:
        best = choose(cfg, cluster, dtype)
    if best is None:
        pool = plan_candidates(cfg, cluster, dtype, context=None if p.context == "auto" else 1)
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
    resolved = with_expert_degree(with_candidate(cfg, best.candidate))
    check_config(resolved)
    return resolved, auto_choice(cfg, best, cluster, kept)


def with_candidate(cfg: Config, c: Candidate) -> Config:
    """`cfg` with the candidate's tensor, pipeline, micro-batch, recomputation and context
    degree (and an MoE's expert degree)."""
    lay = c.layout
    expert = lay.expert_degree if cfg.model.moe is not None else cfg.parallel.expert
    return dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, tensor=lay.tp, pipeline=lay.pp, micro_batch=lay.micro_batch,
        activation_checkpointing=c.recompute, expert=expert, context=lay.cp))


def with_expert_degree(cfg: Config) -> Config:
    """A dense model's parallel.expert: auto -> 1 (an MoE's auto is the planner's choice:
    `auto_keys`, `with_candidate`)."""
    p = cfg.parallel
    if p.expert != "auto" or cfg.model.moe is not None:
        return cfg
    return dataclasses.replace(cfg, parallel=dataclasses.replace(p, expert=1))


def config_estimate(cfg: Config, plan: Plan, cluster: Cluster) -> Estimate:
    """The planner's estimate of the config's own (resolved) layout and stage split."""
    c = Candidate(plan.layout, cfg.zero.stage, recompute_mode(cfg.parallel.activation_checkpointing),
                  cfg.zero.offload_optimizer, sequence_parallel_on(cfg.parallel, cfg.model, plan.layout.tp))
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
               f"parallel.tensor={better.candidate.layout.tp} parallel.pipeline={better.candidate.layout.pp} "
               f"parallel.micro_batch={better.candidate.layout.micro_batch} parallel.activation_checkpointing="
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
