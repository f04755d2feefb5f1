"""What `parallel/` reads from the user's config, declared here so that it imports nothing
from `launcher/`.

These are structural types (typing.Protocol): `launcher.config.schema.ModelConfig` and
`ParallelConfig` satisfy them as they are, and so does any plain object or dataclass with
these attributes (the tests build small ones). Only the attributes listed here may be read
by the cost model, the memory model, the planner and the layout arithmetic.
"""

from __future__ import annotations

from typing import Protocol, Union


class ModelShape(Protocol):
    """A Llama-style decoder's shape (after `auto` is resolved: plain numbers)."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    seq_len: int
    tie_embeddings: bool

    # Optional: `moe` (a MoEShape, or None for a dense model); read with getattr, so a shape
    # without the attribute is dense.

    @property
    def n_kv_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...


class MoEShape(Protocol):
    """model.moe: the Mixture-of-Experts feed-forward blocks."""

    experts: int
    top_k: int
    shared_experts: int
    ffn: int
    first_dense: int


class ParallelDegrees(Protocol):
    """The parallel section's degrees and batch sizes as the user gave them (`auto` for the
    data degree means world_size / (tensor * pipeline))."""

    tensor: int
    pipeline: int
    data: Union[int, str]
    micro_batch: int
    global_batch: int
    expert: Union[int, str]  # expert-parallel degree, or "auto" (the planner's)
    context: int  # context-parallel degree: each sequence cut over this many ranks
