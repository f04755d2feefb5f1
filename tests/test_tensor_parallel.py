"""TP=2 and TP=4 compute what TP=1 computes: logits and every parameter's gradient."""

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from launcher.config.schema import ModelConfig
from launcher.model.llama import LlamaModel, LossFn, layer_specs
from parallel.layout import Layout
from parallel.tensor_parallel import TensorParallel, gather_shards
from parallel.topology import build_process_groups

SHAPES = {
    "mha": ModelConfig(layers=2, hidden=64, heads=4, ffn=96, vocab=256, seq_len=16),
    "gqa_tied": ModelConfig(layers=2, hidden=64, heads=8, kv_heads=4, ffn=96, vocab=256, seq_len=16,
                            tie_embeddings=True),
}


def _forward_backward(rank, world_size, cfg):
    torch.manual_seed(0)
    layout = Layout(world_size=world_size, tp=world_size, pp=1, dp=1, micro_batch=2, global_batch=2)
    if world_size > 1:
        groups = build_process_groups(layout, rank)
        tp = TensorParallel(groups.tp_group, groups.coord.tp, world_size)
    else:
        tp = TensorParallel()
    model = LlamaModel(layer_specs(cfg, tp, seed=7))
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab, (2, cfg.seq_len), generator=gen)
    targets = torch.randint(0, cfg.vocab, (2, cfg.seq_len), generator=gen)
    logits = model(ids)
    loss = LossFn(tp)(logits, targets)
    loss.backward()
    full_logits = gather_shards(logits.detach(), -1, tp)
    grads, weights = {}, {}
    for name, p in model.named_parameters():
        dim = p.tp_shard_dim
        grads[name] = p.grad if dim is None else gather_shards(p.grad, dim, tp)
        weights[name] = p.detach() if dim is None else gather_shards(p.detach(), dim, tp)
    return {"loss": loss.item(), "logits": full_logits, "grads": grads, "weights": weights}


def _single(cfg):
    dist.init_process_group  # noqa: B018 (the single run needs no process group)
    return _forward_backward(0, 1, cfg)


@pytest.fixture(scope="module", params=list(SHAPES))
def reference(request):
    cfg = SHAPES[request.param]
    return cfg, _single(cfg)


@pytest.mark.parametrize("tp_size", [2, 4])
def test_tp_matches_single_process(reference, tp_size):
    cfg, ref = reference
    results = run_distributed(_forward_backward, tp_size, cfg)
    for r in results:  # every tp rank ends up with the same full tensors
        assert r["weights"].keys() == ref["weights"].keys()
        for name in ref["weights"]:  # same seed -> same full weights, whatever tp
            torch.testing.assert_close(r["weights"][name], ref["weights"][name], rtol=0, atol=0)
        assert abs(r["loss"] - ref["loss"]) < 1e-5
        torch.testing.assert_close(r["logits"], ref["logits"], rtol=0, atol=1e-5)
        for name, g in ref["grads"].items():
            torch.testing.assert_close(r["grads"][name], g, rtol=0, atol=1e-5, msg=f"grad of {name}")


def test_loss_matches_plain_cross_entropy():
    """The vocab-parallel loss at tp=1 is torch's cross-entropy (guards the reference itself)."""
    cfg = SHAPES["mha"]
    ref = _single(cfg)
    gen = torch.Generator().manual_seed(3)
    torch.randint(0, cfg.vocab, (2, cfg.seq_len), generator=gen)
    targets = torch.randint(0, cfg.vocab, (2, cfg.seq_len), generator=gen)
    expected = torch.nn.functional.cross_entropy(ref["logits"].reshape(-1, cfg.vocab), targets.reshape(-1))
    assert abs(expected.item() - ref["loss"]) < 1e-6
