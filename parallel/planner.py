"""Which layouts fit, and how fast each would run: the planner behind `python -m launcher.plan`
and `auto` in the parallel section.

A candidate is a Layout (tp, pp, dp, micro-batch) plus the ZeRO stage, recomputation and
optimizer offload. Its memory is `parallel.memory.rank_memory` for every pipeline stage;
its step time comes from the cost model below. Every term is a formula on published
hardware figures (`parallel.hardware`), not a measurement, and each is printed so a user
can see which one decides.

Step time of one optimizer step (seconds), m = micro-batches per dp rank, p = pp:

    micro-batch on the slowest stage   t_mb = compute + tp all-reduces + pipeline sends
        compute    = FLOPs of the stage's items x b*s tokens / (tp x peak x efficiency),
                     + the forward again under full recomputation (+1/3), or under
                     selective the attention core's forward (4*s*h per token per layer:
                     the scores and the weighted sum; the norms' recompute is negligible)
        tp         = collectives of b*s*h (x dtype), ring: 2(tp-1)/tp of it per rank for an
                     all-reduce, (tp-1)/tp for an all-gather or a reduce-scatter, over NVLink
                     (or the network when tp spans nodes). Per layer, without sequence
                     parallelism: 2 forward and 2 backward all-reduces (one per column-parallel
                     block input, one per row-parallel output). With it each becomes a
                     reduce-scatter + an all-gather, and backward gathers each block input's
                     shard again: 1.5 all-reduces' worth per block. Full recomputation repeats
                     the forward ones (parallel/comm_bytes.py counts them). An MoE item: the
                     all-to-alls of its tokens over the expert group (parallel.costs.moe_all_to_all_bytes);
                     with experts over k data ranks, the dense gradients averaged over them
        pipeline   = one activation forward and one gradient backward per micro-batch
                     (b*s/tp*h per rank with sequence parallelism: each sends its shard)
        context    = with cp > 1 every term above is on a rank's s/cp positions; per attention
                     item the whole sequence's keys and values (2*b*s*kv/tp) all-gathered
                     forward, reduce-scattered backward, gathered again under recomputation
    pipeline       (m + p - 1) x t_mb           (1F1B: bubble (p-1)/(m+p-1))
    data parallel  gradient reduction after the last micro-batch, not overlapped: all-reduce
                   2(dp-1)/dp x gradient bytes (ZeRO 0; dp/k ranks with experts over k); reduce-scatter + the all-gather of
                   updated weights (ZeRO 1/2); + two weight all-gathers per step (three under
                   full recomputation) (ZeRO 3). Gradients travel in fp32 for bf16, 2 bytes
                   under fp16/bf16 compression, PowerSGD's rank-r factors under powersgd.
    optimizer      state bytes read and written once, at HBM bandwidth
    offload        gradients down and weights up over PCIe, Adam on the host's memory
                   bandwidth shared by the node's GPUs

MFU = model FLOPs per token (6 x parameters + attention, no recomputation) x tokens/s /
(GPUs x peak).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from parallel.costs import RECOMPUTE_MODES, ItemCost, flops_per_token, item_costs
from parallel.costs import (
    SP_ALLREDUCES,
    TP_ALLREDUCES,
    gradient_wire_bytes,
    moe_all_to_all_bytes,
    replicated_moe_params,
    ring_seconds,
)
from parallel.hardware import GB, GIB, Hardware
from parallel.layout import (
    Layout,
    context_degrees,
    expert_degrees,
    powers_of_two,
    resolve_sequence_parallel,
)
from parallel.memory import (
    REDUCE_BUCKET_SIZE,
    Overhead,
    RankMemory,
    StateSettings,
    dtype_bytes,
    host_state_bytes,
    rank_memory,
    state_bytes,
)
from parallel.partition import MemoryModel, partition
from parallel.shapes import ModelShape

RUNNABLE_RECOMPUTE = RECOMPUTE_MODES  # the launcher runs every mode; least recomputation first


@dataclass(frozen=True)
class Workload:
    """What the planner plans for: the model, the batch and the training setup."""

    model: ModelShape
    global_batch: int  # sequences per step
    dtype: str  # fp32 | bf16 | fp16
    optimizer: str = "adamw"
    compression: str = "none"  # none | fp16 | bf16 | powersgd
    compression_rank: int = 4
    reduce_bucket: int = REDUCE_BUCKET_SIZE
    partition: str = "balanced"
    sequence_parallel: Union[bool, str] = "auto"  # parallel.sequence_parallel: auto = on when tp > 1

    def sequence_parallel_at(self, tp: int, context: int = 1) -> bool:
        """parallel.sequence_parallel resolved for tensor degree tp (and context degree)."""
        return resolve_sequence_parallel(self.sequence_parallel, self.model.seq_len, tp, context)


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    hardware: Hardware
    efficiency: float = 0.5  # achievable fraction of peak FLOP/s (Hardware.efficiency by default)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Candidate:
    """One way to run the workload: the degrees (a Layout) and what is not a degree."""

    layout: Layout
    zero: int
    recompute: str  # none | selective | full
    offload: bool = False
    sequence_parallel: bool = False  # resolved for this tp (Workload.sequence_parallel_at)

    def describe(self) -> str:
        lay = self.layout
        experts = f" (experts over {lay.ep})" if lay.ep else ""
        context = f" x cp {lay.cp}" if lay.cp > 1 else ""
        return (f"tp {lay.tp}{context} x pp {lay.pp} x dp {lay.dp}{experts}, micro_batch {lay.micro_batch}, ZeRO {self.zero}, "
                f"recompute {self.recompute}" + (", sequence parallel" if self.sequence_parallel else "")
                + (", optimizer offload" if self.offload else ""))

    def state_settings(self, work: Workload) -> StateSettings:
        """How this candidate holds the workload's model states (parallel.memory)."""
        return StateSettings(dtype=work.dtype, optimizer=work.optimizer, zero_stage=self.zero,
                             offload=self.offload, reduce_bucket=work.reduce_bucket)


