"""Pipeline stage partitioner: item costs -> stage boundaries.

`balanced` (ours) minimises the FLOPs of the most expensive stage exactly, by dynamic
programming over all contiguous splits of the half-block items, subject to a memory cap per
stage. Under 1F1B, stage s (0-based) of pp holds the activations of up to
min(pp - s, grad_accum) micro-batches at once, so early stages need more memory for the
same items; the cap accounts for that.

DeepSpeed's own methods (`uniform`, `parameters`, `type:<regex>`) are computed with
DeepSpeed's functions on the same items, so every method yields explicit boundaries that
are printed at start and handed to `PipelineModule` unchanged: the table shows what runs.

Boundaries are a list `parts` of stages + 1 item indices (DeepSpeed's convention): stage s
holds items parts[s] .. parts[s+1]-1. No stage is ever empty.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from parallel.costs import ItemCost
from parallel.memory import in_flight

GB = 1024**3

# Class names of the model's pipeline items (launcher/model/), matched by `type:<regex>`
# exactly as DeepSpeed's PipelineModule matches LayerSpec type names.
ITEM_CLASS_NAMES = {"embed": "Embedding", "attn": "Attention", "mlp": "MLP", "moe": "MoE", "norm": "FinalNorm", "head": "Head"}


class PartitionError(ValueError):
    pass


@dataclass(frozen=True)
class MemoryModel:
    """What a stage's memory depends on besides its items."""

    stages: int
    grad_accum: int
    bytes_per_param: float  # weights + grads + optimizer state, see costs.state_bytes_per_param

    def in_flight(self, stage: int) -> int:
        """Micro-batches whose activations stage `stage` holds at the peak of 1F1B."""
        return in_flight(stage, self.stages, self.grad_accum)

    def stage_bytes(self, costs: Sequence[ItemCost], stage: int, start: int, stop: int) -> float:
        items = costs[start:stop]
        return (sum(c.params_per_rank for c in items) * self.bytes_per_param
                + sum(c.act_bytes for c in items) * self.in_flight(stage))


