"""A fast default and a first step in seconds: `sequence_parallel: auto` decided for the device,
fp32 ZeRO 1/2 skipped at dp 1 (and its checkpoints still resume on other data degrees), no C++ build
at start, step 1 logged, a step bar on a terminal, DeepSpeed's memory reports quiet unless
logging.level=debug (launcher/planning/effective.py, launcher/ds/seams.py, launcher/metrics)."""

import io
import os
import select

import pytest
from launch import python_cmd, read_events, read_metrics, run_cli, torchrun_cmd, train

from launcher.cli import DEFAULT_CONFIG
from launcher.config.load import load_config
from launcher.metrics.progress import step_bar
from launcher.planning.effective import effective_settings
from launcher.planning.precision import ASSUMED_GPU, DeviceSupport
from parallel.hardware import CPU
from parallel.planner import Cluster

CPU_SUPPORT = DeviceSupport(name="cpu", is_gpu=False, bf16=True, fp16=False)
ROOMY = Cluster(1, 8, CPU.with_memory(100.0))


def _effective(overrides, world=8, device=CPU_SUPPORT, cluster=ROOMY):
    return effective_settings(load_config(str(DEFAULT_CONFIG), overrides), world, cluster, device)


def test_sequence_parallel_auto_is_on_with_nccl_and_off_with_gloo_unless_needed_to_fit():
    gpu, note = _effective([], device=ASSUMED_GPU)
    assert gpu.parallel.sequence_parallel is True and "-> on (NCCL" in note
    cpu, note = _effective([])
    assert cpu.parallel.sequence_parallel is False and "-> off (gloo" in note
    # seq 1024 x micro 8 at tp 2 on CPU: the planner puts a rank at 0.656 GiB without sequence
    # parallelism and 0.624 GiB with it; a 0.64 GiB device fits only the second
    long = ["model.seq_len=1024", "parallel.micro_batch=8", "parallel.global_batch=16"]
    tight, note = _effective(long, cluster=Cluster(1, 8, CPU.with_memory(0.64)))
    assert tight.parallel.sequence_parallel is True and "fits only with it" in note
    roomy, _ = _effective(long)
    assert roomy.parallel.sequence_parallel is False
    for given in (True, False):  # what the user wrote stands
        cfg, note = _effective([f"parallel.sequence_parallel={str(given).lower()}"])
        assert cfg.parallel.sequence_parallel is given and "sequence_parallel" not in note
    single, note = _effective(["parallel.tensor=1", "parallel.pipeline=1"], world=1, device=ASSUMED_GPU)
    assert single.parallel.sequence_parallel is False and "sequence_parallel" not in note


@pytest.mark.parametrize("overrides, world, device, skipped", [
    (["parallel.tensor=1", "parallel.pipeline=1"], 1, CPU_SUPPORT, True),  # fp32
    (["parallel.tensor=1", "parallel.pipeline=1", "zero.stage=2"], 1, CPU_SUPPORT, True),  # fp32 ZeRO 2
    (["parallel.tensor=1", "parallel.pipeline=2"], 2, CPU_SUPPORT, True),  # fp32 under a pipeline
    # bf16: DeepSpeed's bf16 optimizer either way (at ZeRO 0 it cannot load its pipeline checkpoint)
    (["parallel.tensor=1", "parallel.pipeline=2"], 2, ASSUMED_GPU, False),
    (["parallel.tensor=1", "parallel.pipeline=1"], 1, ASSUMED_GPU, False),
    (["parallel.tensor=1", "parallel.pipeline=1", "zero.stage=3"], 1, CPU_SUPPORT, False),  # another format
    (["parallel.tensor=1", "parallel.pipeline=1"], 2, CPU_SUPPORT, False),  # dp 2: something to shard
    (["parallel.tensor=1", "parallel.pipeline=1", "zero.offload_optimizer=true"], 1, CPU_SUPPORT, False),
    (["parallel.tensor=1", "parallel.pipeline=1", "deepspeed.zero_optimization.reduce_bucket_size=1000000"], 1,
     CPU_SUPPORT, False),
], ids=["fp32", "fp32-zero2", "fp32-pipeline", "bf16-pipeline", "bf16-no-pipeline", "zero3", "dp2", "offload",
        "deepspeed-block"])
def test_zero_is_skipped_at_dp1_where_it_does_no_job(overrides, world, device, skipped):
    cfg, note = _effective(overrides, world=world, device=device)
    given = load_config(str(DEFAULT_CONFIG), overrides).zero.stage
    assert cfg.zero.stage == (0 if skipped else given)
    assert (f"zero       stage {given} skipped at dp 1" in note) == skipped


