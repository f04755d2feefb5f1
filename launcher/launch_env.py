"""Who am I? Rank discovery for every way the launcher is started, in one place.

    torchrun            RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (set by torchrun)
    srun (1 task/GPU)   SLURM_PROCID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS), SLURM_LOCALID; master =
                        first host of the step's node list, port derived from the job id
    mpirun (Open MPI)   OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK; master address and port
                        chosen by rank 0 and broadcast with mpi4py
    plain python        rank 0 of 1 on 127.0.0.1

torchrun wins when present (`srun torchrun ...` sets both). MASTER_ADDR / MASTER_PORT from
the environment always override the derived ones. `export_env` writes the result back as
the torchrun-style variables that torch.distributed's env:// init reads.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class ProcessEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | mpi | single


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[003-010,12],login1' -> 'gpu003'.
    (What `scontrol show hostnames | head -1` prints, without needing scontrol on the node.)"""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse Slurm node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def slurm_port(job_id: str) -> int:
    """A port every task of a job agrees on, different for concurrent jobs on one node."""
    return 20000 + int(job_id) % 20000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mpi_master() -> tuple[str, int]:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    mine = (socket.gethostname(), _free_port()) if comm.Get_rank() == 0 else None
    return comm.bcast(mine, root=0)


def discover(env: Mapping[str, str] = os.environ) -> ProcessEnv:
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or an explicit env:// setup)
        return ProcessEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                          env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "OMPI_COMM_WORLD_RANK" in env:
        rank, size = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0))
        if "MASTER_ADDR" in env and "MASTER_PORT" in env:
            addr, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
        else:
            addr, port = _mpi_master() if size > 1 else ("127.0.0.1", _free_port())
        return ProcessEnv(rank, size, local, addr, port, "mpi")
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # a task of an srun step
        size = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", 1)))
        nodelist = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        addr = env.get("MASTER_ADDR") or first_slurm_host(nodelist)
        port = int(env.get("MASTER_PORT") or slurm_port(env.get("SLURM_JOB_ID", "0")))
        return ProcessEnv(int(env["SLURM_PROCID"]), size, int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm")
    return ProcessEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT") or _free_port()), "single")


def export_env(penv: ProcessEnv) -> None:
    """Publish the discovered values as the variables torch.distributed and DeepSpeed read."""
    os.environ.update(RANK=str(penv.rank), WORLD_SIZE=str(penv.world_size), LOCAL_RANK=str(penv.local_rank),
                      MASTER_ADDR=penv.master_addr, MASTER_PORT=str(penv.master_port))
