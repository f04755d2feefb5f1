"""The planner (python -m launcher.plan, `auto`, the refusal at launch) against DeepSpeed's
own estimators, known facts, and bytes measured in real CPU runs: model states summed over
the tensor storage DeepSpeed holds, activations over what autograd saves for backward."""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from distributed import run_distributed
from hypothesis import given, settings
from hypothesis import strategies as st
from launch import base_env, python_cmd

from launcher.config.load import load_config
from launcher.plan import main as plan_main
from launcher.planning.auto import choose
from parallel.costs import item_costs
from parallel.hardware import PRESETS
from parallel.memory import state_bytes
from parallel.planner import RUNNABLE_RECOMPUTE, Cluster
from launch import WORKDIR  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _params(model) -> tuple[int, int]:
    """(all parameters, the largest single tensor) of a tp 1 model."""
    costs = item_costs(model)
    return sum(c.params for c in costs), model.vocab * model.hidden


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_model_states_agree_with_deepspeeds_estimators(config):
    """Pure data parallelism on 8 nodes x 8 GPUs, mixed precision, DeepSpeed's default
    (16-bit) gradient accumulation, as the estimators assume. ZeRO 2: within 5%. ZeRO 3:
    within 5% once the 16-bit gradient partition the estimator leaves out (2 bytes per
    parameter / dp, `grad_partitions_flat_buffer`; measured below in fp32) is added to it."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
    )

    model = load_config(config).model
    params, largest = _params(model)
    gpus = 64
    ours2 = params * state_bytes("bf16", "adamw", 2, gpus, accum_bytes=2).total
    _, theirs2 = estimate_zero2_model_states_mem_needs(params, 8, 8, cpu_offload=False)
    assert abs(ours2 - theirs2) / theirs2 < 0.05, (ours2, theirs2)
    ours3 = params * state_bytes("bf16", "adamw", 3, gpus, accum_bytes=2).total + 2 * largest * 2
    _, theirs3, _ = estimate_zero3_model_states_mem_needs(params, largest, 8, 8, cpu_offload=False,
                                                          cpu_offload_params=False)
    left_out = 2 * params / gpus
    assert abs(ours3 - (theirs3 + left_out)) / theirs3 < 0.05, (ours3, theirs3)
    print(f"\n{config.stem}: ZeRO 2 ours/DeepSpeed {ours2 / theirs2:.3f}, ZeRO 3 {ours3 / theirs3:.3f} "
          f"({ours3 / (theirs3 + left_out):.3f} with the 16-bit gradient partition)")


def test_known_facts():
    cfg = load_config(REPO / "configs/llama_7b.yaml")
    params, _ = _params(cfg.model)
    assert abs(params - 6.74e9) / 6.74e9 < 0.001
    # Mixed-precision AdamW, unsharded: 2 (bf16 weights) + 2 (bf16 grads) + 12 (fp32 master
    # and two moments) = 16 bytes per parameter, as DeepSpeed's ZeRO 2 holds them with
    # dp 1, plus the fp32 copy of the gradients it hands the optimizer at the step.
    unsharded = state_bytes("bf16", "adamw", 2, 1, accum_bytes=2)
    assert (unsharded.weights, unsharded.optimizer) == (2, 12)
    assert unsharded.grads == 2 + 4
    assert unsharded.total * params == pytest.approx(16 * 6.74e9 + 4 * params, rel=0.001)
    # ZeRO 1 over dp 8 cuts the optimizer part 8x and leaves weights and gradients whole.
    one, eight = state_bytes("bf16", "adamw", 1, 1), state_bytes("bf16", "adamw", 1, 8)
    assert eight.optimizer == one.optimizer / 8
    assert (eight.weights, eight.grads) == (one.weights, one.grads)
    # The 7B layout the planner picks for 4 nodes x 8 H100 fits; nothing fits one 24 GB GPU.
    best = choose(cfg, Cluster(4, 8, PRESETS["h100"]), "bf16")
    assert best is not None and best.fits and best.peak.total <= 80 * 2**30
    assert choose(cfg, Cluster(1, 1, PRESETS["h100"].with_memory(24)), "bf16") is None


def test_plan_command_prints_breakdown_ranking_and_json(capsys):
    args = ["--config", "configs/llama_7b.yaml", "--nodes", "4", "--gpus-per-node", "8", "--gpu", "h100"]
    assert plan_main(args) == 0
    text = capsys.readouterr().out
    for row in ("weights", "gradients", "optimizer states", "activations", "reduce bucket", "framework overhead",
                "margin", "total", "rule of thumb", "layouts that fit", "why tp 1 x pp 4 x dp 8"):
        assert row in text, row
    assert plan_main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    chosen = report["auto"]  # what `auto` chose, as data, and the planner's figures for it
    assert chosen["fits"] and chosen["gpu"] == "H100-SXM5-80GB" and chosen["memory_gib"] == 79.6
    assert chosen["keys"] == {"parallel.tensor": report["layout"]["tp"], "parallel.pipeline": report["layout"]["pp"],
                              "parallel.micro_batch": report["layout"]["micro_batch"],
                              "parallel.activation_checkpointing": report["layout"]["recompute"]}
    assert chosen["peak_gib"] == pytest.approx(report["layout"]["peak_gib"])
    assert chosen["tokens_per_s"] == pytest.approx(report["layout"]["tokens_per_s"])
    ranked = report["ranked"]
    assert ranked and all(r["fits"] and r["peak_gib"] <= 79.6 for r in ranked)
    assert [r["tokens_per_s"] for r in ranked] == sorted((r["tokens_per_s"] for r in ranked), reverse=True)
    assert report["layout"]["fits"] and report["smallest_world"] == 8
    stage = report["layout"]["stages"][0]
    parts = ("weights", "grads", "optimizer", "activations", "gathered", "framework", "margin")
    assert stage["total"] == pytest.approx(sum(stage[k] for k in parts) + max(stage["logits"], stage["bucket"]))
    assert report["rule_of_thumb_gpus"] == pytest.approx(6.738e9 / 1e9 * 18 * 1.25 / 80, rel=0.01)
    assert plan_main(["--list-gpus"]) == 0
    presets = capsys.readouterr().out
    assert all(name in presets for name in ("A100-SXM4-80GB", "H100-SXM5-80GB", "H200-SXM-141GB", "datasheet"))


@settings(max_examples=40, deadline=None)
@given(nodes=st.integers(-3, 5000), gpus=st.integers(-1, 20), gpu=st.sampled_from(["h100", "a100", "h200", "v100", ""]),
       memory=st.one_of(st.none(), st.text(max_size=8), st.sampled_from(["24GB", "80", "0GB", "1e9GB"])),
       efficiency=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)))
def test_plan_command_fuzzed_options_end_in_a_plan_or_one_line(nodes, gpus, gpu, memory, efficiency):
    args = ["--config", "configs/llama_13b.yaml", "--nodes", str(nodes), "--gpus-per-node", str(gpus), "--gpu", gpu]
    if memory is not None:
        args += ["--gpu-memory", memory]
    if efficiency is not None:
        args += ["--efficiency", repr(efficiency)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = plan_main(args)
        except SystemExit as exit_:  # argparse: a value it cannot parse
            code = exit_.code
    out, err = out.getvalue(), err.getvalue()
    assert code in (0, 2)
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("config error: "), err
    else:
        assert "layouts that fit" in out


_PEAK_RSS = ("import sys\n"
             "from launcher.train import main\n"
             "code = main(sys.argv[1:])\n"
             "with open('/proc/self/status') as f:\n"
             "    sys.stderr.write([l for l in f if l.startswith('VmHWM:')][0])\n"
             "sys.exit(code)\n")


def test_train_refuses_a_layout_that_cannot_fit_before_allocating(tmp_path):
    """Llama-2-7B on one process: ~150 GiB per rank, more than any host here. Exit 2, one
    line with the per-rank numbers, nothing created, and the process never grew past what
    importing torch and DeepSpeed takes."""
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS, "--config", "configs/llama_7b.yaml",
                             "parallel.tensor=1", "parallel.pipeline=1", "parallel.micro_batch=1",
                             "parallel.activation_checkpointing=false", "precision.dtype=fp32",
                             f"run.dir={run}"], cwd=WORKDIR, env=base_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("config error: ")]
    assert len(errors) == 1, result.stderr
    assert "parallel: tp 1 x pp 1 x dp 1 needs" in errors[0]
    # ZeRO 1 at dp 1 runs as ZeRO 0 (launcher/planning/effective.py): fp32 grads once, Adam's two states
    for part in ("weights 25.1", "grads 25.1", "optimizer 50.2", "activations", "--force"):
        assert part in errors[0], part
    assert not run.exists()
    peak_kb = int(result.stderr.split("VmHWM:")[-1].split()[0])
    assert peak_kb < 2_000_000, peak_kb  # 7B in fp32 would be 27 GB of weights alone


def test_dry_run_refuses_and_force_overrides():
    common = [*python_cmd(), "--config", "configs/llama_13b.yaml", "--dry-run", "--world-size", "8",
              "parallel.tensor=1", "parallel.pipeline=1", "parallel.micro_batch=1",
              "parallel.activation_checkpointing=false"]
    refused = subprocess.run(common, cwd=WORKDIR, env=base_env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "fits: tp" in refused.stderr and "--force" in refused.stderr, refused.stderr
    forced = subprocess.run([*common, "--force"], cwd=WORKDIR, env=base_env(), capture_output=True, text=True,
                            timeout=120)
    assert forced.returncode == 0, forced.stderr
    assert "memory     --force: starting although tp 1 x pp 1 x dp 8 needs" in forced.stdout


# --------------------------------------------------------------------------------------
# Measured on CPU: model states held by DeepSpeed, activations saved by autograd
# --------------------------------------------------------------------------------------


def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            out[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return out


def _held(ds) -> dict[str, int]:
    """Bytes of distinct tensor storage DeepSpeed's engine holds, by role: the module's
    weights (ZeRO 3: this rank's partitions), gradients (`.grad` of module parameters and
    of the fp32 masters, and ZeRO's gradient partitions), optimizer states (the inner
    optimizer's state and the fp32 master partitions), and the reduction bucket."""
    opt = ds.optimizer
    inner = getattr(opt, "optimizer", opt)
    params = list(ds.module.parameters())
    weights = _storages([p.ds_tensor if hasattr(p, "ds_tensor") else p for p in params])
    masters = []
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        masters += list(getattr(opt, name, None) or [])
    optim = _storages([v for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)] + masters)
    holders = []
    for name in ("averaged_gradients", "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",
                 "fp32_groups_gradients_flat"):
        value = getattr(opt, name, None) or []
        value = list(value.values()) if isinstance(value, dict) else value
        for v in value:
            holders += list(v) if isinstance(v, (list, tuple)) else [v]
    grads = _storages([p.grad for p in params + masters if p.grad is not None] + holders)
    buckets = _storages([t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.numel() == 500_000_000])
    # ZeRO 3's gradients live in its bucket until reduced: the bucket is counted as the bucket
    grads = {k: v for k, v in grads.items() if k not in weights and k not in optim and k not in buckets}
    bucket_bytes = set(buckets.values())
    return {"weights": sum(weights.values()), "grads": sum(grads.values()), "optimizer": sum(optim.values()),
            "bucket": max(bucket_bytes, default=0)}


