"""The lean step (issue 18): fused projections, sequence parallelism, selective and full
recomputation and compiled blocks each compute what the dense single-process model computes
(losses and every gradient, over several optimizer steps, fp32), and the tensor-parallel
collectives are exactly those parallel/comm_bytes.py's formula names, with its payloads."""

import functools

import pytest
import torch
from distributed import run_distributed

from launcher.config.schema import ModelConfig
from launcher.model.layers import BlockOptions
from launcher.model.llama import LlamaModel, LossFn, layer_specs
from parallel.comm_bytes import CollectiveBytes, collective_counts, tp_collectives
from parallel.tensor_parallel import NO_TP, TensorParallel, gather_shards

CFG = ModelConfig(layers=2, hidden=64, heads=8, kv_heads=4, ffn=96, vocab=256, seq_len=16, tie_embeddings=True)
BATCH, STEPS, LR = 2, 3, 0.5
DENSE = BlockOptions(fused=False)

# (name, sequence parallel, options); every one runs at tp 2 and is compared with DENSE at tp 1
VARIANTS = [
    ("fused", False, BlockOptions()),
    ("unfused", False, BlockOptions(fused=False)),
    ("sequence_parallel", True, BlockOptions()),
    ("sequence_parallel_selective", True, BlockOptions(recompute="selective")),
    ("sequence_parallel_full", True, BlockOptions(recompute="full")),
    ("sequence_parallel_compiled", True, BlockOptions(compile=True, recompute="selective")),
]


def _batch(step: int):
    gen = torch.Generator().manual_seed(100)  # the same batch each step: the loss must fall
    ids = torch.randint(0, CFG.vocab, (BATCH, CFG.seq_len), generator=gen)
    return ids, torch.randint(0, CFG.vocab, (BATCH, CFG.seq_len), generator=gen)


def _model(tp: TensorParallel, options: BlockOptions) -> LlamaModel:
    checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    return LlamaModel(layer_specs(CFG, tp, seed=7, options=options), checkpoint if options.recompute == "full" else None)


def _train(tp: TensorParallel, options: BlockOptions) -> dict:
    """STEPS steps of plain SGD; each step's loss and the full (gathered) gradients."""
    model = _model(tp, options)
    loss_fn = LossFn(tp)
    out = {"losses": [], "grads": []}
    for step in range(STEPS):
        ids, targets = _batch(step)
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(ids), targets)
        loss.backward()
        out["losses"].append(loss.item())
        out["grads"].append({n: p.grad.clone() if p.tp_shard_dim is None else gather_shards(p.grad, p.tp_shard_dim, tp)
                             for n, p in model.named_parameters()})
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    return out


def _collectives(tp: TensorParallel) -> dict:
    """The (function, payload) of each tp collective in one forward and one backward."""
    model = _model(tp, BlockOptions())
    counter = CollectiveBytes(list(range(tp.size))).install()
    try:
        ids, targets = _batch(0)
        loss = LossFn(tp)(model(ids), targets)
        forward = counter.take_calls()
        loss.backward()
        return {"forward": forward, "backward": counter.take_calls()}
    finally:
        counter.uninstall()


def _chunked_loss(tp: TensorParallel) -> dict:
    """The vocab-parallel loss in several chunks (one with a remainder) of this rank's shard
    of logits of a 100-token, 256-word batch; loss and the gathered logits' gradient."""
    import parallel.tensor_parallel as tensor_parallel

    gen = torch.Generator().manual_seed(5)
    full = torch.randn(4, 25, 256, generator=gen) * 3
    targets = torch.randint(0, 256, (4, 25), generator=gen)
    start, width = tp.shard(256)
    shard = full[..., start:start + width].clone().requires_grad_(True)
    saved = []
    tensor_parallel.LOSS_CHUNK_ELEMENTS = 7 * width  # 15 chunks of 7 tokens
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = tensor_parallel.vocab_parallel_cross_entropy(shard, targets, tp).mean()
        loss.backward()
    finally:
        tensor_parallel.LOSS_CHUNK_ELEMENTS = 1 << 24
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return {"loss": loss.item(), "grad": gather_shards(shard.grad, -1, tp), "logits": full, "targets": targets,
            "saved_bytes": sum(storages.values()), "shard_bytes": shard.numel() * 4, "shard_ptr":
            shard.untyped_storage().data_ptr() in storages}


def _tp2(rank, world_size):
    group = torch.distributed.group.WORLD
    results = {name: _train(TensorParallel(group, rank, world_size, sequence_parallel=sp), options)
               for name, sp, options in VARIANTS}
    results["loss"] = _chunked_loss(TensorParallel(group, rank, world_size))
    results["calls"] = {sp: _collectives(TensorParallel(group, rank, world_size, sequence_parallel=sp))
                        for sp in (False, True)}
    return results


@pytest.fixture(scope="module")
def dense():
    return _train(NO_TP, DENSE)


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(_tp2, 2)


def _assert_matches(got: dict, ref: dict, what: str) -> None:
    for step, (a, b) in enumerate(zip(got["losses"], ref["losses"]), 1):
        assert abs(a - b) <= 1e-5, f"{what}: step {step} loss {a} vs {b}"
    assert ref["losses"][-1] < ref["losses"][0]  # the steps train: later steps see updated weights
    for step, (grads, ref_grads) in enumerate(zip(got["grads"], ref["grads"]), 1):
        assert grads.keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-5, msg=f"{what}: step {step} grad of {name}")


