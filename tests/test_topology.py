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


@pytest.mark.parametrize("tp,pp,dp,ep", [(1, 1, 4, 4), (2, 2, 4, 4), (2, 1, 4, 8), (1, 2, 6, 3), (2, 3, 2, 2)])
def test_expert_groups_are_deepspeeds_model_and_data_groups(tp, pp, dp, ep):
    """Experts over tp x ep/tp consecutive data ranks: the expert groups are consecutive ranks
    (one node when ep fits one) in expert-rank order, and they and the ranks holding the same
    experts are exactly DeepSpeed's model and data groups of the topology it is shown."""
    layout = Layout(world_size=tp * pp * dp, tp=tp, pp=pp, dp=dp, micro_batch=1, global_batch=dp, ep=ep)
    topo = deepspeed_topology(layout)
    for groups, size in ((layout.ep_group_ranks(), ep), (layout.expert_dp_group_ranks(), dp * tp // ep),
                         (layout.expert_peer_group_ranks(), ep // tp)):
        assert sorted(itertools.chain(*groups)) == list(range(layout.world_size))
        assert all(len(g) == size for g in groups)
    for g in layout.ep_group_ranks():
        assert g == list(range(g[0], g[0] + ep))
        assert [layout.expert_rank(layout.coord(r)) for r in g] == list(range(ep))
    assert sorted(map(sorted, layout.ep_group_ranks())) == sorted(map(sorted, topo.get_axis_comm_lists("model")))
    if layout.ds_data > 1:
        assert sorted(map(sorted, layout.expert_dp_group_ranks())) == sorted(
            map(sorted, topo.get_axis_comm_lists("data")))
    for rank in range(layout.world_size):  # the same rank map, cut differently
        c, theirs = layout.coord(rank), topo.get_coord(rank)
        assert (c.pp, c.dp // (ep // tp), layout.expert_rank(c)) == (theirs.pipe, theirs.data, theirs.model)


def test_expert_degree_is_refused_by_name_unless_tp_times_a_divisor_of_dp():
    parallel = ParallelConfig(tensor=2, pipeline=1, data="auto", micro_batch=1, global_batch=8, expert=8)
    assert resolve_layout(parallel, 8).experts_over_dp == 4
    for expert, world in ((6, 8), (16, 8), (8, 12)):
        with pytest.raises(ConfigError, match=r"^parallel.expert: .*must be tensor \(2\) x a divisor of data"):
            resolve_layout(ParallelConfig(tensor=2, pipeline=1, micro_batch=1, global_batch=24, expert=expert), world)
    assert resolve_layout(ParallelConfig(tensor=2, pipeline=1, micro_batch=1, global_batch=8, expert=2), 8).ep == 0


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