def _measure_states(rank, world_size, runs):
    from launcher.cli import DEFAULT_CONFIG
    from launcher.data.batches import training_batches
    from launcher.ds.config import deepspeed_config
    from launcher.planning.plan import make_plan
    from launcher.planning.precision import detect_device_support
    from launcher.training.engine import build_engine
    from parallel.memory import Overhead, StateSettings, rank_memory
    from parallel.topology import build_process_groups

    results = []
    for overrides, cache in runs:
        cfg = load_config(str(DEFAULT_CONFIG), overrides)
        plan = make_plan(cfg, world_size, detect_device_support())
        groups = build_process_groups(plan.layout, rank)
        engine = build_engine(cfg, plan, groups, torch.device("cpu"), deepspeed_config(cfg, plan))
        lay, ds = plan.layout, engine.ds
        batches = training_batches(cfg, cache, global_batch=lay.global_batch, micro_batch=lay.micro_batch,
                                   dp=lay.dp, dp_rank=groups.coord.dp)
        inner = getattr(ds.optimizer, "optimizer", ds.optimizer)
        real_step, real_reduce, seen = inner.step, ds.allreduce_gradients, {}

        def at_step(*args, **kwargs):  # the first parameter group's step: every state exists
            if "step" not in seen:
                gc.collect()
                seen["step"] = _held(ds)
            return real_step(*args, **kwargs)

        def at_reduce(*args, **kwargs):  # the end of backward: full gradients before ZeRO reduces them
            if "reduce" not in seen:
                gc.collect()
                seen["reduce"] = _held(ds)
            return real_reduce(*args, **kwargs)

        engine.train_step(batches.next_step() if engine.reads_data else None)  # optimizer states now exist
        inner.step, ds.allreduce_gradients = at_step, at_reduce
        engine.train_step(batches.next_step() if engine.reads_data else None)
        predicted = rank_memory(cfg.model, plan.costs, plan.parts, groups.coord.pp, lay,
                                StateSettings(dtype=plan.dtype, optimizer=cfg.optimizer.name,
                                              zero_stage=cfg.zero.stage),
                                Overhead(framework_bytes=0))
        measured = dict(seen["step"])
        measured["grads"] = max(seen["step"]["grads"], seen.get("reduce", {}).get("grads", 0))
        measured["bucket"] = max(seen["step"]["bucket"], seen.get("reduce", {}).get("bucket", 0))
        results.append({"zero": cfg.zero.stage, "coord": tuple(groups.coord), "measured": measured,
                        "predicted": {k: getattr(predicted, k) for k in ("weights", "grads", "optimizer", "bucket")}})
        ds.destroy()
    return results


