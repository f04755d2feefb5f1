"""Rank discovery for torchrun, srun and mpirun environments (pure parsing)."""

import os

import pytest

from launcher.errors import ConfigError
from launcher.training.launch_env import (
    device_index,
    discover,
    export_env,
    first_slurm_host,
    pick_device,
    slurm_port,
    slurm_tasks_on_node,
)


@pytest.mark.parametrize("nodelist,first", [
    ("node1", "node1"), ("node[1-2]", "node1"), ("gpu[003-010,012],login1", "gpu003"),
    ("a1,b[01-02]", "a1"), ("localhost", "localhost"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_torchrun_env_wins_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}
    p = discover(env)
    assert (p.rank, p.world_size, p.local_rank, p.master_addr, p.master_port, p.launcher) == (3, 8, 1, "n1", 1234, "torchrun")


def test_srun_task_env():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "99",
           "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[07-10]", "SLURM_JOB_ID": "4242"}
    p = discover(env)
    assert (p.rank, p.world_size, p.local_rank, p.master_addr, p.launcher) == (5, 16, 1, "gpu07", "slurm")
    assert p.master_port == slurm_port("4242")
    assert discover({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "999"}).master_addr == "10.0.0.1"


def test_sbatch_script_without_srun_is_a_single_process():
    """In the batch script itself (no srun step) Slurm sets SLURM_PROCID and SLURM_NTASKS too."""
    p = discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"})
    assert (p.rank, p.world_size, p.launcher) == (0, 1, "single")


def test_open_mpi_env_with_master_given():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
           "MASTER_ADDR": "h0", "MASTER_PORT": "5555"}
    p = discover(env)
    assert (p.rank, p.world_size, p.local_rank, p.master_addr, p.master_port, p.launcher) == (2, 4, 2, "h0", 5555, "mpi")


# --------------------------------------------------------------------------------------
# Which GPU: device_index(local rank, ranks on this node, visible devices)
# --------------------------------------------------------------------------------------


def _device(env: dict, visible: int) -> int:
    p = discover(env)
    return device_index(p.local_rank, p.local_world_size, visible, env.get("CUDA_VISIBLE_DEVICES"))


SRUN = {"SLURM_PROCID": "11", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "3",
        "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "7",
        "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_TASKS_PER_NODE": "8(x2)"}


def test_torchrun_eight_local_ranks_on_eight_gpus():
    for local in range(8):
        env = {"RANK": str(8 + local), "WORLD_SIZE": "16", "LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": "8"}
        assert discover(env).local_world_size == 8
        assert _device(env, 8) == local


def test_srun_gpus_per_task_is_always_device_0():
    """srun --gpus-per-task=1: each task sees its own GPU as device 0; SLURM_LOCALID says 3."""
    assert discover(SRUN).local_world_size == 8
    assert _device({**SRUN, "CUDA_VISIBLE_DEVICES": "3"}, 1) == 0


def test_srun_gpus_per_node_is_the_local_id():
    assert _device({**SRUN, "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, 8) == 3


def test_mpirun_uses_the_open_mpi_local_rank():
    env = {"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "MASTER_ADDR": "h0", "MASTER_PORT": "5555"}
    assert discover(env).local_world_size == 4
    assert _device(env, 4) == 2
    assert _device(env, 1) == 0  # a per-rank mask (a wrapper setting CUDA_VISIBLE_DEVICES)


def test_fewer_gpus_than_local_ranks_is_refused_on_every_rank():
    """Not `local_rank % count`: that would put two ranks on one GPU."""
    for local in (1, 5):  # the rank that would fit is refused too: the node's ranks fail alike
        env = {"RANK": str(local), "WORLD_SIZE": "8", "LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": "8",
               "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
        with pytest.raises(ConfigError) as err:
            _device(env, 4)
        assert err.value.key == "CUDA_VISIBLE_DEVICES"
        assert f"local rank {local} of 8 on this node but only 4 GPUs visible (CUDA_VISIBLE_DEVICES=0,1,2,3)" \
            in str(err.value)
        assert "--nproc_per_node 4" in str(err.value)
    with pytest.raises(ConfigError, match="local rank 4 on this node but only 4 GPUs"):
        device_index(4, None, 4)  # local world size unknown: the local rank alone decides
    assert device_index(3, None, 4) == 3
    with pytest.raises(ConfigError, match="no GPU visible"):
        device_index(0, 1, 0)


@pytest.mark.parametrize("text,node,count", [
    ("8", 0, 8), ("8(x2)", 1, 8), ("4(x2),3", 2, 3), ("2,1(x3)", 3, 1), ("2(x2)", 2, None), ("bad", 0, None),
    ("8(x2)", None, 8), ("4(x2),3", None, None),  # SLURM_NODEID unset: only a uniform count says
])
def test_slurm_tasks_per_node(text, node, count):
    assert slurm_tasks_on_node(text, node) == count


def test_slurm_local_world_size_sources():
    base = {k: v for k, v in SRUN.items() if not k.endswith("TASKS_PER_NODE")}
    assert discover(base).local_world_size is None
    assert discover({**base, "SLURM_NTASKS_PER_NODE": "4"}).local_world_size == 4
    assert discover({**base, "SLURM_TASKS_PER_NODE": "6,2", "SLURM_NTASKS_PER_NODE": "4"}).local_world_size == 2
    assert discover({**base, "SLURM_STEP_TASKS_PER_NODE": "3(x2)", "SLURM_TASKS_PER_NODE": "6,2"}).local_world_size == 3
    assert discover({"MASTER_PORT": "1"}).local_world_size == 1  # plain python


def test_export_env_publishes_local_world_size(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "0")  # monkeypatch restores them afterwards
    export_env(discover(SRUN))
    assert os.environ["LOCAL_WORLD_SIZE"] == "8" and os.environ["LOCAL_RANK"] == "3"


def test_export_env_gives_deepspeed_the_device_index_as_local_rank(monkeypatch):
    """srun --gpus-per-task=1: SLURM_LOCALID 3 sees one GPU, index 0. DeepSpeed reads
    $LOCAL_RANK as a device index (engine, PipelineModule.to, ZeRO 3 Init): it must say 0,
    while the launcher keeps the node-local rank 3 for itself."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "0")
    penv = discover(SRUN)
    index = device_index(penv.local_rank, penv.local_world_size, visible_devices=1)
    export_env(penv, index)
    assert (penv.local_rank, index, os.environ["LOCAL_RANK"]) == (3, 0, "0")


def test_pick_device_uses_device_index(monkeypatch):
    """pick_device feeds torch's device count to device_index and makes that device current
    (torch.cuda faked: this runs without a GPU)."""
    import torch

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    device, backend = pick_device(3, 8)  # srun --gpus-per-task=1
    assert (str(device), device.index, backend, current) == ("cuda:0", 0, "nccl", [0])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert pick_device(3, 8)[0].index == 3 and current[-1] == 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # as torchrun / export_env set it
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(ConfigError, match=r"local rank 1 of 8 .* 4 GPUs visible \(CUDA_VISIBLE_DEVICES=0,1,2,3\)"):
        pick_device(1)