@dataclass(frozen=True)
class Pinned:
    """The axes `candidates` keeps fixed (a config's non-auto values); None: every value."""

    tp: Optional[int] = None
    pp: Optional[int] = None
    micro_batch: Optional[int] = None
    recompute: Optional[str] = None
    zero: Optional[int] = None
    ep: Optional[int] = None  # an MoE's expert degree (None: the tensor degree, or searched)
    cp: Optional[int] = 1  # the context degree (None: 1 and every one that cuts the sequence)
    search_ep: bool = False  # an MoE: also try experts over tp x k data ranks within a node
    offload: tuple[bool, ...] = (False,)  # the offload settings tried
    micro_batches: tuple[int, ...] = (1, 2, 4, 8, 16)  # tried when micro_batch is None


@dataclass(frozen=True)
class StepTime:
    compute: float  # the pipeline's compute, bubble included
    tp_comm: float
    pp_comm: float
    dp_comm: float
    optimizer: float
    offload: float
    bubble: float  # fraction of the pipeline time idle
    cp_comm: float = 0.0  # context parallelism's key/value gathers and gradient reduce-scatters

    @property
    def total(self) -> float:
        return self.compute + self.tp_comm + self.cp_comm + self.pp_comm + self.dp_comm + self.optimizer + self.offload


@dataclass(frozen=True)
class Estimate:
    candidate: Candidate
    parts: tuple[int, ...]
    stages: tuple[RankMemory, ...]
    step: StepTime
    tokens_per_s: float
    mfu: float
    capacity: float  # bytes of one device
    host_bytes: float = 0.0  # per rank, with offload

    @property
    def peak(self) -> RankMemory:
        return max(self.stages, key=lambda r: r.total)

    @property
    def fits(self) -> bool:
        return self.peak.total <= self.capacity

    def as_dict(self) -> dict:
        c, lay = self.candidate, self.candidate.layout
        return {"tp": lay.tp, "cp": lay.cp, "pp": lay.pp, "dp": lay.dp, "ep": lay.expert_degree, "micro_batch": lay.micro_batch,
                "zero": c.zero,
                "recompute": c.recompute, "sequence_parallel": c.sequence_parallel, "offload": c.offload,
                "fits": self.fits,
                "peak_gib": self.peak.total / GIB, "capacity_gib": self.capacity / GIB,
                "step_s": self.step.total, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
                "bubble": self.step.bubble, "host_gib_per_rank": self.host_bytes / GIB,
                "step_breakdown_s": {k: getattr(self.step, k) for k in
                                     ("compute", "tp_comm", "cp_comm", "pp_comm", "dp_comm", "optimizer", "offload")},
                "parts": list(self.parts), "stages": [r.as_dict() for r in self.stages]}


