"""Count the bytes each rank hands to the collectives of one process group (the data-parallel
group: gradient reductions and ZeRO's parameter all-gathers; the tensor-parallel group: the
model's own collectives), and what the tensor-parallel ones should be (`tp_collectives`).

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
    "reduce_scatter_single": ("input", "reduce"),
    "_reduce_scatter_base": ("input", "reduce"),
    "reduce_scatter": ("input_list", "reduce"),
    "all_gather_into_tensor": ("output_tensor", "gather"),
    "all_gather_single": ("output_tensor", "gather"),
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
        self.calls: list[tuple[str, int]] = []  # (function, payload bytes) in call order
        self._depth = 0  # a collective that calls another (reduce_scatter_tensor -> _single) counts once
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

    def take_calls(self) -> list[tuple[str, int]]:
        """(function, payload bytes) of each collective since the last call, then none."""
        calls, self.calls = self.calls, []
        return calls

    def _counting(self, original, argument: str, kind: str):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def counted(*args, **kwargs):
            if self._depth:
                return original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            if self._is_counted_group(bound.arguments.get("group")):
                payload = payload_bytes(bound.arguments[argument])
                self.counts[kind] += payload
                self.calls.append((original.__name__, payload))
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def _is_counted_group(self, group) -> bool:
        key = id(group)
        if key not in self._group_ranks:
            self._group_ranks[key] = tuple(sorted(dist.get_process_group_ranks(group or dist.group.WORLD)))
        return self._group_ranks[key] == self.ranks


def tp_collectives(layers: int, hidden: int, tokens: int, dtype_bytes: int, tp: int,
                   sequence_parallel: bool) -> dict[str, list[tuple[str, int]]]:
    """The collectives one rank of a tensor-parallel group of `tp` calls in one forward
    ("forward") and one backward ("backward") of a micro-batch of `tokens` (B x T) through
    the Llama model (embedding, `layers` x (attention, MLP), final norm, head, vocab-parallel
    loss), each as (function, payload bytes), grouped {(function, payload): count} by
    `collective_counts`. act = one full (B, T, H) activation in the compute dtype.

    Without sequence parallelism, per layer: 2 all-reduces forward (the outputs of wo and
    w_down) and 2 backward (the gradients of the attention and MLP inputs; q, k, v and
    gate, up read one input each). Embedding: 1 forward; head: 1 backward.
    With it, each all-reduce becomes a reduce-scatter and an all-gather of the same payload
    (forward: all-gather at each block input, reduce-scatter at each output; backward:
    all-gather of the output gradient, all-gather again of the saved input shard, reduce-
    scatter of the input gradient), plus one all-reduce of each norm weight's gradient
    (H floats). The loss: a MAX all-reduce of one fp32 per token and a SUM of two."""
    act = tokens * hidden * dtype_bytes
    loss = [("all_reduce", 4 * tokens), ("all_reduce", 8 * tokens)]
    if tp == 1:
        return {"forward": [], "backward": []}
    if not sequence_parallel:
        forward = [("all_reduce", act)] * (1 + 2 * layers) + loss
        backward = [("all_reduce", act)] * (2 * layers + 1)
        return {"forward": forward, "backward": backward}
    norm = ("all_reduce", hidden * dtype_bytes)
    forward = ([("reduce_scatter_single", act)] + [("all_gather_single", act), ("reduce_scatter_single", act)]
               * 2 * layers + [("all_gather_single", act)] + loss)
    block = [("all_gather_single", act), ("all_gather_single", act), ("reduce_scatter_single", act), norm]
    backward = ([("all_gather_single", act), ("reduce_scatter_single", act), norm] + block * 2 * layers
                + [("all_gather_single", act)])
    return {"forward": forward, "backward": backward}


def collective_counts(calls: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """{(function, payload bytes): how many calls}: order-free, for comparing with the formula."""
    out: dict[tuple[str, int], int] = {}
    for call in calls:
        out[call] = out.get(call, 0) + 1
    return out
