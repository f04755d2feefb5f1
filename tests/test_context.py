"""Context parallelism's attention (parallel/context.py) against one process's, in fp32."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_distributed

from parallel.context import (
    _dense_mask_attention,
    chunk_positions,
    context_attention,
    flex_context_attention,
    local_chunks,
)
from parallel.tensor_parallel import TensorParallel

B, HQ, HKV, T, D = 2, 4, 2, 16, 8


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (HQ, HKV, HKV))
    segments = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16])  # documents across the chunk borders
    grad = torch.randn(B, HQ, T, D, generator=g)
    return q, k, v, segments, grad


def _reference(segments=None):
    q, k, v, seg, grad = _inputs()
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    if segments:
        mask = (mask[None] & (seg[:, :, None] == seg[:, None, :]))[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _attend(cp: TensorParallel, documents: bool):
    q, k, v, seg, grad = _inputs()
    q, k, v = (local_chunks(t, cp, dim=2).clone().requires_grad_() for t in (q, k, v))
    out = context_attention(q, k, v, cp, T, segments=seg if documents else None, gqa=True)
    out.backward(local_chunks(grad, cp, dim=2))
    return chunk_positions(T, cp), out.detach(), q.grad, k.grad, v.grad


def _on_context_ranks(rank, world_size):
    """Context 4 (all ranks) with documents; context 2 (ranks 0-1 and 2-3) without."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    return {(4, True): _attend(TensorParallel(dist.group.WORLD, rank, world_size), True),
            (2, False): _attend(TensorParallel(pairs[rank // 2], rank % 2, 2), False)}


def test_chunks_pair_an_early_and_a_late_one_and_cover_the_sequence():
    for size in (1, 2, 4):
        held = [chunk_positions(T, TensorParallel(None, r, size)) for r in range(size)]
        assert sorted(torch.cat(held).tolist()) == list(range(T))
        if size > 1:  # causal work per rank: the number of (query, key <= query) pairs is the same
            assert len({int((p + 1).sum()) for p in held}) == 1
    with pytest.raises(ValueError, match="not divisible by 2 x context degree 3"):
        chunk_positions(T, TensorParallel(None, 0, 3))


def test_attention_over_context_ranks_equals_one_process():
    """Outputs and the gradients of q, k, v on each rank's positions equal one process's
    within 1e-6: context 4 with documents crossing the chunk borders, context 2 without."""
    for by_case in run_distributed(_on_context_ranks, 4):
        for (size, documents), (positions, *got) in by_case.items():
            for mine, full in zip(got, _reference(documents)):
                assert torch.allclose(mine, full.index_select(2, positions), atol=1e-6), (size, documents)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("documents", [False, True])
def test_flex_path_masks_as_the_dense_one(documents):
    """The CUDA path (FlexAttention's block mask from the global positions, run eagerly: its
    forward runs on CPU) gives the CPU path's output on every context rank's queries."""
    q, k, v, seg, _ = _inputs()
    for rank in range(2):
        mine = chunk_positions(T, TensorParallel(None, rank, 2))
        local_q = q.index_select(2, mine)
        segments = seg if documents else None
        flex = flex_context_attention(local_q, k, v, mine, segments, gqa=True, compiled=False)
        assert torch.allclose(flex, _dense_mask_attention(local_q, k, v, mine, segments, gqa=True), atol=1e-5)


STEPS = 4


def _scaled_rope_model():
    """tests/test_document_attention.py's model with Llama 3.1's RoPE scaling, its original
    context shortened so that its 4 frequencies fall in all three bands (kept, smoothed,
    stretched): positions must be global for the scaled frequencies too."""
    from test_document_attention import GQA

    from launcher.config.schema import RopeScaling

    return dataclasses.replace(GQA, rope_scaling=RopeScaling(original_max_position_embeddings=128))


def _context_engine_runs(rank, world_size, runs):
    """STEPS train steps and an eval batch of each layout through the training engine, on the
    packed documents of tests/test_document_attention.py (documents cross the chunk borders,
    with a loss mask): (losses, grad norms, eval loss)."""
    from test_document_attention import engine_config, run_engine

    results = {}
    for name, parallel in runs:
        engine, results[name] = run_engine(engine_config(STEPS, _scaled_rope_model(), **parallel), rank, world_size)
        engine.ds.destroy()
    return results


def test_context_parallel_layouts_match_one_process():
    """cp 2 x tp 2 (sequence parallel) x pp 2, and cp 4 x dp 2, 8 processes: for 4 steps the single
    process's losses, grad norms and eval loss, with documents crossing chunk borders and a
    loss mask (whose mean over the sequence the context ranks keep exact), under Llama 3.1's
    scaled RoPE."""
    from test_document_attention import _single_process

    losses, norms, val = _single_process(steps=STEPS, model=_scaled_rope_model())
    runs = [("cp2_tp2_pp2", {"context": 2}), ("cp4_dp2", {"context": 4, "tensor": 1, "pipeline": 1})]
    for rank, by_layout in enumerate(run_distributed(_context_engine_runs, 8, runs)):
        for name, (got_losses, got_norms, got_val) in by_layout.items():
            where = f"rank {rank} {name}"
            assert got_losses == pytest.approx(losses, abs=1e-5), where
            assert got_norms == pytest.approx(norms, rel=1e-5), where
            assert got_val == pytest.approx(val, abs=1e-5), where


def _activations_per_rank(rank, world_size):
    """recompute mode -> (measured, planned) bytes one context rank keeps for backward over
    one forward and the loss of a 2-layer model on its chunks of one 64-token sequence."""
    return {mode: _activations(rank, world_size, mode) for mode in ("none", "selective")}


def _activations(rank, world_size, recompute):
    from test_plan import _saved_bytes

    from launcher.config.schema import ModelConfig
    from launcher.model.attention import Attention
    from launcher.model.layers import BlockOptions
    from launcher.model.llama import LlamaModel, LossFn, layer_specs
    from parallel.costs import item_costs
    from parallel.tensor_parallel import NO_TP

    cp = TensorParallel(dist.group.WORLD, rank, world_size)
    cfg = ModelConfig(layers=2, hidden=64, heads=4, kv_heads=2, ffn=176, vocab=256, seq_len=64)
    model = LlamaModel(layer_specs(cfg, NO_TP, seed=0, options=BlockOptions(recompute=recompute, context=cp)))
    model.loss_fn = LossFn(NO_TP, cp)
    ids = local_chunks(torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0)), cp)
    with torch.no_grad():
        model(ids)
    persistent = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for module in model.modules():
        if isinstance(module, Attention):
            persistent |= {t.untyped_storage().data_ptr() for t in module._rope}
    planned = sum(c.act_bytes for c in item_costs(cfg, 1, 1, 4, recompute, False, context=world_size))
    return _saved_bytes(model, ids, persistent), planned


def test_activations_per_context_rank_match_the_planner():
    """What a context rank keeps for backward is the planner's per-rank activations (s / C
    positions, plus the gathered keys and values when the attention core is not recomputed)
    within 2%, less the dense mask of the CPU path (4 bytes per (query, key) of each layer,
    which the CUDA path does not store; bench/context.py prints the same at larger sizes)."""
    for by_mode in run_distributed(_activations_per_rank, 2):
        for recompute, (measured, planned) in by_mode.items():
            mask = 2 * 4 * 32 * 64 if recompute == "none" else 0
            assert abs(measured - mask - planned) <= 0.02 * planned, (recompute, measured, mask, planned)