def _costs(model: ModelShape, tp: int, micro_batch: int, dtype: str, recompute: str,
           sequence_parallel: bool = False, ep: int = 0, context: int = 1) -> tuple[ItemCost, ...]:
    return tuple(item_costs(model, tp, micro_batch, dtype_bytes(dtype), recompute, sequence_parallel, ep, context))


def stage_parts(work: Workload, costs: tuple[ItemCost, ...], c: Candidate) -> list[int]:
    lay = c.layout
    memory = MemoryModel(stages=lay.pp, grad_accum=lay.grad_accum,
                         bytes_per_param=state_bytes(work.dtype, work.optimizer, c.zero, lay.ds_data,
                                                     offload=c.offload).total)
    return partition(work.partition, costs, lay.pp, memory)


def estimate(work: Workload, cluster: Cluster, c: Candidate, parts: Optional[list[int]] = None,
             costs: Optional[tuple[ItemCost, ...]] = None) -> Estimate:
    model, hw, lay = work.model, cluster.hardware, c.layout
    if costs is None:
        costs = _costs(model, lay.tp, lay.micro_batch, work.dtype, c.recompute, c.sequence_parallel, lay.ep, lay.cp)
    if parts is None:
        parts = stage_parts(work, costs, c)
    states = c.state_settings(work)
    overhead = Overhead(framework_bytes=hw.framework_gb * GB, touched_only=hw.touched_only)
    memory = tuple(rank_memory(model, costs, parts, s, lay, states, overhead) for s in range(lay.pp))
    step = step_time(work, cluster, c, costs, parts)
    tokens = work.global_batch * model.seq_len / step.total
    mfu = flops_per_token(model) * tokens / (cluster.world * hw.peak_tflops * 1e12)
    host = max(r.params for r in memory) * host_state_bytes(work.optimizer, lay.ds_data) if c.offload else 0.0
    return Estimate(candidate=c, parts=tuple(parts), stages=memory, step=step, tokens_per_s=tokens, mfu=mfu,
                    capacity=hw.memory_gib * GIB, host_bytes=host)


