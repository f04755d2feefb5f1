"""Gradient compression: PowerSGD's error bounds and error feedback on real gloo processes,
every method training tp2 x pp2 x dp2, bytes counted on the data-parallel group, our
reduction equal to DeepSpeed's wherever it is exact, and a bit-exact resume."""

import io
import shutil

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from launch import losses, torchrun_cmd, train

from parallel.compression import PowerSGDReducer

FAST = ["train.eval_every=0", "train.log_every=1", "checkpoint.every=0", "schedule.warmup_steps=2"]
STEPS = 10
WARMUP = 4  # the main layout's PowerSGD run: uncompressed (our reduction) for its first 4 steps


def make_reducer(shapes, rank=2, warmup_steps=0, error_feedback=True, exact=None):
    return PowerSGDReducer(shapes, exact or [False] * len(shapes), dist.group.WORLD, rank=rank,
                           warmup_steps=warmup_steps, error_feedback=error_feedback, min_compression_rate=1.0, seed=0)


def _mean(tensors_per_rank_fn, world_size):
    return sum(tensors_per_rank_fn(r) for r in range(world_size)) / world_size


# ---- unit: PowerSGD on 2 real gloo processes ---------------------------------------------


def _low_rank_grads(rank_id: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    left = torch.randn(48, 2, generator=g)  # shared by both ranks: the mean has rank <= 2
    right = torch.randn(32, 2, generator=torch.Generator().manual_seed(100 + rank_id))
    return [left @ right.T, torch.randn(48, generator=torch.Generator().manual_seed(200 + rank_id))]


def _reduce_low_rank(rank_id, world_size):
    grads = _low_rank_grads(rank_id)
    make_reducer([g.shape for g in grads]).reduce_(grads)
    return grads


def test_powersgd_is_exact_when_the_mean_gradient_has_rank_r():
    results = run_distributed(_reduce_low_rank, 2)
    for i in range(2):
        expected = _mean(lambda r: _low_rank_grads(r)[i], 2)
        for got in results:
            torch.testing.assert_close(got[i], expected, rtol=1e-4, atol=1e-4)  # matrix: rank 2 of rank 2; vector: exact


def _full_rank(rank_id: int) -> torch.Tensor:
    return torch.randn(64, 40, generator=torch.Generator().manual_seed(300 + rank_id))


def _approximate_repeatedly(rank_id, world_size, repeats):
    reducer = make_reducer([torch.Size([64, 40])], rank=4, error_feedback=False)
    errors = []
    for _ in range(repeats):
        grad = _full_rank(rank_id).clone()
        reducer.reduce_([grad])
        errors.append(grad)
    return errors


def test_powersgd_error_bounds_and_warm_start_converges_to_the_best_rank_r():
    """One step: the error lies between the Eckart-Young optimum (best rank-4 approximation)
    and |M| (a projection never adds energy). Repeated on the same matrix, warm start is the
    power method: the error approaches the optimum."""
    mean = _mean(_full_rank, 2)
    singular = torch.linalg.svdvals(mean)
    optimum, norm = singular[4:].square().sum().sqrt(), mean.norm()
    results = run_distributed(_approximate_repeatedly, 2, 30)
    assert torch.equal(results[0][-1], results[1][-1])  # every rank applies the same update
    first, last = (results[0][i] - mean for i in (0, -1))
    assert optimum * 0.999 <= first.norm() < norm
    assert last.norm() <= optimum * 1.05
    assert first.norm() > last.norm() * 1.02  # the warm start did improve on one random projection


def _noisy_gradient(rank_id: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    signal = torch.randn(64, 3, generator=g) @ torch.randn(3, 40, generator=g)  # steady, low rank (3) ...
    noise = torch.randn(64, 40, generator=torch.Generator().manual_seed(1000 * step + rank_id))
    return signal + 0.5 * noise  # ... plus per-rank, per-step noise


def _running_sums(rank_id, world_size, error_feedback, steps):
    reducer = make_reducer([torch.Size([64, 40])], rank=1, error_feedback=error_feedback)
    applied = torch.zeros(64, 40)
    for step in range(steps):
        grad = _noisy_gradient(rank_id, step)
        reducer.reduce_([grad])
        applied += grad
    error = reducer.state.error_dict[0].view(64, 40) if error_feedback else torch.zeros(64, 40)
    return applied, error


def test_error_feedback_makes_the_applied_sum_track_the_true_sum():
    """With error feedback, sum of applied updates = sum of true mean gradients - mean of the
    ranks' current errors (an identity), so the gap stays one step's error however long the
    run; without it, what rank-1 compression drops of the steady rank-3 part piles up."""
    steps = 40
    true_sum = sum(_mean(lambda r: _noisy_gradient(r, s), 2) for s in range(steps))
    with_ef = run_distributed(_running_sums, 2, True, steps)
    without = run_distributed(_running_sums, 2, False, steps)
    mean_error = (with_ef[0][1] + with_ef[1][1]) / 2
    torch.testing.assert_close(true_sum - with_ef[0][0], mean_error, rtol=1e-4, atol=1e-3)
    gap_ef, gap_plain = (true_sum - with_ef[0][0]).norm(), (true_sum - without[0][0]).norm()
    assert gap_ef < 0.1 * true_sum.norm()
    assert gap_plain > 5 * gap_ef, (gap_plain, gap_ef)


def _resume_state(rank_id, world_size):
    shapes = [torch.Size([48, 32]), torch.Size([32])]
    grads_at = lambda step: [torch.randn(s, generator=torch.Generator().manual_seed(step * 10 + rank_id + i))
                             for i, s in enumerate(shapes)]
    first = make_reducer(shapes, warmup_steps=2)
    for step in range(5):
        first.reduce_(grads_at(step))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    outputs = {}
    for name in ("continued", "restored", "fresh"):
        reducer = first if name == "continued" else make_reducer(shapes, warmup_steps=2)
        if name == "restored":
            buffer.seek(0)
            assert reducer.load_state_dict(torch.load(buffer, weights_only=True)) is None
        outputs[name] = []
        for step in range(5, 8):
            grads = grads_at(step)
            reducer.reduce_(grads)
            outputs[name].append(grads)
    return outputs


def test_saved_state_continues_bit_exact_and_matters():
    for outputs in run_distributed(_resume_state, 2):
        for a, b in zip(outputs["continued"], outputs["restored"]):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert not torch.equal(outputs["continued"][0][0], outputs["fresh"][0][0])  # the state is not optional


# ---- the real launcher, default model: tp2 x pp2 x dp2, ZeRO 1 ---------------------------


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
    """Every method on the README's main layout, bytes counted."""
    runs = {}
    for name, args in {"none": [], "fp16": ["compression.method=fp16"], "bf16": ["compression.method=bf16"],
                       "powersgd": ["compression.method=powersgd", f"compression.warmup_steps={WARMUP}"]}.items():
        run_dir = tmp_path_factory.mktemp(name)
        runs[name] = train(torchrun_cmd(8), run_dir, *FAST, f"train.steps={STEPS}", "logging.comm_bytes=true", *args)
    return runs


@pytest.mark.parametrize("method", ["none", "fp16", "bf16", "powersgd"])
def test_each_method_trains_tp2_pp2_dp2(default_runs, method):
    metrics = default_runs[method]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    first, last = metrics[0]["loss"], sum(losses(metrics[-3:])) / 3
    assert last < first - 1.0, losses(metrics)
    assert abs(last - sum(losses(default_runs["none"][-3:])) / 3) < 0.1  # and about as well as none


def test_bytes_on_the_data_parallel_group(default_runs):
    """Counted on the wrapped torch.distributed collectives of the data-parallel group."""
    reduce_bytes = {name: [m["dp_reduce_bytes"] for m in metrics] for name, metrics in default_runs.items()}
    gather_bytes = {name: [m["dp_gather_bytes"] for m in metrics] for name, metrics in default_runs.items()}
    none = reduce_bytes["none"][-1]
    assert none > 4 * 100_000  # ~200k fp32 gradients per rank, all-reduced
    for half in ("fp16", "bf16"):  # DeepSpeed reduces 2-byte elements (a few fp32 scalars aside)
        assert abs(reduce_bytes[half][-1] / none - 0.5) < 0.01
    ratio = none / reduce_bytes["powersgd"][-1]
    assert ratio >= 8, f"PowerSGD sends only {ratio:.1f}x fewer gradient bytes than none"
    assert reduce_bytes["powersgd"][:WARMUP] == reduce_bytes["none"][:WARMUP]  # the exact warm-up: same bytes
    # ZeRO 1 all-gathers the updated weights after every step, whatever the gradients cost:
    assert gather_bytes["powersgd"] == gather_bytes["none"] and gather_bytes["none"][-1] > 0.9 * none


def test_uncompressed_powersgd_path_equals_deepspeeds_reduction(default_runs):
    """During the warm-up our reduction replaces DeepSpeed's (ZeRO 1 bookkeeping kept, its
    collective made the identity): same losses and grad norms as `none` to float rounding,
    over the warm-up's steps (each after the previous steps' updates)."""
    ours, reference = default_runs["powersgd"][:WARMUP], default_runs["none"][:WARMUP]
    assert len(ours) == WARMUP
    for a, b in zip(ours, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


SMALL_LAYOUTS = {  # the other DeepSpeed paths our reduction replaces, on 2 or 4 processes
    "pp1_zero0_fp32": (2, ["parallel.tensor=1", "parallel.pipeline=1", "zero.stage=0"]),
    "pp1_zero1_fp32": (2, ["parallel.tensor=1", "parallel.pipeline=1", "zero.stage=1"]),
    "pp1_zero1_bf16": (2, ["parallel.tensor=1", "parallel.pipeline=1", "zero.stage=1", "precision.dtype=bf16"]),
    "pp2_zero1_bf16": (4, ["parallel.tensor=1", "parallel.pipeline=2", "zero.stage=1", "precision.dtype=bf16"]),
}


@pytest.mark.parametrize("layout", SMALL_LAYOUTS)
def test_uncompressed_powersgd_path_equals_deepspeed_on_other_paths(layout, tmp_path):
    """PowerSGD's exact warm-up (steps 1-3) on our reduction gives DeepSpeed's losses and grad
    norms on this path; its compressed steps (4-6) go on training there."""
    nproc, args = SMALL_LAYOUTS[layout]
    common = [*FAST, "train.steps=6", *args]
    # bf16: DeepSpeed reduces in bf16 by default, ours in fp32; compare with its fp32 reduction
    reference = train(torchrun_cmd(nproc), tmp_path / "none", *common, "deepspeed.communication_data_type=fp32")
    ours = train(torchrun_cmd(nproc), tmp_path / "ours", *common, "compression.method=powersgd",
                 "compression.warmup_steps=3", "logging.comm_bytes=true")
    tol = 1e-3 if "bf16" in layout else 1e-5
    assert losses(ours)[:3] == pytest.approx(losses(reference)[:3], rel=tol)
    # Adam hides a wrongly scaled gradient from the loss; the norm does not
    assert [m["grad_norm"] for m in ours[:3]] == pytest.approx([m["grad_norm"] for m in reference[:3]], rel=10 * tol)
    sent = [m["dp_reduce_bytes"] for m in ours]
    assert max(sent[3:]) < 0.5 * min(sent[:3]), sent  # compressed from step 4
    assert losses(ours)[-1] < losses(ours)[2] and abs(losses(ours)[-1] - losses(reference)[-1]) < 0.2, \
        (losses(ours), losses(reference))  # and it trains as well there


# ---- resume --------------------------------------------------------------------------------


def test_resume_with_powersgd_is_bit_exact(tmp_path):
    """pp2 x dp2, PowerSGD on from step 3: a run resumed from its step-6 checkpoint repeats
    steps 7-12 of the uninterrupted run bit for bit (error feedback and factors restored)."""
    common = [*FAST, "parallel.tensor=1", "parallel.pipeline=2", "parallel.data=2", "zero.stage=1",
              "compression.method=powersgd", "compression.warmup_steps=2", "train.steps=12"]
    whole = train(torchrun_cmd(4), tmp_path / "whole", *common, "checkpoint.every=6")
    saved = tmp_path / "whole/checkpoints/step-00000006"
    states = [torch.load(p, weights_only=True) for p in sorted((saved / "compression").glob("rank-*.pt"))]
    assert len(states) == 4 and all(s["iter"] == 6 and s["error_dict"][0].abs().sum() > 0 for s in states)
    copy = tmp_path / "resumed_from"
    shutil.copytree(saved, copy)
    resumed = train(torchrun_cmd(4), tmp_path / "resumed", *common, f"checkpoint.resume={copy}")
    assert [m["step"] for m in resumed] == list(range(7, 13))
    assert losses(resumed) == losses(whole[6:])
    assert [m["grad_norm"] for m in resumed] == [m["grad_norm"] for m in whole[6:]]


def _tied_copies(rank, world_size, overrides, cache):
    """Train a few steps in this process group through build_engine; return this rank's copy
    of the tied embedding/head weight and its pipeline stage."""
    from launcher.cli import DEFAULT_CONFIG
    from launcher.config.load import load_config
    from launcher.data.batches import training_batches
    from launcher.ds.config import deepspeed_config
    from launcher.planning.plan import make_plan
    from launcher.planning.precision import detect_device_support
    from launcher.training.engine import build_engine
    from parallel.topology import build_process_groups

    cfg = load_config(str(DEFAULT_CONFIG), overrides)
    plan = make_plan(cfg, world_size, detect_device_support())
    groups = build_process_groups(plan.layout, rank)
    engine = build_engine(cfg, plan, groups, torch.device("cpu"), deepspeed_config(cfg, plan))
    lay = plan.layout
    batches = training_batches(cfg, cache, global_batch=lay.global_batch, micro_batch=lay.micro_batch, dp=lay.dp,
                               dp_rank=groups.coord.dp)
    for _ in range(cfg.train.steps):
        engine.train_step(batches.next_step() if engine.reads_data else None)
    weight = engine.ds.module.tied_modules["embed"].embed.weight.detach().clone()
    compressing = engine.compressor.compressing
    engine.ds.destroy()
    return groups.coord.pp, weight, compressing


def test_weights_tied_across_stages_stay_equal_under_powersgd(tmp_path):
    """The embedding (stage 0) and the output head (stage 1) are one tied weight with a copy
    on each stage, and each stage's data-parallel group reduces its own copy. Compressed,
    each copy would get its own approximation and they would drift apart; they are reduced
    exactly, so after PowerSGD steps both copies are still equal bit for bit."""
    overrides = ["parallel.tensor=1", "parallel.pipeline=2", "parallel.data=2", "zero.stage=1",
                 "model.tie_embeddings=true", "compression.method=powersgd", "compression.warmup_steps=1",
                 "train.steps=4", "schedule.warmup_steps=1"]
    results = run_distributed(_tied_copies, 4, overrides, tmp_path)
    by_stage = {pp: weight for pp, weight, _ in results}
    assert all(compressing for _, _, compressing in results)
    assert torch.equal(by_stage[0], by_stage[1])
