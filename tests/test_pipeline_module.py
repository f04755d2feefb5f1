"""Our stage boundaries go into DeepSpeed's PipelineModule unchanged, and the model cut
into stages (with tensor parallelism inside each) computes the single-process logits."""

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from launcher.config.schema import ModelConfig
from launcher.ds.pipeline import deepspeed_topology
from launcher.ds.seams import StagedPipelineModule
from launcher.model.llama import LlamaModel, layer_specs
from parallel.costs import item_costs
from parallel.layout import Layout
from parallel.partition import partition
from parallel.tensor_parallel import NO_TP, TensorParallel, gather_shards
from parallel.topology import build_process_groups

CFG = ModelConfig(layers=3, hidden=64, heads=4, kv_heads=2, ffn=96, vocab=256, seq_len=16)


def _ids():
    return torch.randint(0, CFG.vocab, (2, CFG.seq_len), generator=torch.Generator().manual_seed(5))


def _pipelined_logits(rank, world_size, tp_size, pp_size, tied):
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": tied})
    layout = Layout(world_size=world_size, tp=tp_size, pp=pp_size, dp=1, micro_batch=2, global_batch=2)
    groups = build_process_groups(layout, rank)
    tp = TensorParallel(groups.tp_group, groups.coord.tp, tp_size)
    parts = partition("balanced", item_costs(cfg, tp=tp_size), pp_size)
    module = StagedPipelineModule(layer_specs(cfg, tp, seed=11), parts, topology=deepspeed_topology(layout))
    assert module.parts == parts
    assert module.stage_id == groups.coord.pp

    x = _ids()
    if not groups.is_first_stage:  # receive the previous stage's hidden states
        x = torch.empty(2, cfg.seq_len, cfg.hidden)
        dist.recv(x, src=groups.pp_ranks[groups.coord.pp - 1])
    with torch.no_grad():
        y = module(x)
    if not groups.is_last_stage:
        dist.send(y.contiguous(), dst=groups.pp_ranks[groups.coord.pp + 1])
        return {"parts": module.parts}
    return {"parts": module.parts, "logits": gather_shards(y, -1, tp)}


@pytest.mark.parametrize("tp_size,pp_size,tied", [(1, 2, False), (1, 3, True), (2, 2, True)])
def test_pipeline_stages_match_single_process(tp_size, pp_size, tied):
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": tied})
    with torch.no_grad():
        expected = LlamaModel(layer_specs(cfg, NO_TP, seed=11))(_ids())
    results = run_distributed(_pipelined_logits, tp_size * pp_size, tp_size, pp_size, tied)
    last_stage = [r for r in results if "logits" in r]
    assert len(last_stage) == tp_size
    for r in last_stage:
        torch.testing.assert_close(r["logits"], expected, rtol=0, atol=1e-5)


def test_rejects_bad_boundaries():
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=1, num_dp=1)
    with pytest.raises(ValueError, match="empty"):
        StagedPipelineModule([torch.nn.Identity()] * 3, [0, 0, 3], topology=topo)
    with pytest.raises(ValueError, match="do not cover"):
        StagedPipelineModule([torch.nn.Identity()] * 3, [0, 1, 2], topology=topo)