def step_time(work: Workload, cluster: Cluster, c: Candidate, costs, parts) -> StepTime:
    model, hw, lay = work.model, cluster.hardware, c.layout
    e = dtype_bytes(work.dtype)
    tokens_mb = lay.micro_batch * model.seq_len // lay.cp  # one rank's positions of a micro-batch
    flops_rate = hw.peak_tflops * 1e12 * cluster.efficiency
    nvlink = hw.intra_node_gbps

    def bandwidth(ranks_spanned: int) -> float:  # a group of consecutive ranks: NVLink inside a node
        return nvlink if ranks_spanned <= cluster.gpus_per_node else hw.inter_node_gbps

    tp_bw, cp_bw, ep_bw = bandwidth(lay.tp), bandwidth(lay.tp * lay.cp), bandwidth(lay.expert_degree)
    pp_bw, dp_bw = bandwidth(lay.tp * lay.replicas * lay.pp), bandwidth(lay.tp * lay.replicas)
    act = tokens_mb * model.hidden * e
    collectives = SP_ALLREDUCES if c.sequence_parallel else TP_ALLREDUCES

    # context parallelism, per attention item and micro-batch: the whole sequence's keys and
    # values (this tp rank's heads) all-gathered forward, their gradients reduce-scattered
    # backward, gathered again when the attention core is recomputed (parallel/context.py);
    # not overlapped with compute
    kv_bytes = 2 * lay.micro_batch * model.seq_len * model.n_kv_heads * model.head_dim // lay.tp * e
    kv_time = (3 if c.recompute != "none" else 2) * ring_seconds(lay.cp, kv_bytes, cp_bw, all_reduce=False)

    def stage_costs(s: int) -> tuple[float, float, float]:
        items = costs[parts[s]:parts[s + 1]]
        flops = 0.0
        reduces = 0.0
        moe_items = [it for it in items if it.kind == "moe"]
        moe_grads = sum(replicated_moe_params(model) * e for _ in moe_items)  # all-reduced over tp
        a2a = len(moe_items) * moe_all_to_all_bytes(model, lay.tp, tokens_mb, e, c.recompute == "full", lay.ep) / (
            ep_bw * GB) if moe_items else 0.0
        # experts over data ranks: every dense gradient averaged over the expert group's data
        # ranks per micro-batch (parallel/expert_grads.py)
        if lay.experts_over_dp > 1:
            dense = sum(it.params_per_rank for it in items if it.kind != "moe") + moe_grads / e
            a2a += ring_seconds(lay.experts_over_dp, dense * e, ep_bw)
        for it in items:
            flops += it.flops_per_token
            if c.recompute == "full":
                flops += it.flops_per_token / 3
            elif c.recompute == "selective" and it.kind == "attn":
                flops += 4 * model.seq_len * model.hidden
            fwd, bwd = collectives[it.kind]
            reduces += fwd * (2 if c.recompute == "full" else 1) + bwd
        compute = flops * tokens_mb / (lay.tp * flops_rate)
        kv = kv_time * sum(1 for it in items if it.kind == "attn")
        return compute, ring_seconds(lay.tp, act, tp_bw) * reduces + ring_seconds(lay.tp, moe_grads, tp_bw) + a2a, kv

    per_stage = [stage_costs(s) for s in range(lay.pp)]
    compute_mb, tp_mb, cp_mb = max(per_stage, key=sum)
    pp_mb = 2 * act / (lay.tp if c.sequence_parallel else 1) / (pp_bw * GB) if lay.pp > 1 else 0.0
    slots = lay.grad_accum + lay.pp - 1
    bubble = (lay.pp - 1) / slots

    params = max(sum(it.params_per_rank for it in costs[parts[s]:parts[s + 1]]) for s in range(lay.pp))
    dp, optimizer, offload = _end_of_step(work, cluster, c, params, dp_bw)
    return StepTime(compute=compute_mb * slots, tp_comm=tp_mb * slots, pp_comm=pp_mb * slots, dp_comm=dp,
                    optimizer=optimizer, offload=offload, bubble=bubble, cp_comm=cp_mb * slots)


def _end_of_step(work: Workload, cluster: Cluster, c: Candidate, params: float, dp_bw: float
                 ) -> tuple[float, float, float]:
    """Seconds of the gradient reduction, the optimizer step and the offload traffic of a
    rank holding `params` parameters."""
    hw, e, data = cluster.hardware, dtype_bytes(work.dtype), c.layout.ds_data
    grads = gradient_wire_bytes(work.model, work.dtype, work.compression, work.compression_rank, params, c.layout.tp)
    # DeepSpeed reduces over the ranks holding the same experts (all of dp x cp when dense)
    if c.zero == 0:
        dp = ring_seconds(data, grads, dp_bw)
    else:
        dp = ring_seconds(data, grads, dp_bw, all_reduce=False) + ring_seconds(data, params * e, dp_bw, all_reduce=False)
        if c.zero == 3:
            dp += (3 if c.recompute == "full" else 2) * ring_seconds(data, params * e, dp_bw, all_reduce=False)
    states = state_bytes(work.dtype, work.optimizer, c.zero, data, offload=c.offload)
    optimizer = 2 * params * states.total / (hw.hbm_gbps * GB)
    offload = 0.0
    if c.offload:
        shard = params / data
        offload = shard * (4 + e) / (hw.pcie_gbps * GB) + 32 * shard * cluster.gpus_per_node / (hw.host_gbps * GB)
    return dp, optimizer, offload


