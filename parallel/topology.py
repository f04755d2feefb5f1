"""The 3D layout: world size -> (pp, dp, tp) degrees, rank <-> coordinates, process groups.

Axis order, outermost to innermost: pipeline, data, tensor. This is DeepSpeed's
`PipeModelDataParallelTopology` order (axes pipe, data, model), so our rank map and
DeepSpeed's are one and the same:

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

Tensor parallelism is innermost, so the ranks of one tp group are consecutive and sit on
one node (with tp <= GPUs per node); pipeline neighbours are the farthest apart, which suits
them: they exchange one activation per micro-batch.

Everything except `build_process_groups` is pure integer arithmetic, testable without any
process group (and used by `--dry-run` on a laptop).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple, Optional

from launcher.config import ConfigError, ParallelConfig


class Coord(NamedTuple):
    pp: int
    dp: int
    tp: int


@dataclass(frozen=True)
class Layout:
    """Resolved parallel degrees and batch arithmetic for one world size."""

    world_size: int
    tp: int
    pp: int
    dp: int
    micro_batch: int
    global_batch: int

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        return self.global_batch // (self.micro_batch * self.dp)

    def coord(self, rank: int) -> Coord:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        pp_rank = rank // (self.tp * self.dp)
        return Coord(pp=pp_rank, dp=dp_rank, tp=tp_rank)

    def rank(self, coord: Coord) -> int:
        return (coord.pp * self.dp + coord.dp) * self.tp + coord.tp

    def tp_group_ranks(self) -> list[list[int]]:
        """Every tensor-parallel group (ranks differing only in tp)."""
        return [[self.rank(Coord(p, d, t)) for t in range(self.tp)]
                for p in range(self.pp) for d in range(self.dp)]

    def dp_group_ranks(self) -> list[list[int]]:
        return [[self.rank(Coord(p, d, t)) for d in range(self.dp)]
                for p in range(self.pp) for t in range(self.tp)]

    def pp_group_ranks(self) -> list[list[int]]:
        return [[self.rank(Coord(p, d, t)) for p in range(self.pp)]
                for d in range(self.dp) for t in range(self.tp)]

    def describe(self) -> str:
        return (f"world {self.world_size} = tp {self.tp} x pp {self.pp} x dp {self.dp}; "
                f"micro_batch {self.micro_batch} x grad_accum {self.grad_accum} x dp {self.dp} "
                f"= global_batch {self.global_batch}")


def resolve_layout(parallel: ParallelConfig, world_size: int) -> Layout:
    """Check the parallel section against a world size; raise ConfigError naming the key."""
    if world_size < 1:
        raise ConfigError("--world-size", f"must be >= 1, got {world_size}")
    tp, pp = parallel.tensor, parallel.pipeline
    if parallel.data == "auto":
        if world_size % (tp * pp):
            raise ConfigError("parallel.data", f"auto: world size {world_size} is not divisible by "
                              f"tensor*pipeline = {tp}*{pp} = {tp * pp} (start a multiple of {tp * pp} "
                              f"processes, e.g. torchrun --nproc_per_node {tp * pp}, or lower parallel.tensor "
                              f"/ parallel.pipeline)")
        dp = world_size // (tp * pp)
    else:
        dp = parallel.data
        if tp * pp * dp != world_size:
            raise ConfigError("parallel.data", f"tensor*pipeline*data = {tp}*{pp}*{dp} = {tp * pp * dp} "
                              f"but the world size is {world_size} (or set data: auto)")
    if parallel.global_batch % (parallel.micro_batch * dp):
        raise ConfigError("parallel.global_batch",
                          f"global_batch={parallel.global_batch} is not divisible by micro_batch*data = "
                          f"{parallel.micro_batch}*{dp} = {parallel.micro_batch * dp}")
    return Layout(world_size=world_size, tp=tp, pp=pp, dp=dp,
                  micro_batch=parallel.micro_batch, global_batch=parallel.global_batch)


# --------------------------------------------------------------------------------------
# Devices and process groups (the only part that touches torch.distributed)
# --------------------------------------------------------------------------------------


def pick_device(local_rank: int = 0, local_world_size: Optional[int] = None) -> tuple[Any, str]:
    """(device, backend): cuda + nccl when a GPU is visible, cpu + gloo otherwise.

    The CUDA index is `launcher.launch_env.device_index` of the local rank, the ranks on this
    node (`local_world_size`, else $LOCAL_WORLD_SIZE as torchrun and `export_env` set it) and
    torch's device count: 0 under a per-task GPU mask (srun --gpus-per-task=1), else the local
    rank; fewer GPUs than local ranks raises ConfigError. Give DeepSpeed the same index
    (`device.index`). Sets torch's current CUDA device."""
    import torch

    from launcher.launch_env import device_index

    if torch.cuda.is_available():
        if local_world_size is None and os.environ.get("LOCAL_WORLD_SIZE", "").isdigit():
            local_world_size = int(os.environ["LOCAL_WORLD_SIZE"])
        index = device_index(local_rank, local_world_size, torch.cuda.device_count(),
                             os.environ.get("CUDA_VISIBLE_DEVICES"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index), "nccl"
    return torch.device("cpu"), "gloo"


@dataclass
class ProcessGroups:
    """This rank's place in the layout and the groups it belongs to."""

    layout: Layout
    rank: int
    coord: Coord
    tp_group: Any
    dp_group: Any
    pp_group: Any
    tp_ranks: list[int]
    dp_ranks: list[int]
    pp_ranks: list[int]

    @property
    def is_first_stage(self) -> bool:
        return self.coord.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coord.pp == self.layout.pp - 1


def init_distributed(backend: str, timeout_s: Optional[float] = None) -> None:
    """Initialise torch.distributed from torchrun-style env vars (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT) and register it with DeepSpeed's comm layer (idempotent).

    `timeout_s` bounds every collective on every group (world, ours from
    `build_process_groups`, DeepSpeed's own): survivors of a dead peer fail instead of hanging.

    We create the world group ourselves under every launcher. Left to DeepSpeed
    (`TorchBackend.init_process_group`), it binds NCCL to cuda:$LOCAL_RANK, which is not this
    process's GPU under a per-task mask (srun --gpus-per-task=1: SLURM_LOCALID 3, one GPU,
    device 0); `pick_device` has already made the right one current."""
    import deepspeed
    import torch.distributed as dist

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
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, rank=rank, world_size=world_size,
                               timeout=timeout)
    _deepspeed_groups_get_timeout(timeout)


