"""Memory of one rank: model states, activations, temporary buffers, fixed overhead.

Model states follow what DeepSpeed allocates as the launcher configures it (launcher/ds/config.py),
read from its code and checked against tensor storage measured in CPU runs (tests/test_plan.py):

    dtype, ZeRO          optimizer wrapper         weights   gradients (peak)         optimizer
    fp32, 0              none (torch AdamW)        4         4                        m
    bf16, 0 (pipeline)   BF16_Optimizer            2         4 (fp32 buffer, full)    (4 + m)/dp
    fp16, 0              FP16_Optimizer            2         2 + 4                    4 + m
    fp32/fp16, 1         DeepSpeedZeroOptimizer    w         max(w, (w + 4)/dp)       (4 + m)/dp
    bf16, 1              BF16_Optimizer            2         4 (fp32 buffer, full)    (4 + m)/dp
    any, 2               DeepSpeedZeroOptimizer    w         (a + 4)/dp               (4 + m)/dp
    any, 3               DeepSpeedZeroOptimizer_Stage3  w/dp (a + 4)/dp               (4 + m)/dp

w = bytes of the compute dtype; m = 8 for AdamW (two fp32 moments), 4 for Lion (one);
4 + m: the fp32 master copy and the moments. a = the gradient accumulation dtype: fp32 for
bf16 (the launcher sets `grad_accum_dtype: fp32`), else w. ZeRO 1-3 hold two gradient
partitions at the optimizer step (their accumulation buffer, and the fp32 copy handed to the
optimizer); ZeRO 1 without the bf16 optimizer also holds the full `.grad` until the
reduction at the end of the step. Per parameter; ZeRO's partitions divide over dp.

Mixed-precision AdamW in the textbook count (Rajbhandari et al. 2020) is 2 + 2 + 12 = 16
bytes per parameter; DeepSpeed's own estimators count 2 + 18/dp (ZeRO 2) and 18/dp plus the
largest layer (ZeRO 3). Their ZeRO 3 figure leaves out the 16-bit gradient partition the
code allocates (`grad_partitions_flat_buffer`), so ours is 2/dp bytes per parameter above it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

from parallel.costs import LOSS_CHUNK_ELEMENTS, ItemCost
from parallel.layout import Layout
from parallel.shapes import ModelShape

# DeepSpeed's defaults (deepspeed/runtime/zero/config.py), used unless the config's
# `deepspeed.zero_optimization` sets them.
REDUCE_BUCKET_SIZE = 500_000_000  # elements
PREFETCH_BUCKET_SIZE = 50_000_000  # elements (ZeRO 3)
MARGIN = 0.10  # allocator fragmentation and what the estimate leaves out


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter that one rank holds (ZeRO's partitions already divided by dp)."""

    weights: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def state_bytes(dtype: str, optimizer: str, zero_stage: int, dp: int, accum_bytes: Optional[int] = None,
                offload: bool = False) -> StateBytes:
    """Per-parameter model states on one rank, as DeepSpeed holds them (table above).
    `accum_bytes`: the gradient accumulation dtype's size (default: as the launcher sets it).
    `offload`: the optimizer (fp32 master, moments, fp32 gradients) lives in host memory."""
    w = dtype_bytes(dtype)
    moments = 8 if optimizer == "adamw" else 4
    a = accum_bytes if accum_bytes is not None else (4 if dtype == "bf16" else w)
    master_and_moments = (4 + moments) / dp
    if zero_stage == 0:
        if dtype == "fp32":
            return StateBytes(4, 4, moments)
        if dtype == "bf16":
            return StateBytes(2, 4, master_and_moments)
        return StateBytes(2, 2 + 4, 4 + moments)
    if zero_stage == 1 and dtype == "bf16" and not offload:
        return StateBytes(2, 4, master_and_moments)
    if offload:  # the fp32 gradient partition and the optimizer go to the host
        return StateBytes(w if zero_stage < 3 else w / dp, a / dp if zero_stage >= 2 else w, 0.0)
    if zero_stage == 1:
        return StateBytes(w, max(w, (w + 4) / dp), master_and_moments)
    return StateBytes(w if zero_stage == 2 else w / dp, (a + 4) / dp, master_and_moments)


def host_state_bytes(optimizer: str, dp: int) -> float:
    """Per-parameter host memory of one rank with the optimizer offloaded: fp32 master,
    moments and fp32 gradients of its partition."""
    return (4 + (8 if optimizer == "adamw" else 4) + 4) / dp


