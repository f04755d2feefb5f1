"""Rank discovery for torchrun, srun and mpirun environments (pure parsing)."""

import pytest

from launcher.launch_env import discover, first_slurm_host, slurm_port


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
