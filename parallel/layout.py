"""The 3D layout as one value: world size -> (pp, dp, cp, tp) degrees and batch arithmetic,
rank <-> coordinates, and the ranks of every group.

Axis order, outermost to innermost: pipeline, data, context, tensor. Without context
parallelism this is DeepSpeed's `PipeModelDataParallelTopology` order (axes pipe, data,
model), so our rank map and DeepSpeed's are one and the same:

    rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank     (cp = 1: the same map)

The context ranks of one data rank (one sequence cut over cp ranks, parallel/context.py)
hold the same weights: DeepSpeed's data dimension spans the dp x cp "replica slots",
slot = dp_rank * cp + cp_rank, and its rank map is ours again.

Tensor parallelism is innermost, so the ranks of one tp group are consecutive and sit on
one node (with tp <= GPUs per node); pipeline neighbours are the farthest apart, which suits
them: they exchange one activation per micro-batch.

Expert parallelism (an MoE model's experts split over `ep` ranks) spans the tp ranks and,
when ep > tp, the next ep/tp replica slots (data ranks, or context ranks first when cp > 1):
an expert group is ep consecutive ranks, and the expert rank within it is
`(slot % (ep/tp)) * tp + tp_rank`. DeepSpeed is shown that group
as its model-parallel dimension and the dp/(ep/tp) ranks holding the same experts as its data
dimension (`ds_model`, `ds_data`), which is the same rank map again; docs/MOE.md has why.

After `auto` is resolved the degrees travel as a `Layout` (the engine, the planner's
candidates, the stage table). It is pure integer arithmetic, testable without any process
group (and used by `--dry-run` on a laptop); parallel/topology.py builds the process groups
from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

from parallel.errors import ConfigError
from parallel.shapes import ParallelDegrees


def expert_degree_fits(ep: int, tp: int, dp: int) -> bool:
    """An expert degree is tp x a divisor of dp (the one rule every check of it uses)."""
    return ep % tp == 0 and dp % (ep // tp) == 0


def powers_of_two(limit: int) -> list[int]:
    return [1 << i for i in range(limit.bit_length())]  # 1, 2, 4, ... <= limit


def context_degrees(seq_len: int, sequence_parallel: bool, tp: int, world: int,
                    given: Optional[int] = None) -> list[int]:
    """The context degrees worth trying at this tp: `given`, else 1 and every power of two
    that cuts the sequence into 2 cp chunks (and, with sequence parallelism on, a rank's
    seq_len / cp positions over tp) within the world."""
    if given is not None:
        return [given]
    return [c for c in powers_of_two(world // tp) if c == 1 or (
        seq_len % (2 * c) == 0 and not (sequence_parallel and tp > 1 and (seq_len // c) % tp))]


def expert_degrees(tp: int, dp: int, experts: int, gpus_per_node: int, given: Optional[int] = None) -> list[int]:
    """The expert degrees worth trying, as Layout.ep (0: the tensor degree): `given` where
    it is tp x a divisor of dp (dp x cp: the replica slots), else tp x every divisor k of
    dp that keeps the expert group inside a node and divides the experts; [0] for a dense
    model (experts 0)."""
    if given:
        return [0 if given == tp else given] if expert_degree_fits(given, tp, dp) else []
    if not experts:
        return [0]
    return [0 if k == 1 else tp * k for k in range(1, dp + 1)
            if dp % k == 0 and tp * k <= gpus_per_node and experts % (tp * k) == 0]


class Coord(NamedTuple):
    pp: int
    dp: int
    tp: int
    cp: int = 0  # the context rank (context parallelism: one sequence cut over cp ranks)


@dataclass(frozen=True)
class Layout:
    """Resolved parallel degrees and batch arithmetic for one world size; consistent by
    construction (tp x cp x pp x dp = world_size, micro_batch x dp divides global_batch).

    The ranks that hold the same weights are the dp x cp "replica slots" of a (pp, tp)
    coordinate, slot = dp_rank * cp + cp_rank: the context ranks of one data rank are
    consecutive, inside its block."""

    world_size: int
    tp: int
    pp: int
    dp: int
    micro_batch: int
    global_batch: int
    ep: int = 0  # expert-parallel degree; 0: the tensor degree (and for a dense model)
    cp: int = 1  # context-parallel degree: each sequence cut over cp ranks

    def __post_init__(self) -> None:
        # resolve_layout reports a user's mistake naming the key; this catches a caller's
        if min(self.tp, self.pp, self.dp, self.cp, self.micro_batch, self.global_batch) < 1:
            raise ValueError(f"every degree and batch size must be >= 1: {self}")
        if self.tp * self.cp * self.pp * self.dp != self.world_size:
            raise ValueError(f"tp {self.tp} x cp {self.cp} x pp {self.pp} x dp {self.dp} != world size "
                             f"{self.world_size}")
        if self.global_batch % (self.micro_batch * self.dp):
            raise ValueError(f"global_batch {self.global_batch} is not divisible by micro_batch x dp = "
                             f"{self.micro_batch} x {self.dp}")
        if self.ep and not expert_degree_fits(self.ep, self.tp, self.replicas):
            raise ValueError(f"ep {self.ep} must be tp {self.tp} x a divisor of dp x cp {self.replicas}")

    @property
    def replicas(self) -> int:
        """Ranks per (pp, tp) coordinate: dp x cp, the slots DeepSpeed's data dimension spans."""
        return self.dp * self.cp

    @property
    def expert_degree(self) -> int:
        return self.ep or self.tp

    @property
    def experts_over_dp(self) -> int:
        """Replica slots one expert group spans (ep / tp; 1 when the experts are over tp only)."""
        return self.expert_degree // self.tp

    @property
    def ds_model(self) -> int:
        """DeepSpeed's model-parallel degree: the expert group (the tp group when ep = tp)."""
        return self.expert_degree

    @property
    def ds_data(self) -> int:
        """DeepSpeed's data-parallel degree: the ranks holding the same experts (expert-data
        parallelism; all dp x cp slots when ep = tp)."""
        return self.replicas // self.experts_over_dp

    def slot(self, coord: Coord) -> int:
        return coord.dp * self.cp + coord.cp

    def _at(self, pp: int, slot: int, tp: int) -> int:
        return (pp * self.replicas + slot) * self.tp + tp

    def expert_rank(self, coord: Coord) -> int:
        return (self.slot(coord) % self.experts_over_dp) * self.tp + coord.tp

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        return self.global_batch // (self.micro_batch * self.dp)

    def coord(self, rank: int) -> Coord:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        slot = (rank // self.tp) % self.replicas
        return Coord(pp=rank // (self.tp * self.replicas), dp=slot // self.cp, tp=rank % self.tp, cp=slot % self.cp)

    def rank(self, coord: Coord) -> int:
        return self._at(coord.pp, self.slot(coord), coord.tp)

    def tp_group_ranks(self) -> list[list[int]]:
        """Every tensor-parallel group (ranks differing only in tp)."""
        return [[self._at(p, s, t) for t in range(self.tp)] for p in range(self.pp) for s in range(self.replicas)]

    def dp_group_ranks(self) -> list[list[int]]:
        """The ranks holding the same (dense) weights: every dp x cp slot of a (pp, tp)."""
        return [[self._at(p, s, t) for s in range(self.replicas)] for p in range(self.pp) for t in range(self.tp)]

    def cp_group_ranks(self) -> list[list[int]]:
        """Every context group: the cp ranks of one data rank's sequence."""
        return [[self._at(p, d * self.cp + c, t) for c in range(self.cp)]
                for p in range(self.pp) for d in range(self.dp) for t in range(self.tp)]

    def ep_group_ranks(self) -> list[list[int]]:
        """Every expert-parallel group, in expert-rank order (DeepSpeed's model groups)."""
        f = self.experts_over_dp
        return [[self._at(p, d * f + e, t) for e in range(f) for t in range(self.tp)]
                for p in range(self.pp) for d in range(self.ds_data)]

    def expert_dp_group_ranks(self) -> list[list[int]]:
        """The ranks holding the same experts (DeepSpeed's data groups)."""
        f = self.experts_over_dp
        return [[self._at(p, d * f + e, t) for d in range(self.ds_data)]
                for p in range(self.pp) for e in range(f) for t in range(self.tp)]

    def expert_peer_group_ranks(self) -> list[list[int]]:
        """The slots of one expert group with the same tp rank: they hold the same dense
        weights but different experts, so DeepSpeed does not reduce between them."""
        f = self.experts_over_dp
        return [[self._at(p, d * f + e, t) for e in range(f)]
                for p in range(self.pp) for d in range(self.ds_data) for t in range(self.tp)]

    def pp_group_ranks(self) -> list[list[int]]:
        return [[self._at(p, s, t) for p in range(self.pp)] for s in range(self.replicas) for t in range(self.tp)]

    def describe(self) -> str:
        context = f" x cp {self.cp}" if self.cp > 1 else ""
        return (f"world {self.world_size} = tp {self.tp}{context} x pp {self.pp} x dp {self.dp}; "
                f"micro_batch {self.micro_batch} x grad_accum {self.grad_accum} x dp {self.dp} "
                f"= global_batch {self.global_batch}")


def resolve_layout(parallel: ParallelDegrees, world_size: int) -> Layout:
    """Check the parallel section against a world size; raise ConfigError naming the key."""
    if world_size < 1:
        raise ConfigError("--world-size", f"must be >= 1, got {world_size}")
    tp, pp, cp = parallel.tensor, parallel.pipeline, parallel.context
    per = tp * pp * cp  # ranks per data rank
    names, values = ("tensor*pipeline*context", f"{tp}*{pp}*{cp}") if cp > 1 else ("tensor*pipeline", f"{tp}*{pp}")
    if parallel.data == "auto":
        if world_size % per:
            raise ConfigError("parallel.data", f"auto: world size {world_size} is not divisible by "
                              f"{names} = {values} = {per} (start a multiple of {per} "
                              f"processes, e.g. torchrun --nproc_per_node {per}, or lower parallel.tensor "
                              f"/ parallel.pipeline{' / parallel.context' if cp > 1 else ''})")
        dp = world_size // per
    else:
        dp = parallel.data
        if per * dp != world_size:
            raise ConfigError("parallel.data", f"{names}*data = {values}*{dp} = {per * dp} "
                              f"but the world size is {world_size} (or set data: auto)")
    if parallel.global_batch % (parallel.micro_batch * dp):
        raise ConfigError("parallel.global_batch",
                          f"global_batch={parallel.global_batch} is not divisible by micro_batch*data = "
                          f"{parallel.micro_batch}*{dp} = {parallel.micro_batch * dp}")
    ep = _expert_degree(parallel, tp, dp * cp)
    return Layout(world_size=world_size, tp=tp, pp=pp, dp=dp,
                  micro_batch=parallel.micro_batch, global_batch=parallel.global_batch, ep=ep, cp=cp)


def _expert_degree(parallel: ParallelDegrees, tp: int, dp: int) -> int:
    """parallel.expert against the layout (0: the tensor degree, as `auto`; a dense model's 1
    and an MoE's degree below tp are the config checks' business, launcher/config/checks.py)."""
    ep = parallel.expert
    if ep == "auto" or ep <= tp:
        return 0
    if not expert_degree_fits(ep, tp, dp):
        raise ConfigError("parallel.expert", f"{ep}: the experts are split over the tensor ranks and a "
                          f"divisor of the data ranks, so it must be tensor ({tp}) x a divisor of data "
                          f"({dp}): one of {', '.join(str(tp * k) for k in range(1, dp + 1) if dp % k == 0)}")
    return ep


def resolve_sequence_parallel(setting: Union[bool, str], seq_len: int, tp: int, context: int = 1) -> bool:
    """The same from the setting's value (the planner resolves it for every candidate tp).
    `auto` here is the GPU default (on when tp > 1 and a rank's seq_len / context positions
    split over tp); a launch on CPU decides it first."""
    if setting == "auto":
        return tp > 1 and (seq_len // context) % tp == 0
    return bool(setting) and tp > 1
