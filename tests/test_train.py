"""Every layout computes what the single process computes: real multi-process runs of the
command line (torchrun, mpirun, srun-style), compared step by step in fp32."""

import subprocess
import sys

import pytest
from launch import (
    SHORT,
    base_env,
    losses,
    mpirun_cmd,
    python_cmd,
    read_metrics,
    torchrun_cmd,
    train,
)
from launch import WORKDIR  # noqa: E402

SINGLE = ["parallel.tensor=1", "parallel.pipeline=1", "zero.stage=0"]


def assert_close(got, expected, tol):
    assert len(got) == len(expected) == 5
    for step, (a, b) in enumerate(zip(got, expected), 1):
        assert abs(a - b) <= tol, f"step {step}: {a} vs {b} (tolerance {tol})\n{got}\n{expected}"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one plain process, `python -m launcher.train parallel.tensor=1 parallel.pipeline=1`."""
    metrics = train(python_cmd(), tmp_path_factory.mktemp("single"), *SHORT, *SINGLE)
    assert metrics[0]["world_size"] == 1
    assert metrics[0]["loss"] == pytest.approx(5.55, abs=0.1)  # ln(256): the byte model starts uniform
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5
    return metrics


@pytest.mark.parametrize("pp", [2, 4])
def test_pipeline_matches_single_process(single, tmp_path, pp):
    metrics = train(torchrun_cmd(pp), tmp_path, *SHORT, "parallel.tensor=1", f"parallel.pipeline={pp}", "zero.stage=0")
    assert metrics[0]["world_size"] == pp
    assert_close(losses(metrics), losses(single), 1e-5)


def test_readme_main_command_3d_matches_single_process(single, tmp_path):
    """`torchrun --nproc_per_node 8 -m launcher.train`: tp 2 x pp 2 x dp 2, ZeRO 1 (fewer steps)."""
    result = subprocess.run([*torchrun_cmd(8), *SHORT, f"run.dir={tmp_path}"], cwd=WORKDIR, env=base_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "world 8 = tp 2 x pp 2 x dp 2" in result.stdout
    assert "stage  items" in result.stdout and "ZeRO 1" in result.stdout
    # auto is off on gloo, where it is slower (launcher/planning/effective.py); on with NCCL
    assert "parallel.sequence_parallel -> off (gloo" in result.stdout and "sequence parallel off" in result.stdout
    assert "done: 5 steps" in result.stdout
    metrics = read_metrics(tmp_path)
    assert metrics[0]["world_size"] == 8
    assert_close(losses(metrics), losses(single), 1e-5)
    for ours, ref in zip(metrics, single):  # clipping is active (norm > 1), so the norm must agree too
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
        assert ours["tokens_seen"] == ref["tokens_seen"]
    assert (tmp_path / "config.yaml").exists()


def test_four_processes_data_one(single, tmp_path):
    metrics = train(torchrun_cmd(4), tmp_path, *SHORT)
    assert metrics[0]["world_size"] == 4
    assert_close(losses(metrics), losses(single), 1e-4)


@pytest.fixture(scope="module")
def zero0_dp2(tmp_path_factory):
    return train(torchrun_cmd(2), tmp_path_factory.mktemp("zero0"), *SHORT, *SINGLE)


def test_data_parallel_matches_single_process(single, zero0_dp2):
    assert zero0_dp2[0]["world_size"] == 2
    assert_close(losses(zero0_dp2), losses(single), 1e-5)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_zero0(zero0_dp2, tmp_path, stage):
    metrics = train(torchrun_cmd(2), tmp_path, *SHORT, "parallel.tensor=1", "parallel.pipeline=1", f"zero.stage={stage}")
    assert_close(losses(metrics), losses(zero0_dp2), 1e-5)


def test_torchrun_multi_node_c10d_rendezvous(single, tmp_path):
    """Two torchrun agents (as on two nodes) meet through a c10d rendezvous: world 2, pp 2."""
    from distributed import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "c10dtest", "-m", "launcher.train",
           *SHORT, "parallel.tensor=1", "parallel.pipeline=2", "zero.stage=0", f"run.dir={tmp_path}"]
    agents = [subprocess.Popen(cmd, cwd=WORKDIR, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
    outputs = [a.communicate(timeout=600) for a in agents]
    assert all(a.returncode == 0 for a in agents), outputs[0][1][-3000:] + outputs[1][1][-3000:]
    metrics = read_metrics(tmp_path)
    assert metrics[0]["world_size"] == 2
    assert_close(losses(metrics), losses(single), 1e-5)


def test_mpirun_launch(single, tmp_path):
    metrics = train(mpirun_cmd(2), tmp_path, *SHORT, "parallel.tensor=2", "parallel.pipeline=1")
    assert metrics[0]["world_size"] == 2
    assert_close(losses(metrics), losses(single), 1e-5)


def test_srun_style_environment(single, tmp_path):
    """One process per task with only Slurm's variables, as `srun --ntasks 2 python -m launcher.train` gives."""
    procs = []
    for rank in range(2):
        env = base_env(SLURM_JOB_ID="31337", SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                       SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="localhost",
                       SLURM_JOB_NODELIST="localhost")
        procs.append(subprocess.Popen([*python_cmd(), *SHORT, "parallel.tensor=1", "parallel.pipeline=2",
                                       f"run.dir={tmp_path}"], cwd=WORKDIR, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert "launch     slurm: rank 0 of 2, master localhost:" in outputs[0][0]
    assert_close(losses(read_metrics(tmp_path)), losses(single), 1e-5)


def test_recomputation_and_compiled_blocks_change_nothing(single, tmp_path):
    """Selective recomputation with compiled blocks on one process; full recomputation (the
    old `true` spelling) with compiled blocks inside DeepSpeed's pipeline engine, tensor
    parallel with sequence parallelism (tp 2 x pp 2)."""
    plain = train(python_cmd(), tmp_path / "pp1", *SHORT, *SINGLE, "parallel.activation_checkpointing=selective",
                  "model.compile=true")
    assert_close(losses(plain), losses(single), 1e-5)
    piped = train(torchrun_cmd(4), tmp_path / "tp2pp2", *SHORT, "parallel.tensor=2", "parallel.pipeline=2",
                  "zero.stage=0", "parallel.activation_checkpointing=true", "model.compile=true")
    assert_close(losses(piped), losses(single), 1e-5)


def test_tied_embeddings_across_stages_match_single_process(tmp_path):
    """The tie crosses stages (embed on stage 0, head on stage 1): DeepSpeed's TiedLayerSpec
    all-reduces the two copies' gradients; the norm counts the weight once."""
    tied = ["model.tie_embeddings=true", "parallel.tensor=1", "zero.stage=0"]
    reference = train(python_cmd(), tmp_path / "single", *SHORT, *tied, "parallel.pipeline=1")
    piped = train(torchrun_cmd(2), tmp_path / "pp2", *SHORT, *tied, "parallel.pipeline=2")
    assert_close(losses(piped), losses(reference), 1e-5)
    for a, b in zip(piped, reference):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("overrides", [["optimizer.name=lion", "optimizer.lr=3e-4"], ["precision.dtype=bf16", "zero.stage=1"],
                                       ["model.tie_embeddings=true"]],
                         ids=["lion", "bf16", "tied"])  # fp16 (where the CPU has it): tests/test_precision.py
def test_variants_train(tmp_path, overrides):
    metrics = train(python_cmd(), tmp_path, "train.steps=12", "train.log_every=1", "train.eval_every=6",
                    "parallel.global_batch=4", *SINGLE, *overrides)
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5, losses(metrics)
    assert "val_loss" in metrics[5] and "val_loss" in metrics[-1]


def test_deepspeed_block_passes_through_and_rejects_contradictions(tmp_path):
    result = subprocess.run([*python_cmd(), *SINGLE, "deepspeed.zero_optimization.stage=3"], cwd=WORKDIR,
                            env=base_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("config error: deepspeed.zero_optimization.stage: 3 contradicts the value "
                                     "generated from the config (0); set it through the launcher's own keys")
    metrics = train(python_cmd(), tmp_path, "train.steps=2", "schedule.warmup_steps=2", "train.log_every=1", "train.eval_every=0", *SINGLE,
                    "deepspeed.zero_optimization.stage=0", "deepspeed.memory_breakdown=false")
    assert len(metrics) == 2