@dataclass(frozen=True)
class RankMemory:
    """The memory of one rank of one pipeline stage, in bytes."""

    stage: int
    params: int  # parameters this rank holds before ZeRO partitioning (its tp slice of its stage)
    weights: float
    grads: float
    optimizer: float
    activations: float  # saved for backward: per micro-batch x in_flight, plus pipeline buffers
    act_per_micro_batch: float
    in_flight: int
    logits: float  # the vocabulary-parallel loss's working memory (last stage)
    bucket: float  # the largest gradient reduction / all-gather bucket
    gathered: float  # ZeRO 3: full parameters (and their gradients) of the layers being computed
    framework: float  # CUDA context, library workspaces
    margin: float

    @property
    def model_states(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return (self.model_states + self.activations + max(self.logits, self.bucket) + self.gathered
                + self.framework + self.margin)

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(model_states=self.model_states, total=self.total)
        return out


def reduction_bucket(params: int, dtype: str, zero_stage: int, dp: int, reduce_bucket: int = REDUCE_BUCKET_SIZE) -> float:
    """Bytes of the buffer DeepSpeed reduces gradients through. ZeRO 1 (outside the bf16
    optimizer), 2 and 3 allocate a whole `reduce_bucket_size` bucket up front, whatever the
    model's size; the others flatten at most that many elements of the gradients at a time
    (in fp32 for bf16, whose gradients accumulate in fp32)."""
    e = dtype_bytes(dtype)
    accum = 4 if dtype == "bf16" else e
    if zero_stage >= 2 or (zero_stage == 1 and dtype != "bf16"):
        return float(reduce_bucket * (accum if zero_stage >= 2 else e))
    if dp == 1:
        return 0.0
    return float(min(reduce_bucket, params) * accum)


def in_flight(stage: int, stages: int, grad_accum: int) -> int:
    """Micro-batches whose activations stage `stage` holds at the peak of 1F1B."""
    return max(1, min(stages - stage, grad_accum))


@dataclass(frozen=True)
class StateSettings:
    """How the model states are held: what `state_bytes` and the reduction bucket depend on
    besides the data-parallel degree (which the Layout carries)."""

    dtype: str  # fp32 | bf16 | fp16
    optimizer: str  # adamw | lion
    zero_stage: int
    offload: bool = False  # the optimizer in host memory (zero.offload_optimizer)
    reduce_bucket: int = REDUCE_BUCKET_SIZE  # elements (deepspeed.zero_optimization.reduce_bucket_size)


@dataclass(frozen=True)
class Overhead:
    """What a rank holds beyond the model's own memory."""

    framework_bytes: float  # CUDA context, library workspaces (Hardware.framework_gb)
    margin: float = MARGIN  # fraction added on top of everything else
    touched_only: bool = False  # host memory: a bucket costs only the part gradients are written to


def rank_memory(model: ModelShape, costs: Sequence[ItemCost], parts: Sequence[int], stage: int,
                layout: Layout, states: StateSettings, overhead: Overhead) -> RankMemory:
    """Peak memory of one rank of pipeline stage `stage` (items costs[parts[stage]:parts[stage+1]]).

    The peak is taken as model states + activations in flight + the larger of the loss's
    working copies (mid-step) and the reduction bucket (end of step) + ZeRO 3's gathered
    layers + the fixed overhead, plus `overhead.margin` of all that. From `layout`: tp, dp,
    the micro-batch and grad_accum; the stages are those of `parts`. ZeRO shards over
    DeepSpeed's data group: the ranks that hold the same experts (`Layout.ds_data`, all of
    dp for a dense model)."""
    tp, dp, micro_batch = layout.tp, layout.ds_data, layout.micro_batch
    dtype, zero_stage, reduce_bucket = states.dtype, states.zero_stage, states.reduce_bucket
    stages = len(parts) - 1
    items = costs[parts[stage]:parts[stage + 1]]
    params = sum(c.params_per_rank for c in items)
    per_param = state_bytes(dtype, states.optimizer, zero_stage, dp, offload=states.offload)
    e = dtype_bytes(dtype)
    positions = model.seq_len // layout.cp  # context parallelism: each rank holds s / cp of a sequence
    bsh = micro_batch * positions * model.hidden
    flight = in_flight(stage, stages, layout.grad_accum)
    per_micro = sum(c.act_bytes for c in items)
    # DeepSpeed's pipeline engine holds each in-flight micro-batch's stage output until its
    # backward (and, in 16-bit, the received input, which the first norm copies to fp32).
    buffers = 0
    if stages > 1:
        buffers = (e * bsh if stage < stages - 1 else 0) + (e * bsh if stage > 0 and e != 4 else 0)
    last = stage == stages - 1
    # the chunked vocab-parallel loss (parallel.tensor_parallel): beyond the logits its
    # backward keeps (activations), the logits' gradient and two fp32 chunks at a time
    shard = micro_batch * positions * model.vocab / tp
    logits = e * shard + 2 * 4 * min(shard, LOSS_CHUNK_ELEMENTS) if last else 0.0
    bucket = reduction_bucket(params, dtype, zero_stage, dp, min(reduce_bucket, params) if overhead.touched_only else reduce_bucket)
    gathered = 0.0
    if zero_stage == 3:
        largest = max((c.params_per_rank for c in items), default=0)
        gathered = 2 * largest * e + PREFETCH_BUCKET_SIZE * e  # one layer's weights and grads, the prefetch
    raw = RankMemory(stage=stage, params=params, weights=params * per_param.weights,
                     grads=params * per_param.grads, optimizer=params * per_param.optimizer,
                     activations=(per_micro + buffers) * flight, act_per_micro_batch=per_micro, in_flight=flight,
                     logits=logits, bucket=bucket, gathered=gathered, framework=overhead.framework_bytes, margin=0.0)
    return RankMemory(**{**{f.name: getattr(raw, f.name) for f in fields(raw)}, "margin": overhead.margin * raw.total})