def test_model_states_each_rank_holds_match_the_planner(tmp_path):
    """tp 2 x pp 2 x dp 2 with ZeRO 0 and 1, tp 2 x dp 4 with ZeRO 3 (DeepSpeed's pipeline
    runs ZeRO 0-1), and an MoE with its experts over tp 2 x 2 data ranks with ZeRO 2, fp32
    AdamW, 8 gloo processes, one process group for all four:
    the weight, gradient and optimizer bytes each rank holds (distinct tensor storage, at
    the optimizer step and at the end of backward) are within 10% of the planner's, and the
    reduction bucket is the one it predicts."""
    base = ["train.steps=2", "schedule.warmup_steps=1", "parallel.global_batch=8", "parallel.micro_batch=1",
            "parallel.tensor=2", "optimizer.name=adamw", "precision.dtype=fp32"]
    # an MoE whose experts span data ranks: ep 4 = tp 2 x 2 data ranks, ZeRO 2 over the 2 ranks
    # holding the same experts (8 experts, 2 per rank)
    moe = ["model.moe.experts=8", "model.moe.top_k=2", "model.moe.ffn=128", "model.moe.shared_experts=1",
           "model.moe.first_dense=1", "parallel.expert=4", "parallel.sequence_parallel=false"]
    runs = [([*base, "parallel.pipeline=2", "zero.stage=0"], tmp_path / "z0"),
            ([*base, "parallel.pipeline=2", "zero.stage=1"], tmp_path / "z1"),
            ([*base, "parallel.pipeline=1", "zero.stage=3"], tmp_path / "z3"),
            ([*base, *moe, "parallel.pipeline=1", "zero.stage=2"], tmp_path / "moe_z2")]
    results = [r for rank in run_distributed(_measure_states, 8, runs) for r in rank]
    print("\nZeRO  rank (pp,dp,tp)  weights MB meas/pred  grads MB meas/pred  optimizer MB meas/pred  bucket MB")
    for r in results:
        m, p = r["measured"], r["predicted"]
        print(f"{r['zero']:>4}  {str(r['coord']):<15} {m['weights'] / 1e6:8.3f} / {p['weights'] / 1e6:<8.3f} "
              f"{m['grads'] / 1e6:8.3f} / {p['grads'] / 1e6:<8.3f} {m['optimizer'] / 1e6:8.3f} / "
              f"{p['optimizer'] / 1e6:<8.3f} {m['bucket'] / 1e6:8.1f} / {p['bucket'] / 1e6:.1f}")
        for key in ("weights", "grads", "optimizer"):
            assert abs(m[key] - p[key]) <= 0.10 * p[key], (r["zero"], r["coord"], key, m[key], p[key])
        assert m["bucket"] == p["bucket"] or (p["bucket"] < 500_000_000 and m["bucket"] == 0), r
    assert {r["zero"] for r in results} == {0, 1, 2, 3}


