"""PowerSGD averaging of data-parallel gradients, in plain torch.distributed (gloo or NCCL).

PowerSGD (Vogels et al., 2019) sends, for each gradient matrix M (n x m), two rank-r factors
P (n x r) and Q (m x r) instead of M: (n + m) r numbers instead of n m. What compression
drops on a rank (its error) is added to that rank's next gradient (error feedback), so the
sum of applied updates tracks the sum of true gradients; P and Q are reused from the last
step (warm start), one power iteration per step.

torch ships this as a DDP communication hook (torch.distributed.algorithms.ddp_comm_hooks.
powerSGD_hook, with its state class). DeepSpeed does not run DDP, so `PowerSGDReducer`
hands torch's hook buckets of its own: `_Bucket` answers the four calls the hook makes
(buffer, gradients, index, is_last). Nothing of PowerSGD itself is re-implemented here:
this file groups gradients into buckets, runs the hook, copies the result back, and saves
and restores the hook's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import (
    PowerSGDState,
    powerSGD_hook,
)

# Elements per bucket (32 MiB of fp32), like DDP's 25 MB buckets: each bucket costs three
# all-reduces (vectors, P, Q), so fewer is better, but the error-feedback copy is per bucket.
BUCKET_ELEMENTS = 1 << 23
# PowerSGDState fields that change as training goes; the rest comes from the config.
_STATE_FIELDS = ("iter", "rng", "error_dict", "p_memory_dict", "q_memory_dict")


@dataclass
class _Bucket:
    """Duck-types torch.distributed.GradBucket for torch's PowerSGD hook: a flat fp32 buffer
    of several gradients, and per-gradient views into it."""
    position: int
    flat: torch.Tensor
    shapes: list
    last: bool

    def index(self) -> int:
        return self.position

    def buffer(self) -> torch.Tensor:
        return self.flat

    def is_last(self) -> bool:
        return self.last  # the hook counts a step when the last bucket is reduced

    def gradients(self) -> list[torch.Tensor]:
        views, offset = [], 0
        for shape in self.shapes:
            numel = shape.numel()
            views.append(self.flat[offset:offset + numel].view(shape))
            offset += numel
        return views


class PowerSGDReducer:
    """Averages a fixed list of gradients over the data-parallel group, in place, with
    PowerSGD. Gradients marked exact (e.g. weights tied across pipeline stages, whose two
    copies must stay equal) get a plain all-reduce. Every data-parallel peer must call
    `reduce_` with gradients of the same shapes in the same order."""

    def __init__(self, shapes: list[torch.Size], exact: list[bool], group, *, rank: int, warmup_steps: int,
                 error_feedback: bool, min_compression_rate: float, seed: int):
        self.shapes = [torch.Size(s) for s in shapes]
        self.exact = list(exact)
        self.group = group
        self.dp = dist.get_world_size(group)
        self.buckets = _bucket_indices(self.shapes, [i for i, e in enumerate(self.exact) if not e])
        # torch requires start_powerSGD_iter >= 2 because DDP rebuilds its buckets after the
        # first step; ours never change, so the configured warm-up (even 0) is set after.
        self.state = PowerSGDState(process_group=group, matrix_approximation_rank=rank, start_powerSGD_iter=2,
                                   min_compression_rate=min_compression_rate, use_error_feedback=error_feedback,
                                   warm_start=True, random_seed=seed)
        self.state.start_powerSGD_iter = warmup_steps

    @torch.no_grad()
    def reduce_(self, grads: list[torch.Tensor]) -> None:
        """Collective over the group: every gradient becomes the group mean (low-rank after
        the warm-up). Gradients of any float dtype; the arithmetic is fp32."""
        if [g.shape for g in grads] != self.shapes:
            raise RuntimeError("PowerSGD: the gradients to reduce changed shape or order since the first step")
        exact = [g for g, e in zip(grads, self.exact) if e]
        if exact:
            flat = torch.cat([g.reshape(-1).float() for g in exact])
            dist.all_reduce(flat, group=self.group)
            _copy_back(flat.div_(self.dp), exact)
        for position, indices in enumerate(self.buckets):
            members = [grads[i] for i in indices]
            flat = torch.cat([g.reshape(-1).float() for g in members])
            bucket = _Bucket(position, flat, [g.shape for g in members], last=position == len(self.buckets) - 1)
            _copy_back(powerSGD_hook(self.state, bucket).wait(), members)

    @property
    def compressing(self) -> bool:
        return self.state.iter >= self.state.start_powerSGD_iter

    def state_dict(self) -> dict:
        """Error feedback, P/Q factors, step count and the RNG that seeds new factors."""
        state = {name: getattr(self.state, name) for name in _STATE_FIELDS}
        # numpy's RandomState as plain numbers and a tensor: loadable with weights_only=True
        rng = state["rng"].get_state(legacy=False)
        state["rng"] = {**rng, "state": {**rng["state"], "key": torch.from_numpy(rng["state"]["key"].astype("int64"))}}
        return {**state, "signature": self._signature()}

    def load_state_dict(self, saved: dict) -> Optional[str]:
        """Restores the state saved by a reducer of the same buckets and rank (its tensors
        already on this rank's device: torch.load's map_location). Otherwise keeps the step
        count (the warm-up is not repeated) and starts errors and factors afresh; returns a
        line saying so."""
        self.state.iter = saved["iter"]
        if saved["signature"] != self._signature():
            return ("compression: the saved PowerSGD state is for other gradient shapes or rank; error feedback "
                    "and factors start afresh")
        rng = saved["rng"]
        self.state.rng = np.random.RandomState()
        self.state.rng.set_state({**rng, "state": {**rng["state"], "key": rng["state"]["key"].numpy().astype("uint32")}})
        for name in ("error_dict", "p_memory_dict", "q_memory_dict"):
            setattr(self.state, name, saved[name])
        return None

    def _signature(self) -> dict:
        return {"shapes": [list(s) for s in self.shapes], "exact": self.exact, "buckets": self.buckets,
                "rank": self.state.matrix_approximation_rank,
                "min_compression_rate": self.state.min_compression_rate}


def _bucket_indices(shapes: list[torch.Size], indices: list[int]) -> list[list[int]]:
    """The gradients at `indices`, in order, grouped into buckets of at most BUCKET_ELEMENTS
    (a larger gradient gets a bucket of its own)."""
    buckets, current, size = [], [], 0
    for index in indices:
        numel = shapes[index].numel()
        if current and size + numel > BUCKET_ELEMENTS:
            buckets.append(current)
            current, size = [], 0
        current.append(index)
        size += numel
    return buckets + ([current] if current else [])


def _copy_back(flat: torch.Tensor, grads: list[torch.Tensor]) -> None:
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view(g.shape))
        offset += g.numel()
