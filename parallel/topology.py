"""The process groups of a layout: every rank's tp, dp and pp groups, built collectively
from a `parallel.layout.Layout` (whose docstring has the rank order), and the `mpu`
interface through which DeepSpeed's engine finds the tensor and data groups.

The only part of `parallel/` that needs torch.distributed; the rank arithmetic it uses is
pure and lives in parallel/layout.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch.distributed as dist

from parallel.layout import Coord, Layout


@dataclass
class ProcessGroups:
    """This rank's place in the layout and the groups it belongs to."""

    layout: Layout
    rank: int
    coord: Coord
    tp_group: Any
    dp_group: Any
    pp_group: Any
    tp_ranks: list[int]
    dp_ranks: list[int]
    pp_ranks: list[int]
    # expert parallelism (parallel/layout.py): the expert group, the ranks holding the same
    # experts, and this rank's expert group peers with its tp rank. When ep = tp they are the
    # tp group, the dp group and no group (this rank alone).
    ep_group: Any = None
    expert_dp_group: Any = None
    expert_peer_group: Any = None
    expert_dp_ranks: Optional[list[int]] = None
    cp_group: Any = None  # the context group (context parallelism), None when cp = 1

    @property
    def ep_rank(self) -> int:
        return self.layout.expert_rank(self.coord)

    @property
    def is_first_stage(self) -> bool:
        return self.coord.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coord.pp == self.layout.pp - 1


def group_timeout(timeout_s: Optional[float]) -> timedelta:
    """The timeout every process group gets (torch's gloo default, 30 min, when unset)."""
    return timedelta(seconds=timeout_s) if timeout_s else timedelta(minutes=30)


def build_process_groups(layout: Layout, rank: int, timeout_s: Optional[float] = None) -> ProcessGroups:
    """Create every tp, dp and pp group (collectively: all ranks must call this).

    Each group gets `timeout_s` (parallel.collective_timeout_s, as the world group): without
    `timeout=` torch gives a subgroup its backend's default (30 min gloo, 10 min NCCL), not
    the world's."""
    if dist.get_world_size() != layout.world_size:
        raise RuntimeError(f"layout is for {layout.world_size} ranks, process group has {dist.get_world_size()}")
    timeout = group_timeout(timeout_s)
    families = [("tp", layout.tp_group_ranks()), ("dp", layout.dp_group_ranks()), ("pp", layout.pp_group_ranks())]
    if layout.cp > 1:
        families.append(("cp", layout.cp_group_ranks()))
    if layout.experts_over_dp > 1:
        families += [("ep", layout.ep_group_ranks()), ("edp", layout.expert_dp_group_ranks()),
                     ("peer", layout.expert_peer_group_ranks())]
    mine: dict[str, tuple[Any, list[int]]] = {}
    for name, all_groups in families:
        for ranks in all_groups:  # new_group is collective over the world, in the same order
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine[name] = (group, ranks)
    mine.setdefault("ep", mine["tp"])
    mine.setdefault("edp", mine["dp"])
    return ProcessGroups(layout=layout, rank=rank, coord=layout.coord(rank),
                         tp_group=mine["tp"][0], dp_group=mine["dp"][0], pp_group=mine["pp"][0],
                         tp_ranks=mine["tp"][1], dp_ranks=mine["dp"][1], pp_ranks=mine["pp"][1],
                         ep_group=mine["ep"][0], expert_dp_group=mine["edp"][0],
                         expert_peer_group=mine.get("peer", (None,))[0], expert_dp_ranks=mine["edp"][1],
                         cp_group=mine.get("cp", (None,))[0])


@dataclass
class ModelParallelUnit:
    """The `mpu` interface DeepSpeed's engine queries for tensor and data parallel groups
    (used when pipeline = 1; the pipeline engine builds its own grid from the topology).
    With experts over data ranks, DeepSpeed's model group is the expert group and its data
    group the ranks holding the same experts (`Layout.ds_model`, `Layout.ds_data`)."""

    groups: ProcessGroups

    def get_model_parallel_rank(self) -> int:
        return self.groups.ep_rank

    def get_model_parallel_world_size(self) -> int:
        return self.groups.layout.ds_model

    def get_model_parallel_group(self):
        return self.groups.ep_group

    def get_data_parallel_rank(self) -> int:
        return self.groups.layout.slot(self.groups.coord) // self.groups.layout.experts_over_dp

    def get_data_parallel_world_size(self) -> int:
        return self.groups.layout.ds_data

    def get_data_parallel_group(self):
        return self.groups.expert_dp_group

    # Megatron-style aliases that parts of DeepSpeed look for.
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.groups.coord.pp

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.groups.layout.pp

    def get_pipeline_model_parallel_group(self):
        return self.groups.pp_group