def _saved_bytes(model, ids, persistent) -> int:
    """Bytes of distinct storages autograd saves for backward in one forward of `model`,
    leaving out parameters and tensors that outlive the micro-batch (RoPE tables)."""
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in persistent:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids)
        model.loss_fn(logits, ids)
    return sum(seen.values())


def _activations(rank, world_size, dtype_name, recompute, micro_batch, sequence_parallel=False, extra=()):
    """(measured, predicted) bytes saved for backward by one micro-batch on this tp rank;
    `extra`: overrides of the default config (an MoE model)."""
    from launcher.cli import DEFAULT_CONFIG
    from launcher.model.attention import Attention
    from launcher.model.layers import BlockOptions
    from launcher.model.llama import LlamaModel, LossFn, layer_specs
    from parallel.tensor_parallel import TensorParallel

    cfg = load_config(str(DEFAULT_CONFIG), [f"parallel.tensor={world_size}", "parallel.pipeline=1", *extra])
    tp = TensorParallel(torch.distributed.group.WORLD if world_size > 1 else None, rank, world_size,
                        sequence_parallel=sequence_parallel)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    specs = layer_specs(cfg.model, tp, seed=0, options=BlockOptions(recompute=recompute))
    model = LlamaModel(specs, checkpoint if recompute == "full" else None).to(dtype)
    model.loss_fn = LossFn(tp)
    ids = torch.randint(0, cfg.model.vocab, (micro_batch, cfg.model.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)  # builds the RoPE tables, which live as long as the model
    persistent = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for module in model.modules():
        if isinstance(module, Attention):
            persistent |= {t.untyped_storage().data_ptr() for t in module._rope}
    measured = _saved_bytes(model, ids, persistent)
    predicted = sum(c.act_bytes for c in item_costs(cfg.model, world_size, micro_batch, 4 if dtype_name == "fp32" else 2,
                                                    recompute, sequence_parallel))
    return measured, predicted


def _activation_runs(rank, world_size, runs):
    return {run: _activations(rank, world_size, *run) for run in runs}


# tp 2, one spawn for all: (dtype, recompute, micro_batch, sequence_parallel)
_TP2_RUNS = tuple((dtype, recompute, 2, sp) for dtype, modes in (("fp32", ("none", "selective", "full")),
                                                                  ("bf16", ("none", "selective")))
                  for recompute in modes for sp in (False, True))


@functools.cache
def _tp2_activations() -> tuple[dict, ...]:
    """Each rank's {run: (measured, predicted)} for _TP2_RUNS (shared by the tests below)."""
    return tuple(run_distributed(_activation_runs, 2, _TP2_RUNS))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_activation_bytes_saved_for_backward_match_the_formula(dtype, recompute):
    measured, predicted = _activations(0, 1, dtype, recompute, 2)
    print(f"\ntp 1 {dtype} recompute {recompute}: saved {measured:,} bytes, formula {predicted:,}")
    assert abs(measured - predicted) <= 0.10 * predicted


MOE = ("model.moe.experts=4", "model.moe.top_k=2", "model.moe.ffn=64", "model.moe.shared_experts=1",
       "model.moe.first_dense=1", "model.moe.balance=bias")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_moe_activation_bytes_saved_for_backward_match_the_formula(dtype, recompute):
    """The three MoE items against the same model dense: what the MoE changes (its experts are
    smaller than the dense FFN: in fp32 it saves less), measured and by formula."""
    measured, predicted = _activations(0, 1, dtype, recompute, 2, extra=MOE)
    dense, dense_predicted = _activations(0, 1, dtype, recompute, 2)
    added, added_predicted = measured - dense, predicted - dense_predicted
    print(f"\nMoE tp 1 {dtype} recompute {recompute}: saved {measured:,} bytes, formula {predicted:,}; "
          f"over the dense model {added:,}, formula {added_predicted:,}")
    assert abs(measured - predicted) <= 0.10 * predicted
    assert added != 0 and abs(added - added_predicted) <= 0.05 * abs(added)


def test_activation_bytes_saved_for_backward_match_the_formula_at_tp2():
    """tp 2 with and without sequence parallelism, every recomputation mode, fp32 and bf16."""
    for rank, results in enumerate(_tp2_activations()):
        for (dtype, recompute, _, sp), (measured, predicted) in results.items():
            print(f"\ntp 2 rank {rank} {dtype} recompute {recompute}, sequence parallel {'on' if sp else 'off'}: "
                  f"saved {measured:,} bytes, formula {predicted:,}")
            assert abs(measured - predicted) <= 0.10 * predicted, (rank, dtype, recompute, sp)


def _factor_line(label: str, base: str, other: str, measured: tuple[int, int], predicted: tuple[int, int]) -> float:
    ratio, formula = measured[1] / measured[0], predicted[1] / predicted[0]
    print(f"activation bytes per micro-batch, {label}: {base} {measured[0]:,}, {other} {measured[1]:,} "
          f"({other}/{base} = {ratio:.2f}, formula {formula:.2f})")
    return ratio / formula


def test_activation_bytes_fall_by_the_formulas_factor_with_sequence_parallelism_and_selective_recompute():
    """The reductions the planner counts on, measured: sequence parallelism (tp 2) and
    selective recomputation (tp 1 and tp 2) cut the bytes saved for backward per
    micro-batch by the formula's factor, within 5%."""
    print()
    checks = []
    for dtype in ("fp32", "bf16"):
        none, selective = _activations(0, 1, dtype, "none", 2), _activations(0, 1, dtype, "selective", 2)
        checks.append(_factor_line(f"tp 1 {dtype}", "none", "selective", (none[0], selective[0]),
                                   (none[1], selective[1])))
    tp2 = _tp2_activations()[0]
    names = {("none", False): "none", ("none", True): "SP", ("selective", False): "selective",
             ("selective", True): "SP+selective"}
    for dtype in ("fp32", "bf16"):
        for a, b in ((("none", False), ("none", True)), (("none", False), ("selective", False)),
                     (("none", True), ("selective", True)), (("none", False), ("selective", True))):
            base, other = tp2[(dtype, *a[:1], 2, a[1])], tp2[(dtype, *b[:1], 2, b[1])]
            checks.append(_factor_line(f"tp 2 {dtype}", names[a], names[b], (base[0], other[0]), (base[1], other[1])))
    assert all(abs(c - 1) <= 0.05 for c in checks), checks


def test_planner_tp_traffic_is_the_counted_collectives():
    """The planner's per-item tensor-parallel tables, summed over the model, move what
    parallel/comm_bytes.tp_collectives lists (the collectives tests/test_lean_step.py counts
    in real runs), in all-reduces' worth of ring traffic: an all-gather or a reduce-scatter
    is half. Left out by the planner: the loss's per-token all-reduces and the norm weights'."""
    from parallel.comm_bytes import tp_collectives
    from parallel.costs import pipeline_items
    from parallel.costs import SP_ALLREDUCES, TP_ALLREDUCES

    model = load_config(REPO / "configs/default.yaml").model
    act, weight = {"all_reduce": 1.0, "all_gather_single": 0.5, "reduce_scatter_single": 0.5}, 1000
    for sp, table in ((False, TP_ALLREDUCES), (True, SP_ALLREDUCES)):
        calls = tp_collectives(model.layers, model.hidden, weight, 1, 2, sp)
        for i, phase in enumerate(("forward", "backward")):
            counted = sum(act[fn] for fn, payload in calls[phase] if payload == weight * model.hidden)
            planned = sum(table[kind][i] for _, kind in pipeline_items(model))
            assert planned == counted, (sp, phase, planned, counted)


# --------------------------------------------------------------------------------------
# auto
# --------------------------------------------------------------------------------------


def _auto(path, **parallel):
    cfg = load_config(REPO / path)
    keys = {**dict(tensor="auto", pipeline="auto", micro_batch="auto", activation_checkpointing="auto"), **parallel}
    return cfg.__class__(**{**cfg.__dict__, "parallel": cfg.parallel.__class__(**{**cfg.parallel.__dict__, **keys})})


def test_auto_takes_the_planners_first_layout_and_recomputes_only_when_it_must():
    from launcher.checkpoint.state import SavedLayout
    from launcher.planning.auto import resolve_auto
    from launcher.planning.precision import ASSUMED_GPU

    def saved(tp: int, pp: int) -> SavedLayout:  # the layout of a checkpoint being resumed
        return SavedLayout(tp=tp, pp=pp, dp=32 // (tp * pp), zero_stage=1, dtype="bf16")

    h100 = PRESETS["h100"]
    # Llama-2-70B on 32 H100s fits without recomputation thanks to sequence parallelism;
    # without it, only with selective recomputation, and on 24 only with full.
    for path, gpus, sp, recompute in (("configs/llama_70b.yaml", 24, False, "full"),
                                      ("configs/llama_70b.yaml", 32, False, "selective"),
                                      ("configs/llama_70b.yaml", 32, "auto", "none"),
                                      ("configs/llama_70b.yaml", 128, "auto", "none"),
                                      ("configs/llama_7b.yaml", 32, "auto", "none")):
        cluster = Cluster(gpus // 8, 8, h100)
        cfg = _auto(path, sequence_parallel=sp)
        resolved, note = resolve_auto(cfg, gpus, cluster, ASSUMED_GPU)
        best = choose(cfg, cluster, "bf16")
        p = resolved.parallel
        lay = best.candidate.layout
        assert (p.tensor, p.pipeline, p.micro_batch) == (lay.tp, lay.pp, lay.micro_batch)
        assert p.activation_checkpointing == best.candidate.recompute == recompute, (path, gpus, sp)
        assert f"activation_checkpointing {recompute} (planner:" in note
        for less in RUNNABLE_RECOMPUTE[:RUNNABLE_RECOMPUTE.index(recompute)]:  # recomputes only when it must
            assert choose(_auto(path, sequence_parallel=sp, activation_checkpointing=less), cluster, "bf16") is None
        assert note.startswith("auto       parallel.tensor, parallel.pipeline, parallel.micro_batch, "
                               f"parallel.activation_checkpointing -> tensor {p.tensor}, pipeline {p.pipeline}")
    # A resume keeps the checkpoint's tensor and pipeline degrees when a layout with them fits
    cfg = _auto("configs/llama_7b.yaml")
    resolved, note = resolve_auto(cfg, 32, Cluster(4, 8, h100), ASSUMED_GPU, resume=saved(tp=2, pp=4))
    assert (resolved.parallel.tensor, resolved.parallel.pipeline) == (2, 4)
    assert "tensor 2 x pipeline 4 kept from the checkpoint being resumed" in note
    resolved, note = resolve_auto(cfg, 32, Cluster(4, 8, h100), ASSUMED_GPU, resume=saved(tp=8, pp=1))
    assert "kept" in note and resolved.parallel.tensor == 8
    # Nothing fits: one line naming the first auto key
    with pytest.raises(Exception, match=r"^parallel.tensor: auto: no layout of 8 ranks with zero.stage=1 fits 79.6 GiB"):
        resolve_auto(_auto("configs/llama_70b.yaml"), 8, Cluster(1, 8, h100), ASSUMED_GPU)


def test_auto_expert_degree_is_searched_within_a_node_and_a_given_one_is_kept():
    """parallel.expert: auto tries tp x k for every divisor k of dp whose expert group fits a
    node and divides the experts, and reports its choice; a number is kept as given."""
    from launcher.planning.auto import plan_candidates, resolve_auto
    from launcher.planning.precision import ASSUMED_GPU

    cluster = Cluster(8, 8, PRESETS["h100"])
    cfg = _auto("configs/mixtral_8x7b.yaml", expert="auto")
    pool = plan_candidates(cfg, cluster, "bf16")
    tried = {(c.layout.tp, c.layout.dp, c.layout.expert_degree) for c in pool}
    assert (1, 64, 8) in tried and (2, 16, 8) in tried and (1, 64, 1) in tried
    assert all(ep % tp == 0 and dp % (ep // tp) == 0 and ep <= 8 and 8 % ep == 0 for tp, dp, ep in tried)
    assert all(c.zero < 3 for c in pool if c.layout.ep)
    resolved, note = resolve_auto(cfg, 64, cluster, ASSUMED_GPU)
    best = choose(cfg, cluster, "bf16")
    assert resolved.parallel.expert == best.candidate.layout.expert_degree
    assert "parallel.expert ->" in note and f", expert {resolved.parallel.expert} (planner:" in note
    pinned = _auto("configs/mixtral_8x7b.yaml", expert=4)
    assert {c.layout.expert_degree for c in plan_candidates(pinned, cluster, "bf16")} == {4}
    assert resolve_auto(pinned, 64, cluster, ASSUMED_GPU)[0].parallel.expert == 4
    dense = _auto("configs/llama_7b.yaml")  # a dense model: nothing to search, nothing reported
    assert {c.layout.ep for c in plan_candidates(dense, cluster, "bf16")} == {0}
    assert "expert" not in resolve_auto(dense, 64, cluster, ASSUMED_GPU)[1]


def test_auto_context_cuts_the_sequence_only_where_activations_do_not_fit():
    """parallel.context: auto on Llama 3.1 8B at 131,072 positions: on 8 H100s a layout fits
    at full recomputation without cutting the sequence, so context stays 1; on 16 and 64
    nothing fits with less recomputation at context 1, so the fastest context degree that
    fits is taken, and it needs less recomputation than context 1 would. A given degree is
    kept; a config without long sequences keeps 1 and reports it. The per-rank activations
    fall by about the context degree."""
    from launcher.planning.auto import plan_candidates, resolve_auto
    from launcher.planning.precision import ASSUMED_GPU

    cfg = _auto("configs/llama3_8b_128k.yaml", context="auto")
    chosen = {}
    for gpus in (8, 16, 64):
        cluster = Cluster(gpus // 8, 8, PRESETS["h100"])
        resolved, note = resolve_auto(cfg, gpus, cluster, ASSUMED_GPU)
        p = resolved.parallel
        chosen[gpus] = (p.context, p.activation_checkpointing)
        assert f", context {p.context} (planner:" in note and "parallel.context" in note
        uncut = plan_candidates(cfg, cluster, "bf16", context=1)
        fitting = {c.recompute for c in uncut if estimate_fits(cfg, cluster, c)}
        if p.context > 1:  # cut only because no uncut layout fits at this recomputation or less
            less = RUNNABLE_RECOMPUTE[:RUNNABLE_RECOMPUTE.index(p.activation_checkpointing) + 1]
            assert not fitting & set(less), (gpus, fitting, p)
    assert chosen[8] == (1, "full") and chosen[16][0] > 1 and chosen[64][0] > 1
    assert chosen[16][1] != "full"
    cluster = Cluster(2, 8, PRESETS["h100"])
    pinned = _auto("configs/llama3_8b_128k.yaml", context=4)
    assert {c.layout.cp for c in plan_candidates(pinned, cluster, "bf16")} == {4}
    assert resolve_auto(pinned, 16, cluster, ASSUMED_GPU)[0].parallel.context == 4
    short, note = resolve_auto(_auto("configs/llama_7b.yaml", context="auto"), 16, cluster, ASSUMED_GPU)
    assert short.parallel.context == 1 and ", context 1 (planner:" in note
    model = load_config(REPO / "configs/llama3_8b_128k.yaml").model
    full = sum(c.act_bytes for c in item_costs(model, 8, 1, 2, "selective", True))
    for cp in (2, 4, 8):
        cut = sum(c.act_bytes for c in item_costs(model, 8, 1, 2, "selective", True, context=cp))
        assert cut == pytest.approx(full / cp, rel=0.01), cp


def estimate_fits(cfg, cluster, candidate) -> bool:
    from launcher.planning.auto import workload
    from parallel.planner import estimate

    return estimate(workload(cfg, "bf16"), cluster, candidate).fits


def test_auto_resolves_at_launch_and_trains(tmp_path):
    """Two CPU processes with every auto key: the launch prints the planner's choice, trains
    with it, and logs that layout."""
    from launch import torchrun_cmd

    run = tmp_path / "run"
    result = subprocess.run([*torchrun_cmd(2), "parallel.tensor=auto", "parallel.pipeline=auto",
                             "parallel.micro_batch=auto", "parallel.activation_checkpointing=auto",
                             "parallel.global_batch=4", "model.layers=2", "train.steps=2", "train.eval_every=0",
                             "schedule.warmup_steps=1", "checkpoint.every=0", "train.log_every=1", f"run.dir={run}"],
                            cwd=WORKDIR, env=base_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    note = [line for line in result.stdout.splitlines() if line.startswith("auto       ")]
    assert len(note) == 1, result.stdout
    chosen = note[0].split("-> ")[1]
    tp, pp, mb = (int(chosen.split(f"{key} ")[1].split(",")[0]) for key in ("tensor", "pipeline", "micro_batch"))
    assert "memory     est." in result.stdout
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    saved = yaml.safe_load((run / "config.yaml").read_text())["parallel"]
    assert (saved["tensor"], saved["pipeline"], saved["micro_batch"]) == (tp, pp, mb)
    assert saved["activation_checkpointing"] == "none"  # a tiny model fits without recomputation


# --------------------------------------------------------------------------------------
# zero.offload_optimizer: a layout the planner ranks, run for real
# --------------------------------------------------------------------------------------


def test_optimizer_offload_trains_saves_and_resumes_like_the_device_optimizer(tmp_path):
    """tp 1 x pp 2 x dp 1 ZeRO 1 and dp 2 ZeRO 2, two processes: with the optimizer in host
    memory the losses equal the device optimizer's bit for bit, and a run resumed from its
    step-2 checkpoint repeats steps 3-4."""
    from launch import losses, torchrun_cmd, train

    common = ["parallel.tensor=1", "model.layers=2", "parallel.global_batch=4", "parallel.micro_batch=1",
              "train.steps=4", "train.eval_every=0", "schedule.warmup_steps=1", "train.log_every=1"]
    # at dp 1 the device run would skip ZeRO 1 (launcher/planning/effective.py); a
    # zero_optimization block keeps it, so both runs take ZeRO's optimizer path
    keep_zero = "deepspeed.zero_optimization.reduce_bucket_size=500000000"
    for layout in (["parallel.pipeline=2", "zero.stage=1", keep_zero], ["parallel.pipeline=1", "zero.stage=2"]):
        name = layout[1].replace("=", "")
        device = train(torchrun_cmd(2), tmp_path / f"{name}-device", *common, *layout, "checkpoint.every=0")
        host = train(torchrun_cmd(2), tmp_path / f"{name}-host", *common, *layout, "zero.offload_optimizer=true",
                     "checkpoint.every=2")
        assert losses(host) == losses(device), name
    step2 = tmp_path / "zero.stage2-host/checkpoints/step-00000002"
    resumed = train(torchrun_cmd(2), tmp_path / "resumed", *common, "parallel.pipeline=1", "zero.stage=2",
                    "zero.offload_optimizer=true", f"checkpoint.resume={step2}")
    assert losses(resumed) == losses(host)[2:]


def test_offload_is_refused_without_zero():
    result = subprocess.run([*python_cmd(), "--dry-run", "zero.stage=0", "zero.offload_optimizer=true"], cwd=WORKDIR,
                            env=base_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("config error: zero.offload_optimizer: needs zero.stage")


def test_plan_command_shows_the_closest_layout_when_nothing_fits(capsys):
    """Llama-2-70B on one node with its ZeRO 1: no layout fits without optimizer offload. The
    plan says so in one line, shows the one that needs the least memory with its breakdown
    (exit 0: planning is the point), and lists the layouts that fit with offload. A global
    batch no data degree divides is one line naming the key (exit 2)."""
    assert plan_main(["--config", "configs/llama_70b.yaml", "--nodes", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert not report["layout"]["fits"] and report["smallest_world"] == 32
    auto = report["auto"]  # data, not a console line: the closest layout, and what makes one fit
    assert not auto["fits"] and auto["peak_gib"] == pytest.approx(report["layout"]["peak_gib"])
    assert auto["keys"] == {"parallel.tensor": report["layout"]["tp"], "parallel.pipeline": report["layout"]["pp"],
                            "parallel.micro_batch": report["layout"]["micro_batch"],
                            "parallel.activation_checkpointing": report["layout"]["recompute"]}
    assert auto["fits_only_with"] == "zero.offload_optimizer=true" and auto["fitting_with_it"] == report["fitting"]
    assert report["ranked"] and all(r["offload"] for r in report["ranked"])
    assert plan_main(["--config", "configs/llama_70b.yaml", "--nodes", "1"]) == 0
    text = capsys.readouterr().out
    assert [line for line in text.splitlines() if line.startswith("auto ")] == [
        "auto       fits only with optimizer offload (zero.offload_optimizer=true): no layout of 8 ranks with "
        "zero.stage=1 fits 79.6 GiB per device (H100-SXM5-80GB; the smallest needs 162.7 GiB per rank); "
        f"{report['fitting']} layouts fit with it (listed below); shown: the layout of ZeRO 1 needing the least memory"]
    assert f"layouts that fit: {report['fitting']} of" in text
    assert plan_main(["--config", "configs/llama_13b.yaml", "--nodes", "5000", "--gpus-per-node", "20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: parallel.global_batch: auto: no tp x pp x dp of 100000 ranks")
    assert err.count("\n") == 1


def test_dry_run_plans_for_the_gpu_named():
    """--gpu h200: the 70B config's smallest world and layout are planned for 141 GB parts."""
    result = subprocess.run([*python_cmd(), "--config", "configs/llama_70b.yaml", "--dry-run", "--gpu", "h200"],
                            cwd=WORKDIR, env=base_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(dry run for 16 ranks" in result.stdout and "on H200-SXM-141GB" in result.stdout