def minmax_split(n: int, stages: int, cost: Callable[[int, int, int], float],
                 feasible: Callable[[int, int, int], bool] = lambda s, i, j: True) -> Optional[list[int]]:
    """Exact minimum over contiguous, non-empty splits of n items into `stages` parts of
    max_s cost(s, start, stop), over splits where every part is feasible(s, start, stop).
    O(stages * n^2) evaluations. Returns the boundaries, or None when nothing is feasible.
    Ties go to the split whose later stages start earliest (lighter early stages, which hold
    the most in-flight activations)."""
    if stages < 1 or n < stages:
        return None
    inf = float("inf")
    # best[s][j]: minimal max cost of items [0, j) in stages 0..s-1; prev[s][j]: start of stage s-1
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    prev = [[-1] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for s in range(1, stages + 1):
        # stage s-1 ends at j; leave at least one item for each later stage
        for j in range(s, n - (stages - s) + 1):
            for i in range(s - 1, j):
                if best[s - 1][i] == inf or not feasible(s - 1, i, j):
                    continue
                value = max(best[s - 1][i], cost(s - 1, i, j))
                if value < best[s][j]:
                    best[s][j], prev[s][j] = value, i
    if best[stages][n] == inf:
        return None
    return _boundaries(prev, n, stages)


def monotone_minmax_split(n: int, stages: int, cost: Callable[[int, int, int], float],
                          fits: Optional[Callable[[int, int, int], bool]] = None) -> Optional[list[int]]:
    """`minmax_split(n, stages, cost, fits)`, the same boundaries (ties included), in
    O(stages * n) evaluations instead of O(stages * n^2), for monotone costs: cost(s, i, j)
    of items [i, j) on stage s is nondecreasing in j and nonincreasing in i and in s, and
    fits(s, i, j) holds for every i' >= i when it holds for i (stage costs that are sums of
    non-negative item costs, and a memory that falls from stage to stage, as in 1F1B).

    Why it is exact: with such costs best[s][i] (the minimal max cost of items [0, i) in s
    stages) is nondecreasing in i, and finite on a prefix of i. For stage s ending at j,
    f(i) = max(best[s-1][i], cost(s-1, i, j)) therefore falls while the cost term dominates
    and rises after; its minimum is at the crossing, which only moves right as j grows (one
    pointer per stage). Ties go to the smallest start, as in minmax_split."""
    if stages < 1 or n < stages:
        return None
    inf = float("inf")
    prev_best = [inf] * (n + 1)
    prev_best[0] = 0
    prev_last = 0  # prev_best is finite on [stages-so-far, prev_last]
    back = [[-1] * (n + 1) for _ in range(stages + 1)]
    for s in range(1, stages + 1):
        best = [inf] * (n + 1)
        last = -1
        cross = fit = s - 1
        for j in range(s, n - (stages - s) + 1):
            if fits is not None:
                fit = max(fit, s - 1)
                while fit < j and not fits(s - 1, fit, j):
                    fit += 1
            lo, hi = max(s - 1, fit), min(j - 1, prev_last)
            if lo > hi:
                continue
            cross = max(cross, lo)
            while cross <= hi and prev_best[cross] < cost(s - 1, cross, j):
                cross += 1
            # [lo, cross): the cost term dominates (and falls); [cross, hi]: best[s-1] does (and rises)
            left = cost(s - 1, cross - 1, j) if cross > lo else inf
            right = prev_best[cross] if cross <= hi else inf
            if left <= right:
                value, start = left, cross - 1
                if start > lo and cost(s - 1, start - 1, j) <= value:  # a plateau: find its first start
                    a, b = lo, start  # cost(s-1, a..start, j) >= value; first i with cost <= value
                    while a < b:
                        mid = (a + b) // 2
                        if cost(s - 1, mid, j) <= value:
                            b = mid
                        else:
                            a = mid + 1
                    start = a
            else:
                value, start = right, cross
            if value < inf:
                best[j], back[s][j], last = value, start, j
        prev_best, prev_last = best, last
        if last < 0:
            return None
    if prev_best[n] == inf:
        return None
    return _boundaries(back, n, stages)


def _boundaries(start_of: list[list[int]], n: int, stages: int) -> list[int]:
    """Walk back from item n: start_of[s][j] is where stage s-1 starts when it ends at j."""
    parts, j = [n], n
    for s in range(stages, 0, -1):
        j = start_of[s][j]
        parts.append(j)
    return parts[::-1]


def _prefix(values: Sequence[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out


def balanced(costs: Sequence[ItemCost], stages: int, memory: Optional[MemoryModel] = None,
             cap_bytes: Optional[float] = None) -> list[int]:
    """Min-max FLOPs split of the items, each stage under cap_bytes (if given)."""
    flops = _prefix([c.flops_per_token for c in costs])
    flops_cost = lambda s, i, j: flops[j] - flops[i]  # noqa: E731
    fits = None
    if cap_bytes is not None:
        if memory is None:
            raise ValueError("a memory cap needs a MemoryModel")
        params, acts = _prefix([c.params_per_rank for c in costs]), _prefix([c.act_bytes for c in costs])
        per_param, flight = memory.bytes_per_param, [memory.in_flight(s) for s in range(stages)]

        def stage_bytes(s: int, i: int, j: int) -> float:
            """memory.stage_bytes(costs, s, i, j) from prefix sums: the same integers, the same float."""
            return (params[j] - params[i]) * per_param + (acts[j] - acts[i]) * flight[s]

        fits = lambda s, i, j: stage_bytes(s, i, j) <= cap_bytes  # noqa: E731
    parts = monotone_minmax_split(len(costs), stages, flops_cost, fits)
    if parts is None and cap_bytes is None:
        raise PartitionError(f"{len(costs)} items cannot fill {stages} stages (at least one item each)")
    if parts is None:
        # Say how much would be needed: the split with the smallest largest stage.
        need = monotone_minmax_split(len(costs), stages, stage_bytes)
        worst = max(stage_bytes(s, need[s], need[s + 1]) for s in range(stages))
        raise PartitionError(f"no split of {len(costs)} items into {stages} stages fits "
                             f"stage_memory_gb={cap_bytes / GB:.2f}; the best split needs "
                             f"{worst / GB:.2f} GB on its largest stage")
    return parts


def deepspeed_method(method: str, costs: Sequence[ItemCost], stages: int) -> list[int]:
    """DeepSpeed's `uniform`, `parameters` or `type:<regex>` split of the items, computed by
    DeepSpeed's own functions exactly as `PipelineModule._partition_layers` does."""
    # lazy: DeepSpeed pulls in torch, which `balanced` (the default) and `plan` never need
    from deepspeed.runtime import utils as ds_utils

    if method == "uniform":
        return ds_utils.partition_uniform(num_items=len(costs), num_parts=stages)
    if method == "parameters":
        return ds_utils.partition_balanced(weights=[c.params_per_rank for c in costs], num_parts=stages)
    if method.startswith("type:"):
        regex = re.compile(method.split(":", 1)[1], re.IGNORECASE)
        weights = [1 if regex.search(ITEM_CLASS_NAMES[c.kind]) else 0 for c in costs]
        if not any(weights):
            raise PartitionError(f"{method!r} matches none of the item types {sorted(set(ITEM_CLASS_NAMES.values()))}")
        return ds_utils.partition_balanced(weights=weights, num_parts=stages)
    raise PartitionError(f"unknown partition method {method!r}")


def partition(method: str, costs: Sequence[ItemCost], stages: int, memory: Optional[MemoryModel] = None,
              cap_bytes: Optional[float] = None) -> list[int]:
    if method == "balanced":
        parts = balanced(costs, stages, memory, cap_bytes)
    else:
        parts = [int(p) for p in deepspeed_method(method, costs, stages)]
    empty = [s for s in range(stages) if parts[s + 1] <= parts[s]]
    if empty:
        raise PartitionError(f"method {method!r} leaves stage {empty[0]} empty ({len(costs)} items, {stages} stages)")
    return parts


def whole_block_split(method: str, costs: Sequence[ItemCost], stages: int) -> list[int]:
    """DeepSpeed's `uniform`/`parameters` over whole transformer blocks (the layer list of
    GPT-NeoX and Megatron-DeepSpeed: embed, block x L, norm, head), mapped back onto our
    half-block item indices. Used to compare against `balanced`."""
    # lazy: DeepSpeed pulls in torch, which `balanced` (the default) and `plan` never need
    from deepspeed.runtime import utils as ds_utils

    # whole-block layer k -> the half-block item index where it starts
    starts, weights, i = [], [], 0
    while i < len(costs):
        span = 2 if costs[i].kind == "attn" else 1
        starts.append(i)
        weights.append(sum(c.params_per_rank for c in costs[i:i + span]))
        i += span
    starts.append(len(costs))
    if method == "uniform":
        parts = ds_utils.partition_uniform(num_items=len(weights), num_parts=stages)
    elif method == "parameters":
        parts = ds_utils.partition_balanced(weights=weights, num_parts=stages)
    else:
        raise ValueError(method)
    return [starts[int(p)] for p in parts]


# --------------------------------------------------------------------------------------
# The stage table printed at start
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageInfo:
    stage: int
    first: str
    last: str
    n_items: int
    params: int  # full parameters of the stage (all tp ranks)
    flops_share: float
    memory_bytes: Optional[float]


def max_stage_flops(costs: Sequence[ItemCost], parts: Sequence[int]) -> int:
    return max(sum(c.flops_per_token for c in costs[parts[s]:parts[s + 1]]) for s in range(len(parts) - 1))


def stage_table(costs: Sequence[ItemCost], parts: Sequence[int],
                memory: Optional[MemoryModel] = None) -> list[StageInfo]:
    total = sum(c.flops_per_token for c in costs) or 1
    rows = []
    for s in range(len(parts) - 1):
        items = costs[parts[s]:parts[s + 1]]
        rows.append(StageInfo(
            stage=s, first=items[0].name, last=items[-1].name, n_items=len(items),
            params=sum(c.params for c in items),
            flops_share=sum(c.flops_per_token for c in items) / total,
            memory_bytes=memory.stage_bytes(costs, s, parts[s], parts[s + 1]) if memory else None))
    return rows


def format_stage_table(rows: Sequence[StageInfo]) -> str:
    lines = [f"{'stage':>5}  {'items':<22} {'n':>3}  {'params':>10}  {'flops':>6}  {'states+acts':>13}"]
    for r in rows:
        span = r.first if r.first == r.last else f"{r.first} .. {r.last}"
        mem = f"{r.memory_bytes / GB:9.2f} GiB" if r.memory_bytes is not None else f"{'-':>13}"
        lines.append(f"{r.stage:>5}  {span:<22} {r.n_items:>3}  {_human(r.params):>10}  "
                     f"{100 * r.flops_share:5.1f}%  {mem}")
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))