# compiled blocks: at tp 2 below (their gradients) and through the launcher in tests/test_train.py
@pytest.mark.parametrize("options", [BlockOptions(), BlockOptions(recompute="selective"),
                                     BlockOptions(recompute="full")], ids=["fused", "selective", "full"])
def test_every_switch_matches_the_dense_model_on_one_process(dense, options):
    _assert_matches(_train(NO_TP, options), dense, str(options))


@pytest.mark.parametrize("name", [name for name, _, _ in VARIANTS])
def test_every_switch_matches_the_dense_model_at_tp2(dense, tp2, name):
    for rank, result in enumerate(tp2):
        _assert_matches(result[name], dense, f"tp 2 rank {rank} {name}")


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["all_reduce", "sequence_parallel"])
def test_tp_collectives_are_the_formulas(tp2, sequence_parallel):
    act_bytes = BATCH * CFG.seq_len * CFG.hidden * 4
    expected = tp_collectives(CFG.layers, CFG.hidden, BATCH * CFG.seq_len, 4, 2, sequence_parallel)
    for rank, result in enumerate(tp2):
        calls = result["calls"][sequence_parallel]
        for phase in ("forward", "backward"):
            print(f"\ntp 2 rank {rank}, sequence parallel {sequence_parallel}, {phase}: "
                  f"{collective_counts(calls[phase])}")
            assert collective_counts(calls[phase]) == collective_counts(expected[phase]), phase
        # what the formula says per layer, spelled out: one collective per block input and output
        moved = {phase: sum(b for _, b in calls[phase]) for phase in calls}
        if not sequence_parallel:
            per_layer = {phase: sum(1 for f, b in calls[phase] if f == "all_reduce" and b == act_bytes) for phase in calls}
            assert per_layer == {"forward": 2 * CFG.layers + 1, "backward": 2 * CFG.layers + 1}  # + embed / + head
        else:
            assert all(f != "all_reduce" or b < act_bytes for f, b in calls["forward"] + calls["backward"])
        print(f"tp 2 sequence parallel {sequence_parallel}: bytes forward {moved['forward']:,}, "
              f"backward {moved['backward']:,}")


def test_the_formula_counts_two_forward_and_two_backward_all_reduces_per_layer():
    """Megatron's count, from the formula itself: adding a layer adds exactly 2 + 2."""
    one, two = (tp_collectives(layers, 64, 32, 4, 2, False) for layers in (1, 2))
    assert len(two["forward"]) - len(one["forward"]) == 2
    assert len(two["backward"]) - len(one["backward"]) == 2
    sp_one, sp_two = (tp_collectives(layers, 64, 32, 4, 2, True) for layers in (1, 2))
    # with sequence parallelism the activation payloads moved equal the all-reduce case's
    # times two (a reduce-scatter plus an all-gather per all-reduce), plus the backward re-gather
    act = 32 * 64 * 4
    sp_layer = sum(b for _, b in sp_two["forward"] if b == act) - sum(b for _, b in sp_one["forward"] if b == act)
    assert sp_layer == 2 * 2 * act


@pytest.mark.parametrize("tp_size", [1, 2])
def test_chunked_loss_is_torch_cross_entropy_and_keeps_only_the_logits(tp2, tp_size):
    """Forward and gradient equal torch's cross-entropy on the full logits; what backward
    keeps is the logits shard itself plus a few numbers per token (no fp32 softmax copy)."""
    results = [_chunked_loss(NO_TP)] if tp_size == 1 else [r["loss"] for r in tp2]
    for r in results:
        logits = r["logits"].clone().requires_grad_(True)
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), r["targets"].reshape(-1))
        expected.backward()
        assert abs(r["loss"] - expected.item()) < 1e-6
        torch.testing.assert_close(r["grad"], logits.grad, rtol=0, atol=1e-7)
        assert r["shard_ptr"]  # the logits themselves, not a copy
        tokens = r["targets"].numel()
        print(f"\ntp {tp_size}: loss keeps {r['saved_bytes']:,} bytes for backward, the logits shard is "
              f"{r['shard_bytes']:,}")
        assert r["saved_bytes"] <= r["shard_bytes"] + 24 * tokens  # + lse (fp32), target index, mask


def test_compile_without_a_compiler_is_refused_in_one_line(tmp_path):
    """Both sides of the capability check: with no C/C++ compiler on PATH, model.compile is
    refused before anything starts (CPU: C++ for inductor; --dry-run assumes a GPU: C for
    Triton); with one (this machine, CI installs g++) the same command passes preflight and
    the compiled tests above run."""
    import os
    import subprocess
    import sys

    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX")}
    base = [sys.executable, "-m", "launcher.train", "model.compile=true", "parallel.tensor=1", "parallel.pipeline=1"]
    for extra, words in (([f"run.dir={tmp_path / 'run'}", "train.steps=1", "schedule.warmup_steps=0"], "C++ compiler"),
                         (["--dry-run"], "C compiler")):
        refused = subprocess.run([*base, *extra], env={**env, "PATH": str(bare)}, capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode == 2, refused.stderr[-2000:]
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("config error: model.compile:") and words in lines[0], lines
    accepted = subprocess.run([*base, "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert accepted.returncode == 0, accepted.stderr[-2000:]
