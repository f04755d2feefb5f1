"""Who am I? Rank discovery for every way the launcher is started, in one place.

    torchrun            RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
                        (set by torchrun)
    srun (1 task/GPU)   SLURM_PROCID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS), SLURM_LOCALID, tasks on
                        this node from SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE /
                        SLURM_NTASKS_PER_NODE; master = first host of the step's node list, port
                        derived from the job id
    mpirun (Open MPI)   OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE; master address and
                        port chosen by rank 0 and broadcast with mpi4py
    plain python        rank 0 of 1 on 127.0.0.1

`device_index` then says which of the visible GPUs this process drives (pure arithmetic:
`pick_device` below feeds it torch's device count).

torchrun wins when present (`srun torchrun ...` sets both). MASTER_ADDR / MASTER_PORT from
the environment always override the derived ones. `export_env` writes the result back as
the torchrun-style variables that torch.distributed's env:// init reads.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from launcher.errors import ConfigError


@dataclass(frozen=True)
class ProcessEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | mpi | single
    local_world_size: Optional[int] = None  # ranks on this node; None where the launcher does not say


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


def slurm_tasks_on_node(tasks_per_node: str, node_id: Optional[int]) -> Optional[int]:
    """Tasks on node `node_id` from Slurm's compressed per-node counts: '4(x2),3', 2 -> 3.
    None when the string does not parse or has no such node; node_id None: the count when
    every node has the same, else None."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    if node_id is None:
        return counts[0] if len(set(counts)) == 1 else None
    return counts[node_id] if 0 <= node_id < len(counts) else None


def _slurm_local_world_size(env: Mapping[str, str]) -> Optional[int]:
    """Tasks of this srun step on this node: the step's per-node list, else the job's, else
    --ntasks-per-node (which Slurm exports only when it was given)."""
    node_id = _int_or_none(env.get("SLURM_NODEID"))
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(key):
            count = slurm_tasks_on_node(env[key], node_id)
            if count is not None:
                return count
    value = env.get("SLURM_NTASKS_PER_NODE", "")
    return int(value) if value.isdigit() else None


def _int_or_none(value: Optional[str]) -> Optional[int]:
    return int(value) if value is not None and value.strip().isdigit() else None


def slurm_port(job_id: str) -> int:
    """A port every task of a job agrees on, different for concurrent jobs on one node."""
    return 20000 + int(job_id) % 20000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mpi_master() -> tuple[str, int]:
    from mpi4py import MPI  # lazy: only under mpirun (importing it initialises MPI)

    comm = MPI.COMM_WORLD
    mine = (socket.gethostname(), _free_port()) if comm.Get_rank() == 0 else None
    return comm.bcast(mine, root=0)


def discover(env: Mapping[str, str] = os.environ) -> ProcessEnv:
    """Who this process is, from the launcher's variables; a variable that is not a number is
    a ConfigError naming it."""

    def num(key: str, default=None) -> int:
        value = env.get(key, default)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(key, f"expected an integer in the environment, got {value!r}") from None

    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or an explicit env:// setup)
        return ProcessEnv(num("RANK"), num("WORLD_SIZE"), num("LOCAL_RANK", 0), env.get("MASTER_ADDR", "127.0.0.1"),
                          num("MASTER_PORT", 29500), "torchrun", _int_or_none(env.get("LOCAL_WORLD_SIZE")))
    if "OMPI_COMM_WORLD_RANK" in env:
        rank, size = num("OMPI_COMM_WORLD_RANK"), num("OMPI_COMM_WORLD_SIZE")
        local = num("OMPI_COMM_WORLD_LOCAL_RANK", 0)
        if "MASTER_ADDR" in env and "MASTER_PORT" in env:
            addr, port = env["MASTER_ADDR"], num("MASTER_PORT")
        else:
            addr, port = _mpi_master() if size > 1 else ("127.0.0.1", _free_port())
        return ProcessEnv(rank, size, local, addr, port, "mpi", _int_or_none(env.get("OMPI_COMM_WORLD_LOCAL_SIZE")))
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # a task of an srun step
        size = num("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", 1))
        nodelist = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        addr = env.get("MASTER_ADDR") or first_slurm_host(nodelist)
        port = num("MASTER_PORT") if env.get("MASTER_PORT") else slurm_port(str(num("SLURM_JOB_ID", 0)))
        return ProcessEnv(num("SLURM_PROCID"), size, num("SLURM_LOCALID", 0), addr, port, "slurm",
                          _slurm_local_world_size(env))
    port = num("MASTER_PORT") if env.get("MASTER_PORT") else _free_port()
    return ProcessEnv(0, 1, 0, "127.0.0.1", port, "single", 1)


