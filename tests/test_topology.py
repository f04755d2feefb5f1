"""Rank <-> (pp, dp, tp) arithmetic, agreement with DeepSpeed's topology, real groups."""

import itertools

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from launcher.config.schema import ParallelConfig
from launcher.ds.pipeline import deepspeed_topology
from launcher.errors import ConfigError
from parallel.layout import Coord, Layout, resolve_layout
from parallel.topology import ModelParallelUnit, build_process_groups

LAYOUTS = [(1, 1, 1), (2, 2, 2), (8, 4, 2), (4, 1, 3), (1, 8, 1), (2, 3, 5)]


@pytest.mark.parametrize("tp,pp,dp", LAYOUTS)
def test_coords_match_deepspeed_topology(tp, pp, dp):
    layout = Layout(world_size=tp * pp * dp, tp=tp, pp=pp, dp=dp, micro_batch=1, global_batch=dp)
    topo = deepspeed_topology(layout)
    for rank in range(layout.world_size):
        c = layout.coord(rank)
        theirs = topo.get_coord(rank)
        assert (c.pp, c.dp, c.tp) == (theirs.pipe, theirs.data, theirs.model)
        assert layout.rank(c) == rank


@pytest.mark.parametrize("tp,pp,dp", LAYOUTS)
def test_groups_partition_the_world_with_tp_innermost(tp, pp, dp):
    layout = Layout(world_size=tp * pp * dp, tp=tp, pp=pp, dp=dp, micro_batch=1, global_batch=dp)
    for groups, size in ((layout.tp_group_ranks(), tp), (layout.dp_group_ranks(), dp), (layout.pp_group_ranks(), pp)):
        assert sorted(itertools.chain(*groups)) == list(range(layout.world_size))
        assert all(len(g) == size for g in groups)
    for g in layout.tp_group_ranks():  # consecutive ranks: one node when tp <= GPUs per node
        assert g == list(range(g[0], g[0] + tp))
    topo = deepspeed_topology(layout)
    assert sorted(map(sorted, layout.dp_group_ranks())) == sorted(map(sorted, topo.get_axis_comm_lists("data"))) or dp == 1


def test_resolve_layout_auto_and_errors():
    layout = resolve_layout(ParallelConfig(tensor=2, pipeline=2, data="auto", micro_batch=2, global_batch=16), 8)
    assert (layout.dp, layout.grad_accum) == (2, 4)
    with pytest.raises(ConfigError, match="parallel.data: auto: world size 6"):
        resolve_layout(ParallelConfig(tensor=2, pipeline=2), 6)
    with pytest.raises(ConfigError, match="parallel.global_batch"):
        resolve_layout(ParallelConfig(tensor=1, pipeline=1, micro_batch=3, global_batch=8), 2)
    assert layout.coord(5) == Coord(pp=1, dp=0, tp=1)


def _group_sums(rank, world_size):
    layout = Layout(world_size=8, tp=2, pp=2, dp=2, micro_batch=1, global_batch=2)
    groups = build_process_groups(layout, rank)
    mpu = ModelParallelUnit(groups)
    out = {}
    for name, group in (("tp", groups.tp_group), ("dp", groups.dp_group), ("pp", groups.pp_group)):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=group)
        out[name] = t.item()
    out["ranks"] = (groups.tp_ranks, groups.dp_ranks, groups.pp_ranks)
    out["mpu"] = (mpu.get_model_parallel_rank(), mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size())
    return out


def test_real_process_groups_on_eight_ranks():
    results = run_distributed(_group_sums, 8)
    layout = Layout(world_size=8, tp=2, pp=2, dp=2, micro_batch=1, global_batch=2)
    for rank, r in enumerate(results):
        tp_ranks, dp_ranks, pp_ranks = r["ranks"]
        assert rank in tp_ranks and rank in dp_ranks and rank in pp_ranks
        assert r["tp"] == sum(tp_ranks) and r["dp"] == sum(dp_ranks) and r["pp"] == sum(pp_ranks)
        c = layout.coord(rank)
        assert r["mpu"] == (c.tp, c.dp, 2)
