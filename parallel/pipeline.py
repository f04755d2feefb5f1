"""DeepSpeed's PipelineModule, cut at boundaries computed by `parallel.partition`.

DeepSpeed's constructor accepts only a method name (`uniform`, `parameters`, `type:`) and
computes the split itself; we compute every split ourselves (the printed stage table is the
one that runs), so the one hook DeepSpeed uses for it, `_partition_layers`, is replaced by
one that takes the given boundaries.
"""

from __future__ import annotations

from typing import Sequence

from deepspeed.pipe import PipelineModule


class StagedPipelineModule(PipelineModule):
    def __init__(self, layers: Sequence, parts: Sequence[int], **kwargs):
        layers = list(layers)
        stages = kwargs["topology"].get_dim("pipe")
        if len(parts) != stages + 1 or parts[0] != 0 or parts[-1] != len(layers):
            raise ValueError(f"boundaries {list(parts)} do not cover {len(layers)} layers in {stages} stages")
        if any(b <= a for a, b in zip(parts, parts[1:])):
            raise ValueError(f"boundaries {list(parts)} leave a stage empty")
        self._explicit_parts = [int(p) for p in parts]
        # (DeepSpeed's constructor ends with `self.to(cuda:$LOCAL_RANK)`: launcher.launch_env.
        # export_env makes LOCAL_RANK the device index we picked.)
        super().__init__(layers, partition_method="explicit", **kwargs)

    def _partition_layers(self, method: str = "explicit") -> None:
        self.parts = list(self._explicit_parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])