def test_dry_run_and_print_config_show_the_resolved_values(capsys):
    from launcher.train import main

    assert main(["--dry-run", "--world-size", "2", "parallel.tensor=1", "parallel.pipeline=2",
                 "precision.dtype=fp32"]) == 0
    out = capsys.readouterr().out
    assert "zero       stage 1 skipped at dp 1" in out and "ZeRO 0" in out
    assert main(["--dry-run", "--world-size", "2", "parallel.tensor=1", "parallel.pipeline=2"]) == 0
    out = capsys.readouterr().out  # the dry run assumes a GPU: bf16, ZeRO kept
    assert "skipped at dp 1" not in out and "ZeRO 1" in out
    assert main(["--dry-run", "--world-size", "8"]) == 0
    assert "parallel.sequence_parallel -> on (NCCL" in capsys.readouterr().out
    assert main(["--print-config", "--world-size", "8"]) == 0  # decided as the dry run decides it
    assert "  sequence_parallel: true\n" in capsys.readouterr().out


def test_step_bar_only_on_a_terminal_and_lines_print_above_it(capsys):
    assert step_bar(10, 0, is_writer=True, stream=io.StringIO()) is None  # a log file: no bar
    primary, secondary = os.openpty()
    with open(secondary, "w") as terminal:
        assert step_bar(10, 0, is_writer=False, stream=terminal) is None  # not rank 0
        bar = step_bar(10, 3, is_writer=True, stream=terminal)
        bar.advance()
        bar.print_above("step 4/10 | loss 1.0")
        bar.close()
        terminal.flush()
        drawn = b""
        while select.select([primary], [], [], 1)[0]:  # a pty hands its output over in pieces
            drawn += os.read(primary, 4096)
        drawn = drawn.decode()
    os.close(primary)
    assert "train" in drawn and "4/10" in drawn
    assert capsys.readouterr().out == "step 4/10 | loss 1.0\n"


@pytest.fixture(scope="module")
def bf16_pipeline(tmp_path_factory):
    """tp 1 x pp 2 x dp 1 bf16 with default logging (log_every 10) for 3 steps, on a fresh
    torch extensions directory (a fresh install)."""
    root = tmp_path_factory.mktemp("bf16_pp2")
    extensions = root / "torch_extensions"
    extensions.mkdir()
    from launch import base_env

    result = run_cli(torchrun_cmd(2), root / "run", "parallel.tensor=1", "parallel.pipeline=2", "precision.dtype=bf16",
                     "train.steps=3", "schedule.warmup_steps=1", "train.eval_every=0", "checkpoint.every=0",
                     env=base_env(TORCH_EXTENSIONS_DIR=str(extensions)))
    return result, root


def test_no_cpp_build_at_start_and_step_one_is_logged(bf16_pipeline):
    result, root = bf16_pipeline
    assert list((root / "torch_extensions").iterdir()) == []  # DeepSpeed's shm comm op was not built
    assert "built successfully" not in result.stdout
    assert [m["step"] for m in read_metrics(root / "run")] == [1, 3]  # the first step, then the last
    assert any(line.startswith("step 1/3 | loss") for line in result.stdout.splitlines())
    assert "skipped at dp 1" not in result.stdout and "ZeRO 1" in result.stdout  # bf16 keeps ZeRO


def test_deepspeed_memory_reports_are_quiet_unless_debug(bf16_pipeline, tmp_path):
    result, _ = bf16_pipeline
    assert "CPU Virtual Memory" not in result.stdout and "bf16_optimizer" not in result.stdout
    # one process, bf16 with ZeRO 1 (kept: its bf16 optimizer is the one that prints)
    debug = run_cli(python_cmd(), tmp_path, "parallel.tensor=1", "parallel.pipeline=1", "precision.dtype=bf16",
                    "train.steps=1", "schedule.warmup_steps=0", "train.eval_every=0", "checkpoint.every=0",
                    "logging.level=debug")
    assert debug.stdout.count("CPU Virtual Memory") >= 4


def test_zero1_at_dp1_checkpoint_resumes_on_dp2_and_back(tmp_path):
    """One process with zero.stage=1 runs as ZeRO 0 and checkpoints at step 2; two processes
    (dp 2, ZeRO 1) resume it and checkpoint at step 4; one process resumes that: each resume is
    resharded and the losses continue the uninterrupted one-process run."""
    args = ["parallel.tensor=1", "parallel.pipeline=1", "zero.stage=1", "precision.dtype=fp32", "train.log_every=1",
            "train.eval_every=0", "schedule.warmup_steps=1", "parallel.global_batch=8", "parallel.micro_batch=2"]
    whole = {m["step"]: m["loss"] for m in train(python_cmd(), tmp_path / "whole", *args, "train.steps=6",
                                                  "checkpoint.every=2", "checkpoint.keep_last=3")}
    dp2 = train(torchrun_cmd(2), tmp_path / "dp2", *args, "train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=3",
                f"checkpoint.resume={tmp_path / 'whole/checkpoints/step-00000002'}")
    back = train(python_cmd(), tmp_path / "back", *args, "train.steps=6", "checkpoint.every=0",
                 f"checkpoint.resume={tmp_path / 'dp2/checkpoints/step-00000004'}")
    for run, metrics, steps in (("dp2", dp2, [3, 4, 5, 6]), ("back", back, [5, 6])):
        resume = read_events(tmp_path / run, "resume")[0]
        assert resume["resharded"] and [m["step"] for m in metrics] == steps
        assert max(abs(m["loss"] - whole[m["step"]]) for m in metrics) < 1e-5, (run, metrics, whole)
