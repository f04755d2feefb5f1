"""Run a function on N real gloo processes (torch.multiprocessing) and collect results."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launcher.ds.distributed import init_distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, out_dir: str, timeout_s=None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    init_distributed("gloo", timeout_s)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
        # Let gloo's worker threads finish whatever callbacks they ran (torch's PowerSGD hook
        # chains futures): destroying the group under them aborts with "Resource deadlock".
        dist.barrier()
    except Exception:
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout_s: float | None = None) -> list:
    """fn(rank, world_size, *args) on world_size processes; returns each rank's result.
    `timeout_s`: parallel.collective_timeout_s for init_distributed (default: its own)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, free_port(), fn, args, out_dir, timeout_s), nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False) for r in range(world_size)]
