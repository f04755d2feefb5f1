"""MoE models trained by the real command line (fp32, dropless): pipeline x data parallel with
ZeRO 1 gives the single process's per-step losses, the balancing state (the aux loss's
gradient, the bias and its updates) included, and a checkpoint resumes on another layout."""

import subprocess
import sys

import pytest
import torch
from launch import WORKDIR, base_env, losses, python_cmd, read_events, read_metrics, run_cli, torchrun_cmd, train

# A small MoE: the first layer dense, two MoE layers (4 experts, top 2, one shared expert);
# 4 heads, so that tensor 4 (expert degree 4) divides them.
MOE = ["model.layers=3", "model.hidden=32", "model.heads=4", "model.kv_heads=4", "model.ffn=64", "model.seq_len=32",
       "model.moe.experts=4", "model.moe.top_k=2", "model.moe.ffn=16", "model.moe.shared_experts=1",
       "model.moe.first_dense=1", "parallel.global_batch=4", "parallel.micro_batch=1",
       "precision.dtype=fp32", "train.eval_every=0", "train.log_every=1", "schedule.warmup_steps=2"]
BIAS = ["model.moe.router=sigmoid", "model.moe.balance=bias", "model.moe.bias_rate=0.01",
        "model.moe.capacity_factor=1.0"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, 6 steps: the reference."""
    run = tmp_path_factory.mktemp("moe_single")
    return train(python_cmd(), run, *MOE, "parallel.tensor=1", "parallel.pipeline=1", "train.steps=6",
                 "checkpoint.every=0")


@pytest.fixture(scope="module")
def pp2_dp2(tmp_path_factory):
    """tensor 2 (each tp rank routes half the tokens) x pipeline 2 x data 2 with ZeRO 1, 6
    steps, checkpoints at steps 3 and 6."""
    run = tmp_path_factory.mktemp("moe_tp2pp2dp2")
    metrics = train(torchrun_cmd(8), run, *MOE, "train.steps=6", "parallel.tensor=2", "parallel.pipeline=2",
                    "parallel.expert=2", "zero.stage=1", "parallel.sequence_parallel=false", "checkpoint.every=3",
                    "checkpoint.keep_last=2")
    return run, metrics


def test_tensor_pipeline_data_zero1_match_single_process(single, pp2_dp2):
    _, metrics = pp2_dp2
    assert losses(metrics) == pytest.approx(losses(single), abs=1e-5)
    for got, expected in zip(metrics, single):  # the routing figures, summed over every rank
        for key in ("moe.1.load_max_over_mean", "moe.2.aux_loss", "moe.2.dropped_fraction"):
            assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    assert single[-1]["moe.1.load_max_over_mean"] >= 1.0


def test_report_draws_expert_load_per_layer(pp2_dp2, tmp_path):
    run, _ = pp2_dp2
    result = subprocess.run([sys.executable, "-m", "launcher.report", str(run), "--out", str(tmp_path / "report")],
                            cwd=WORKDIR, env=base_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "report" / "expert_load.png").stat().st_size > 0
    from launcher.metrics.plots import build_figures

    lines = build_figures([run])["expert_load.png"].axes[0].get_lines()
    assert {line.get_label() for line in lines} == {"layer 1", "layer 2"}
    assert all(min(line.get_ydata()) >= 1.0 for line in lines)


def test_resume_on_another_layout_continues_the_single_run(single, pp2_dp2, tmp_path):
    """tp 2 x pp 2 x dp 2 with ZeRO 1 at step 3 -> one process: steps 4-6 as the single run's."""
    saved, _ = pp2_dp2
    checkpoint = next((saved / "checkpoints").glob("step-00000003"))
    resumed = tmp_path / "resumed"
    result = run_cli(python_cmd(), resumed, *MOE, "parallel.tensor=1", "parallel.pipeline=1", "train.steps=6",
                     "checkpoint.every=0", f"checkpoint.resume={checkpoint}")
    assert "resharded" in result.stdout + result.stderr
    metrics = read_metrics(resumed)
    assert [m["step"] for m in metrics] == [4, 5, 6]
    assert losses(metrics) == pytest.approx(losses(single)[3:], abs=1e-5)


def test_expert_degree_4_then_2_then_1_continue_the_single_run(single, tmp_path):
    """ep 4 (tensor 4: one expert per rank) trains as one process does; its step-2
    checkpoint resumes on ep 2 (tensor 2), whose step-4 checkpoint resumes on one process."""
    common = [*MOE, "parallel.pipeline=1", "train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=3"]
    ep4 = train(torchrun_cmd(4), tmp_path / "ep4", *common, "parallel.tensor=4")
    assert losses(ep4) == pytest.approx(losses(single), abs=1e-5)
    ep2 = train(torchrun_cmd(2), tmp_path / "ep2", *common, "parallel.tensor=2",
                f"checkpoint.resume={tmp_path / 'ep4/checkpoints/step-00000002'}")
    assert [m["step"] for m in ep2] == [3, 4, 5, 6]
    assert losses(ep2) == pytest.approx(losses(single)[2:], abs=1e-5)
    one = train(python_cmd(), tmp_path / "ep1", *common, "parallel.tensor=1",
                f"checkpoint.resume={tmp_path / 'ep2/checkpoints/step-00000004'}")
    assert [m["step"] for m in one] == [5, 6]
    assert losses(one) == pytest.approx(losses(single)[4:], abs=1e-5)
    for run, step in (("ep2", 2), ("ep1", 4)):
        assert [(e["step"], e["resharded"]) for e in read_events(tmp_path / run, "resume")] == [(step, True)]


def test_experts_over_data_ranks_match_the_single_run_and_reshard(single, tmp_path):
    """Expert parallelism drawn from the data ranks (parallel.expert > parallel.tensor): ep 4 x
    dp 4 at tensor 1 (ZeRO 2) gives the single process's losses, grad norms and routing
    figures; its step-2 checkpoint continues on ep 4 = tensor 2 x 2 data ranks (ZeRO 1),
    whose step-4 checkpoint continues on ep 2 x pipeline 2; the same step-2 checkpoint also
    continues on ep 2 x dp 4 (two ranks per expert: expert-data parallelism) with PowerSGD's
    exact reduction, whose step-4 checkpoint continues on one process. Every run repeats the
    single run's losses within 1e-5; the checkpoint reader gives the same full tensors from
    both step-4 checkpoints (experts over 4 and over 2 ranks)."""
    common = [*MOE, "train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=3"]

    def ckpt(run: str, step: int) -> str:
        return f"checkpoint.resume={tmp_path / run / 'checkpoints' / f'step-{step:08d}'}"

    ep4 = train(torchrun_cmd(4), tmp_path / "ep4", *common, "parallel.tensor=1", "parallel.pipeline=1",
                "parallel.expert=4", "zero.stage=2")
    assert losses(ep4) == pytest.approx(losses(single), abs=1e-5)
    for got, expected in zip(ep4, single):
        for key in ("grad_norm", "moe.1.load_max_over_mean", "moe.2.aux_loss"):
            assert got[key] == pytest.approx(expected[key], abs=1e-5), key
    runs = {
        "tp2_ep4": (torchrun_cmd(4), ["parallel.tensor=2", "parallel.pipeline=1", "parallel.expert=4",
                                      "parallel.sequence_parallel=false", "zero.stage=1", ckpt("ep4", 2)], 2),
        "pp2_ep2": (torchrun_cmd(4), ["parallel.tensor=1", "parallel.pipeline=2", "parallel.expert=2",
                                      "zero.stage=1", ckpt("tp2_ep4", 4)], 4),
        "dp4_ep2": (torchrun_cmd(4), ["parallel.tensor=1", "parallel.pipeline=1", "parallel.expert=2",
                                      "zero.stage=1", "compression.method=powersgd",
                                      "compression.warmup_steps=10", ckpt("ep4", 2)], 2),
        "one": (python_cmd(), ["parallel.tensor=1", "parallel.pipeline=1", ckpt("dp4_ep2", 4)], 4),
    }
    for name, (cmd, args, start) in runs.items():
        metrics = train(cmd, tmp_path / name, *common, *args)
        assert [m["step"] for m in metrics] == list(range(start + 1, 7)), name
        assert losses(metrics) == pytest.approx(losses(single)[start:], abs=1e-5), name
        assert [e["resharded"] for e in read_events(tmp_path / name, "resume")] == [True], name
    from launcher.checkpoint.reader import CheckpointReader
    from launcher.model.weights import weights

    four, two = (CheckpointReader(tmp_path / run / "checkpoints" / "step-00000004") for run in ("tp2_ep4", "dp4_ep2"))
    for ours, _ in weights(four.model):
        assert torch.allclose(four.tensor(ours), two.tensor(ours), atol=1e-4), ours


def test_bias_balancing_matches_across_pipeline_stages_and_resumes(tmp_path):
    """balance=bias with a capacity: the biases move from counts summed over all ranks,
    identically, and each tp rank's capacity counts the assignments of the positions before
    its own, so tp 2 with sequence parallelism x two stages (with full recomputation, whose
    replayed forward must not count twice) give one process's losses and drops; the biases
    are checkpointed: that layout at step 2 -> one process."""
    one = train(python_cmd(), tmp_path / "one", *MOE, *BIAS, "parallel.tensor=1", "parallel.pipeline=1",
                "train.steps=4", "checkpoint.every=0")
    two = train(torchrun_cmd(4), tmp_path / "two", *MOE, *BIAS, "train.steps=4", "parallel.tensor=2",
                "parallel.sequence_parallel=true", "parallel.pipeline=2", "checkpoint.every=2",
                "parallel.activation_checkpointing=full")
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    for got, expected in zip(two, one):
        for key in ("moe.2.bias_spread", "moe.1.dropped_fraction", "moe.2.dropped_fraction"):
            assert got[key] == pytest.approx(expected[key], abs=1e-7), key
    assert one[-1]["moe.2.bias_spread"] > 0 and max(m["moe.1.dropped_fraction"] for m in one) > 0
    checkpoint = tmp_path / "two" / "checkpoints" / "step-00000002"
    resumed = train(python_cmd(), tmp_path / "resumed", *MOE, *BIAS, "parallel.tensor=1", "parallel.pipeline=1",
                    "train.steps=4", "checkpoint.every=0", f"checkpoint.resume={checkpoint}")
    assert losses(resumed) == pytest.approx(losses(one)[2:], abs=1e-5)
    assert resumed[-1]["moe.2.bias_spread"] == pytest.approx(one[-1]["moe.2.bias_spread"], abs=1e-7)


def test_composes_with_powersgd_document_attention_and_async_checkpoints(tmp_path):
    """dp 2 with PowerSGD (compressing from step 2), document attention and async
    checkpoints: an MoE trains, and a resume from the step-2 checkpoint repeats steps 3-4 bit
    for bit (the PowerSGD error feedback, the balancing state and the sampler restored)."""
    args = [*MOE, "parallel.tensor=1", "parallel.pipeline=1", "parallel.expert=1", "train.steps=4",
            "compression.method=powersgd",
            "compression.warmup_steps=1", "data.document_attention=true", "checkpoint.async=true",
            "checkpoint.every=2"]
    whole = train(torchrun_cmd(2), tmp_path / "whole", *args)
    step2 = tmp_path / "whole" / "checkpoints" / "step-00000002"
    resumed = train(torchrun_cmd(2), tmp_path / "resumed", *args, f"checkpoint.resume={step2}")
    assert [m["step"] for m in resumed] == [3, 4]
    assert losses(resumed) == losses(whole)[2:]
    assert all(m["moe.1.load_max_over_mean"] >= 1.0 for m in whole)


def test_experts_over_data_ranks_compose_with_bf16_sequence_parallelism_and_resume_bit_exact(tmp_path):
    """ep 4 = tensor 2 x 2 data ranks with sequence parallelism, bf16 (where the CPU has it),
    selective recomputation, document attention, async checkpoints, bias balancing and a
    capacity factor: the loss falls, and a resume from the step-2 checkpoint repeats steps
    3-4 bit for bit (the biases restored)."""
    from launcher.planning.precision import detect_device_support

    dtype = "bf16" if detect_device_support().bf16 else "fp32"
    args = [*MOE, *BIAS, "parallel.tensor=2", "parallel.pipeline=1", "parallel.expert=4", "parallel.global_batch=8",
            "parallel.sequence_parallel=true", f"precision.dtype={dtype}", "parallel.activation_checkpointing=selective",
            "data.document_attention=true", "checkpoint.async=true", "checkpoint.every=2", "train.steps=4",
            "zero.stage=1"]
    whole = train(torchrun_cmd(4), tmp_path / "whole", *args)
    assert whole[-1]["loss"] < whole[0]["loss"]
    step2 = tmp_path / "whole" / "checkpoints" / "step-00000002"
    resumed = train(torchrun_cmd(4), tmp_path / "resumed", *args, f"checkpoint.resume={step2}")
    assert [m["step"] for m in resumed] == [3, 4]
    assert losses(resumed) == losses(whole)[2:]
    assert [m["moe.2.bias_spread"] for m in resumed] == [m["moe.2.bias_spread"] for m in whole[2:]]
    assert max(m["moe.1.dropped_fraction"] for m in whole) > 0


def test_experts_over_context_ranks_match_the_single_run_and_resume_on_other_context_degrees(single, tmp_path):
    """Context parallelism with MoE (fp32, aux-loss balancing): context 2 x data 2 with the
    experts over the two context ranks (parallel.expert=2), ZeRO 1 and selective
    recomputation, gives the single process's losses, grad norms and routing figures (the
    aux loss's statistics summed over the context ranks); its step-2 checkpoint continues on
    context 4 (experts over 4 ranks, ZeRO 2), whose step-4 checkpoint continues on one process."""
    common = [*MOE, "parallel.tensor=1", "parallel.pipeline=1", "train.steps=6", "checkpoint.every=2",
              "checkpoint.keep_last=3"]
    cp2 = train(torchrun_cmd(4), tmp_path / "cp2", *common, "parallel.context=2", "parallel.expert=2",
                "zero.stage=1", "parallel.activation_checkpointing=selective")
    assert losses(cp2) == pytest.approx(losses(single), abs=1e-5)
    for got, expected in zip(cp2, single):
        for key in ("grad_norm", "moe.1.load_max_over_mean", "moe.2.aux_loss"):
            assert got[key] == pytest.approx(expected[key], abs=1e-5), key
    runs = {"cp4": (torchrun_cmd(4), ["parallel.context=4", "parallel.expert=4", "zero.stage=2", "cp2"], 2),
            "one": (python_cmd(), ["cp4"], 4)}
    for name, (cmd, args, start) in runs.items():
        *layout, source = args
        step = tmp_path / source / "checkpoints" / f"step-{start:08d}"
        metrics = train(cmd, tmp_path / name, *common, *layout, f"checkpoint.resume={step}")
        assert [m["step"] for m in metrics] == list(range(start + 1, 7)), name
        assert losses(metrics) == pytest.approx(losses(single)[start:], abs=1e-5), name
        assert [e["resharded"] for e in read_events(tmp_path / name, "resume")] == [True], name