def group_timeout(timeout_s: Optional[float]) -> timedelta:
    """The timeout every process group gets (torch's gloo default, 30 min, when unset)."""
    return timedelta(seconds=timeout_s) if timeout_s else timedelta(minutes=30)


def _deepspeed_groups_get_timeout(timeout: timedelta) -> None:
    """Make the groups DeepSpeed creates itself (pipeline grid, p2p, tied weights, ZeRO,
    deepspeed.utils.groups) carry our timeout.

    torch gives a group made without `timeout=` its backend's default (30 min gloo, 10 min
    NCCL; torch 2.13 `_new_group_with_tag` -> `_get_default_timeout`), not the world group's.
    Every DeepSpeed group goes through `deepspeed.comm.new_group(ranks)` ->
    `TorchBackend.new_group(ranks)` -> `torch.distributed.new_group(ranks)`, with no timeout.
    So we replace that one method on DeepSpeed's backend object (`deepspeed.comm.comm.cdb`),
    leaving torch.distributed itself untouched; assigning it again on a second call replaces,
    never stacks. (DeepSpeed's `init_device_mesh` path is not covered; we do not use it.)"""
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist

    def new_group(ranks, **kwargs):
        kwargs.setdefault("timeout", timeout)
        return dist.new_group(ranks, **kwargs)

    ds_comm.cdb.new_group = new_group


def build_process_groups(layout: Layout, rank: int, timeout_s: Optional[float] = None) -> ProcessGroups:
    """Create every tp, dp and pp group (collectively: all ranks must call this).

    Each group gets `timeout_s` (parallel.collective_timeout_s, as the world group): without
    `timeout=` torch gives a subgroup its backend's default (30 min gloo, 10 min NCCL), not
    the world's."""
    import torch.distributed as dist

    if dist.get_world_size() != layout.world_size:
        raise RuntimeError(f"layout is for {layout.world_size} ranks, process group has {dist.get_world_size()}")
    timeout = group_timeout(timeout_s)
    mine: dict[str, tuple[Any, list[int]]] = {}
    for name, all_groups in (("tp", layout.tp_group_ranks()), ("dp", layout.dp_group_ranks()),
                             ("pp", layout.pp_group_ranks())):
        for ranks in all_groups:  # new_group is collective over the world, in the same order
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine[name] = (group, ranks)
    return ProcessGroups(layout=layout, rank=rank, coord=layout.coord(rank),
                         tp_group=mine["tp"][0], dp_group=mine["dp"][0], pp_group=mine["pp"][0],
                         tp_ranks=mine["tp"][1], dp_ranks=mine["dp"][1], pp_ranks=mine["pp"][1])


def deepspeed_topology(layout: Layout):
    """DeepSpeed's own topology object for this layout (same rank map as `Layout.coord`)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)


@dataclass
class ModelParallelUnit:
    """The `mpu` interface DeepSpeed's engine queries for tensor and data parallel groups
    (used when pipeline = 1; the pipeline engine builds its own grid from the topology)."""

    groups: ProcessGroups

    def get_model_parallel_rank(self) -> int:
        return self.groups.coord.tp

    def get_model_parallel_world_size(self) -> int:
        return self.groups.layout.tp

    def get_model_parallel_group(self):
        return self.groups.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.groups.coord.dp

    def get_data_parallel_world_size(self) -> int:
        return self.groups.layout.dp

    def get_data_parallel_group(self):
        return self.groups.dp_group

    # Megatron-style aliases that parts of DeepSpeed look for.
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.groups.coord.pp

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.groups.layout.pp

    def get_pipeline_model_parallel_group(self):
        return self.groups.pp_group
