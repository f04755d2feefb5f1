"""Starting torch.distributed and DeepSpeed's comm layer for every launcher (torchrun, srun,
mpirun), with one timeout on every group.
"""

from __future__ import annotations

import os
from typing import Optional

import deepspeed
import torch.distributed as dist

from launcher.ds.seams import groups_carry_timeout, skip_shm_build
from parallel.topology import group_timeout


def init_distributed(backend: str, timeout_s: Optional[float] = None) -> None:
    """Initialise torch.distributed from torchrun-style env vars (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT) and register it with DeepSpeed's comm layer (idempotent).

    `timeout_s` bounds every collective on every group (world, ours from
    `build_process_groups`, DeepSpeed's own): survivors of a dead peer fail instead of hanging.

    We create the world group ourselves under every launcher. Left to DeepSpeed
    (`TorchBackend.init_process_group`), it binds NCCL to cuda:$LOCAL_RANK, which is not this
    process's GPU under a per-task mask (srun --gpus-per-task=1: SLURM_LOCALID 3, one GPU,
    device 0); `pick_device` has already made the right one current."""

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = group_timeout(timeout_s)
    if not dist.is_initialized():
        store = None  # env:// (MASTER_ADDR, MASTER_PORT)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # Under torchrun the workers share the agent's TCPStore, and after a restart
            # (--max-restarts) it still holds the previous attempt's keys: gloo then dials peers
            # that no longer exist ("Gloo connectFullMesh failed ... Connection refused", seen with
            # torch 2.13 in every rendezvous mode). A key prefix per attempt keeps them apart.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"launcher/attempt_{attempt}",
                                     dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                                   is_master=False, timeout=timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    skip_shm_build()  # else a fresh install waits 27-82 s here, silently, for a C++ build we never use
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, rank=rank, world_size=world_size,
                               timeout=timeout)
    groups_carry_timeout(timeout)