def candidates(work: Workload, cluster: Cluster, pinned: Pinned = Pinned()) -> list[Candidate]:
    """Every layout the launcher can run on this cluster; a value in `pinned` fixes that axis."""
    m, world = work.model, cluster.world
    tp, pp, micro_batch, zero = pinned.tp, pinned.pp, pinned.micro_batch, pinned.zero
    experts = getattr(getattr(m, "moe", None), "experts", 0)  # MoE experts are split over tp (dense: 0)
    tps = [tp] if tp is not None else [t for t in powers_of_two(cluster.gpus_per_node)
                                       if not (m.heads % t or m.n_kv_heads % t or m.ffn % t or m.vocab % t or experts % t)]
    out = []
    for t, cp in ((t, cp) for t in tps
                  for cp in context_degrees(m.seq_len, work.sequence_parallel is True, t, world, pinned.cp)):
        if world % (t * cp) or (pinned.ep and pinned.ep % t):
            continue
        pps = ([pp] if pp is not None else
               [p for p in range(1, min(m.layers, world // (t * cp)) + 1) if (world // (t * cp)) % p == 0])
        for p in pps:
            if world % (t * cp * p):
                continue
            dp = world // (t * cp * p)
            if work.global_batch % dp:
                continue
            mbs = [micro_batch] if micro_batch is not None else list(pinned.micro_batches)
            eps = expert_degrees(t, dp * cp, experts if pinned.search_ep else 0, cluster.gpus_per_node, pinned.ep)
            for ep, b in ((e, b) for e in eps for b in mbs):
                if work.global_batch % (b * dp):
                    continue
                zeros = [zero] if zero is not None else ([0, 1] if p > 1 else [0, 1, 2, 3])
                for z in zeros:
                    if p > 1 and z > 1:
                        continue  # DeepSpeed's pipeline engine runs ZeRO 0 or 1
                    if work.dtype == "bf16" and p == 1 and z == 0:
                        continue  # refused by launcher/ds/config.py (bf16 gradient accumulation)
                    if (work.compression == "powersgd" and z > 1) or (ep and z == 3):
                        continue  # refused by launcher/config/checks.py
                    for r in ([pinned.recompute] if pinned.recompute is not None else RUNNABLE_RECOMPUTE):
                        for off in pinned.offload:
                            if off and (z == 0 or work.compression == "powersgd"):
                                continue  # refused by launcher/config/checks.py
                            layout = Layout(world_size=world, tp=t, pp=p, dp=dp, micro_batch=b,
                                            global_batch=work.global_batch, ep=ep, cp=cp)
                            out.append(Candidate(layout, z, r, off, work.sequence_parallel_at(t, cp)))
    return out


@dataclass
class Ranking:
    estimates: list[Estimate] = field(default_factory=list)  # fitting ones, fastest first
    considered: int = 0
    smallest: Optional[Estimate] = None  # when nothing fits: the least memory needed


def rank_layouts(work: Workload, cluster: Cluster, pool: list[Candidate]) -> Ranking:
    """Estimate every candidate; keep those that fit, fastest first (ties: less memory)."""
    ranking = Ranking(considered=len(pool))
    parts_cache: dict = {}
    costs_cache: dict = {}
    for c in pool:
        lay = c.layout
        key = (lay.pp, lay.tp, lay.micro_batch, c.recompute, c.sequence_parallel, lay.ep, lay.cp)
        if key[1:] not in costs_cache:
            costs_cache[key[1:]] = _costs(work.model, lay.tp, lay.micro_batch, work.dtype, c.recompute,
                                          c.sequence_parallel, lay.ep, lay.cp)
        costs = costs_cache[key[1:]]
        if work.partition == "balanced":  # FLOPs min-max: the same split for any tp, batch or ZeRO
            key = (lay.pp,)
        if key not in parts_cache:
            try:
                parts_cache[key] = stage_parts(work, costs, c)
            except ValueError:
                parts_cache[key] = None
        if parts_cache[key] is None:
            continue
        est = estimate(work, cluster, c, parts_cache[key], costs)
        if est.fits:
            ranking.estimates.append(est)
        elif ranking.smallest is None or est.peak.total < ranking.smallest.peak.total:
            ranking.smallest = est
    ranking.estimates.sort(key=lambda e: (-e.tokens_per_s, e.peak.total))
    return ranking