def device_index(local_rank: int, local_world_size: Optional[int], visible_devices: int,
                 visible_env: Optional[str] = None) -> int:
    """Which of the `visible_devices` GPUs this process drives (its CUDA device index).

    - One visible device: 0, whatever the local rank. `srun --gpus-per-task=1` (or any
      per-task CUDA_VISIBLE_DEVICES mask) shows each task its own GPU as device 0, while
      SLURM_LOCALID still counts 0..n-1 on the node.
    - At least as many visible devices as ranks on this node (torchrun, mpirun, srun with
      the node's GPUs shared by its tasks): the local rank.
    - Otherwise refuse (ConfigError, keyed CUDA_VISIBLE_DEVICES): `local_rank % count` would put
      two ranks on one GPU. Every rank of the node refuses, not only the ones past the end.

    `local_world_size` None (launcher did not say) checks the local rank alone. `visible_env`
    is CUDA_VISIBLE_DEVICES as set, for the message only. A node whose single GPU is shared by
    several ranks looks like the per-task case here; NCCL refuses it ("Duplicate GPU").
    """
    if visible_devices < 1:
        raise ConfigError("CUDA_VISIBLE_DEVICES", f"no GPU visible{_shown(visible_env)} for local rank {local_rank}")
    if visible_devices == 1:
        return 0
    ranks = max(local_world_size or 0, local_rank + 1)
    if ranks > visible_devices:
        of = f" of {local_world_size}" if local_world_size else ""
        raise ConfigError("CUDA_VISIBLE_DEVICES",
                          f"local rank {local_rank}{of} on this node but only {visible_devices} GPUs visible"
                          f"{_shown(visible_env)}: start one task per GPU (torchrun --nproc_per_node "
                          f"{visible_devices}, srun --ntasks-per-node {visible_devices} or --gpus-per-task 1)")
    return local_rank


def _shown(visible_env: Optional[str]) -> str:
    return f" (CUDA_VISIBLE_DEVICES={visible_env})" if visible_env is not None else ""


def export_env(penv: ProcessEnv, device_index: Optional[int] = None) -> None:
    """Publish the discovered values as the variables torch.distributed and DeepSpeed read
    (LOCAL_WORLD_SIZE too when known, as torchrun sets it: `pick_device` reads it).

    DeepSpeed takes $LOCAL_RANK for the CUDA device index in many places (the engine, the
    pipeline module's `.to()`, ZeRO 3's `Init`, its ZeRO utilities), which is wrong under a
    per-task GPU mask (srun --gpus-per-task=1: SLURM_LOCALID 3, one visible GPU, index 0). So
    on a GPU, LOCAL_RANK is the device index `pick_device` chose; our own code uses
    `ProcessEnv.local_rank` for the node-local rank. (Under mpirun DeepSpeed asserts
    LOCAL_RANK == OMPI_COMM_WORLD_LOCAL_RANK: mpirun with per-task GPU masks is unsupported.)"""
    local_rank = penv.local_rank if device_index is None else device_index
    os.environ.update(RANK=str(penv.rank), WORLD_SIZE=str(penv.world_size), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR=penv.master_addr, MASTER_PORT=str(penv.master_port))
    if penv.local_world_size is not None:
        os.environ["LOCAL_WORLD_SIZE"] = str(penv.local_world_size)


# --------------------------------------------------------------------------------------
# Devices and process groups (the only part that touches torch.distributed)
# --------------------------------------------------------------------------------------


def pick_device(local_rank: int = 0, local_world_size: Optional[int] = None) -> tuple[Any, str]:
    """(device, backend): cuda + nccl when a GPU is visible, cpu + gloo otherwise.

    The CUDA index is `device_index` of the local rank, the ranks on this
    node (`local_world_size`, else $LOCAL_WORLD_SIZE as torchrun and `export_env` set it) and
    torch's device count: 0 under a per-task GPU mask (srun --gpus-per-task=1), else the local
    rank; fewer GPUs than local ranks raises ConfigError. Give DeepSpeed the same index
    (`device.index`). Sets torch's current CUDA device."""
    import torch  # lazy: discover() and device_index() serve the light launch path without torch

    if torch.cuda.is_available():
        if local_world_size is None and os.environ.get("LOCAL_WORLD_SIZE", "").isdigit():
            local_world_size = int(os.environ["LOCAL_WORLD_SIZE"])
        index = device_index(local_rank, local_world_size, torch.cuda.device_count(),
                             os.environ.get("CUDA_VISIBLE_DEVICES"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index), "nccl"
    return torch.device("cpu"), "gloo"
