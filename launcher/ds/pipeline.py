"""Our layout as DeepSpeed's pipeline topology (axes pipe, data, model: the same rank order
as parallel/layout.py).
"""

from __future__ import annotations

from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from parallel.layout import Layout


def deepspeed_topology(layout: Layout):
    """DeepSpeed's own topology object for this layout (same rank map as `Layout.coord`; its
    model axis is the expert group, its data axis the ranks holding the same experts, which
    are tp and dp unless an MoE's experts span data ranks: parallel/layout.py)."""

    return PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.ds_model, num_dp=layout.ds_data)
