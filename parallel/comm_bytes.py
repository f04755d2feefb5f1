"""Count the bytes each rank hands to the collectives of one process group (the data-parallel
group): gradient reductions and ZeRO's parameter all-gathers, separately.

The count is the payload: the size of the tensor being reduced (all-reduce, reduce,
reduce-scatter input) or gathered (all-gather output, broadcast). On the wire a ring
all-reduce moves about 2 (n-1)/n of its payload per rank, a reduce-scatter or all-gather
(n-1)/n; ratios between runs that use the same collectives are the same either way.

Why wrap torch.distributed rather than use DeepSpeed's comms_logger: the logger sees only
calls made through deepspeed.comm, not the all-reduces torch's PowerSGD hook issues
itself. Install before `deepspeed.initialize`: DeepSpeed's torch backend keeps references
to the all-gather and reduce-scatter functions it finds at that point.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# function name -> (argument holding the payload, counted as)
COLLECTIVES = {
    "all_reduce": ("tensor", "reduce"),
    "all_reduce_coalesced": ("tensors", "reduce"),
    "reduce": ("tensor", "reduce"),
    "reduce_scatter_tensor": ("input", "reduce"),
    "_reduce_scatter_base": ("input", "reduce"),
    "reduce_scatter": ("input_list", "reduce"),
    "all_gather_into_tensor": ("output_tensor", "gather"),
    "_all_gather_base": ("output_tensor", "gather"),
    "all_gather": ("tensor_list", "gather"),
    "broadcast": ("tensor", "gather"),
}


def payload_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(payload_bytes(v) for v in value)


class CollectiveBytes:
    """Counts bytes per kind ("reduce", "gather") of the collectives this rank calls on the
    group whose ranks are `ranks` (whichever process group object carries them: DeepSpeed
    builds its own groups over the same ranks)."""

    def __init__(self, ranks: list[int]):
        self.ranks = tuple(sorted(ranks))
        self.counts = {"reduce": 0, "gather": 0}
        self._originals: list[tuple[object, str, object]] = []
        self._group_ranks: dict[int, tuple] = {}

    def install(self) -> "CollectiveBytes":
        for module in (dist, c10d):
            for name, (argument, kind) in COLLECTIVES.items():
                original = getattr(module, name, None)
                if original is not None:
                    self._originals.append((module, name, original))
                    setattr(module, name, self._counting(original, argument, kind))
        return self

    def uninstall(self) -> None:
        for module, name, original in reversed(self._originals):
            setattr(module, name, original)
        self._originals.clear()

    def take(self) -> dict[str, int]:
        """The counts since the last call, then zero."""
        counts, self.counts = self.counts, {kind: 0 for kind in self.counts}
        return counts

    def _counting(self, original, argument: str, kind: str):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def counted(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            if self._is_counted_group(bound.arguments.get("group")):
                self.counts[kind] += payload_bytes(bound.arguments[argument])
            return original(*args, **kwargs)

        return counted

    def _is_counted_group(self, group) -> bool:
        key = id(group)
        if key not in self._group_ranks:
            self._group_ranks[key] = tuple(sorted(dist.get_process_group_ranks(group or dist.group.WORLD)))
        return self._group_ranks[key] == self.ranks
