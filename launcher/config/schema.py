"""The run configuration's declarations: one dataclass per YAML section, nothing else.

Each field is documented where it is declared (type and default are in the annotation);
derived numbers (data degree, gradient accumulation) are not stored here
(launcher/config/derived.py, parallel/layout.py). Parsing is launcher/config/coerce.py and
load.py, `auto` resolution resolve.py, the checks checks.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union


@dataclass
class RopeScaling:
    """Llama 3.1's RoPE frequency scaling (`rope_type: llama3` in a Hugging Face config.json):
    wavelengths longer than original_max_position_embeddings / low_freq_factor are stretched
    by `factor`, those shorter than original_max_position_embeddings / high_freq_factor are
    kept, and the ones between are interpolated smoothly."""

    rope_type: Literal["llama3"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class MoEConfig:
    """Mixture of Experts in place of the dense feed-forward block (docs/MOE.md): a router
    picks `top_k` of `experts` small SwiGLU experts per token, `shared_experts` see every token."""

    experts: int = 8
    """Routed experts per MoE layer."""
    top_k: int = 2
    """Experts each token is sent to (1 to experts)."""
    shared_experts: int = 0
    """Experts every token goes through, each of width `ffn` (0: none, as Mixtral)."""
    ffn: int = 344
    """Each expert's hidden size (fine-grained experts are small: DeepSeekMoE uses 1408)."""
    first_dense: int = 0
    """The first N layers keep the dense feed-forward block of width model.ffn."""
    router: Literal["softmax", "sigmoid"] = "softmax"
    """`softmax` (Mixtral: softmax over all experts, the top-k weights renormalised to sum 1)
    or `sigmoid` (DeepSeek-V3: a sigmoid score per expert, the top-k scores normalised to sum 1)."""
    balance: Literal["aux_loss", "bias", "none"] = "aux_loss"
    """`aux_loss` (Switch/GShard: coefficient x experts x sum_e load_e x mean score_e, added to the
    loss) or `bias` (DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias added to the
    scores for the choice only, moved by bias_rate towards even load after every step)."""
    aux_loss_coef: float = 0.01
    """`aux_loss` only: its weight against the language-model loss (>= 0)."""
    bias_rate: float = 0.001
    """`bias` only: how far each expert's bias moves per optimizer step (>= 0)."""
    capacity_factor: Optional[float] = None
    """null: dropless (every token reaches its top_k experts). A number > 0: an expert takes at
    most ceil(capacity_factor x tokens x top_k / experts) tokens of a micro-batch, the rest of
    its assignments are dropped (counted and logged)."""


@dataclass
class ModelConfig:
    init_from: Optional[str] = None
    """A Hugging Face Llama directory (config.json, *.safetensors) whose weights start the
    run, in any tp x pp layout (continued pre-training / fine-tuning: fresh optimizer, step
    0). The keys below marked (auto) may be `auto`, and are `auto` when left out: read from
    its config.json. data.tokenizer, when left out, becomes the directory's tokenizer.json.
    A resume loads its checkpoint instead (docs/INTEROP.md)."""
    layers: Union[int, Literal["auto"]] = 4
    """Number of transformer blocks. (auto)"""
    hidden: Union[int, Literal["auto"]] = 128
    """Model width (embedding size). (auto)"""
    heads: Union[int, Literal["auto"]] = 4
    """Attention (query) heads; head_dim = hidden / heads. (auto)"""
    kv_heads: Union[int, None, Literal["auto"]] = None
    """Key/value heads for grouped-query attention; null means = heads (plain MHA). (auto)"""
    ffn: Union[int, Literal["auto"]] = 344
    """Hidden size of the SwiGLU feed-forward block. (auto)"""
    vocab: Union[int, Literal["auto"]] = 256
    """Vocabulary size: at least the tokenizer's (256 for the byte tokenizer); `auto` = the
    tokenizer's size rounded up to a multiple of 128 x parallel.tensor (even vocabulary-
    parallel shards, tensor-core-friendly), resolved when the config is loaded; with
    init_from, config.json's vocab_size rounded up to a multiple of parallel.tensor only
    (the added rows start at zero and export trims them). (auto)"""
    seq_len: Union[int, Literal["auto"]] = 128
    """Training sequence length in tokens. (auto: max_position_embeddings)"""
    rope_theta: Union[float, Literal["auto"]] = 10000.0
    """RoPE base frequency (> 1). (auto)"""
    rope_scaling: Union[None, RopeScaling, Literal["auto"]] = None  # None first: null is no scaling
    """null (plain RoPE), or Llama 3.1's scaled frequencies: {rope_type: llama3, factor,
    low_freq_factor, high_freq_factor, original_max_position_embeddings}. (auto)"""
    norm_eps: Union[float, Literal["auto"]] = 1e-5
    """RMSNorm epsilon. (auto)"""
    tie_embeddings: Union[bool, Literal["auto"]] = False
    """Share the input embedding with the output head (DeepSpeed TiedLayerSpec across stages). (auto)"""
    init_std: float = 0.02
    """Std of the normal init (> 0); output projections use init_std / sqrt(2 * layers)."""
    moe: Union[None, MoEConfig] = None  # None first: null is a dense model
    """Mixture of Experts (docs/MOE.md); absent or null: every layer dense."""
    compile: bool = False
    """Run each transformer block's local compute (norms, attention core, projections)
    through torch.compile (inductor: CUDA, or CPU with a C++ compiler); the tensor-parallel
    collectives stay outside the compiled regions. Off until measured to pay for its
    compile time on your model (bench/step.py). Not part of what a resume compares."""

    @property
    def n_kv_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class ParallelConfig:
    tensor: Union[int, Literal["auto"]] = 1
    """Tensor-parallel degree (tp). Innermost axis: a tp group stays inside a node. `auto`:
    chosen at launch by the planner (python -m launcher.plan) for the world and device."""
    pipeline: Union[int, Literal["auto"]] = 1
    """Pipeline-parallel degree (pp). Outermost axis. `auto`: chosen by the planner."""
    expert: Union[int, Literal["auto"]] = "auto"
    """Expert-parallel degree (model.moe): the experts are split over the tensor ranks and then
    over consecutive data ranks, so it is `tensor` x a divisor of `data`. `auto`: chosen by the
    planner among those whose expert group fits a node. A dense model: 1 or auto.
    docs/MOE.md has the rank layout."""
    context: Union[int, Literal["auto"]] = 1
    """Context-parallel degree (cp): each sequence is cut into 2 cp chunks and context rank i
    holds chunks i and 2 cp - 1 - i; attention gathers the keys and values of the whole
    sequence over the cp ranks. Between tp and dp in the rank order. `auto`: 1 when a layout
    fits without it, else the planner's fastest that fits. docs/CONTEXT.md."""
    data: Union[int, Literal["auto"]] = "auto"
    """Data-parallel degree (dp); `auto` = world_size / (tensor * pipeline * context)."""
    micro_batch: Union[int, Literal["auto"]] = 1
    """Sequences per micro-batch on one data-parallel rank. `auto`: chosen by the planner."""
    global_batch: int = 8
    """Sequences per optimizer step over all data-parallel ranks.
    Gradient accumulation = global_batch / (micro_batch * dp)."""
    partition: str = "balanced"
    """Pipeline stage split: `balanced` (ours: exact min-max FLOPs over half-blocks, with the
    memory cap below), or DeepSpeed's `uniform`, `parameters`, `type:<regex>`."""
    stage_memory_gb: Optional[float] = None
    """Memory cap per pipeline stage for `balanced` (weights, grads, optimizer state and
    in-flight activations, as estimated by parallel.costs); null = no cap."""
    activation_checkpointing: Union[bool, Literal["none", "selective", "full", "auto"]] = "none"
    """What the backward pass recomputes instead of keeping. `none`; `selective`: each norm
    and the attention core (RoPE, SDPA), the activations that are large for their compute;
    `full`: every pipeline item from its input (about a third more compute); `auto`: the
    planner picks the least that fits. `true` / `false` mean full / none."""
    sequence_parallel: Union[bool, Literal["auto"]] = "auto"
    """Split the residual stream and the norms along the sequence over the tensor group
    between blocks (all-gather / reduce-scatter instead of all-reduce: the same bytes
    forward, and half again backward, which gathers each block input again; those
    activations stored once, not tensor times). `auto`: decided at launch for the device
    (launcher/planning/effective.py): on with tensor > 1 on GPUs (NCCL), off on CPU (gloo,
    where it is slower) unless the layout fits only with it."""
    fused_projections: bool = True
    """q, k, v (and gate, up) as one matmul each. Off only to measure what it buys."""
    collective_timeout_s: float = 1800.0
    """A collective (or barrier) that waits longer than this fails: the survivors of a dead
    peer exit and the job can restart instead of hanging. 1 s to 1e7 s."""


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "lion"] = "adamw"
    """Optimizer."""
    lr: float = 1e-3
    """Peak learning rate (reached at the end of warm-up)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam/Lion betas (two numbers)."""
    eps: float = 1e-8
    """Adam epsilon (> 0)."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class ScheduleConfig:
    warmup_steps: int = 10
    """Linear warm-up from 0 to optimizer.lr; at most train.steps."""
    min_lr: float = 1e-4
    """Cosine decay ends at this learning rate, at the last training step."""


@dataclass
class PrecisionConfig:
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute dtype: `auto` = bf16 on a GPU that has it (with ZeRO >= 1 or a pipeline, where
    its gradients accumulate in fp32; else fp32), fp32 on CPU (launcher/planning/precision.py)."""
    fp16_initial_scale_power: int = 16
    """fp16 only: the dynamic loss scale starts at 2**this (0 to 64)."""


@dataclass
class ZeroConfig:
    stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage. With pipeline > 1 only 0 and 1 (DeepSpeed's pipeline engine)."""
    offload_optimizer: bool = False
    """Keep the optimizer (fp32 master weights, moments, fp32 gradient partition) in host
    memory and step it on the CPU (DeepSpeed's offload_optimizer): frees 12-16 bytes per
    parameter / dp of device memory for PCIe traffic and CPU time each step (python -m
    launcher.plan prices both). ZeRO 1-3. The optimizer is the config's own (torch AdamW or
    Lion) run on the CPU, not DeepSpeed's compiled CPU Adam."""


@dataclass
class CompressionConfig:
    method: Literal["none", "fp16", "bf16", "powersgd"] = "none"
    """Compression of the data-parallel gradient reduction (docs/COMPRESSION.md):
    `none` DeepSpeed's reduction as is; `fp16` / `bf16` DeepSpeed reduces in that dtype
    (its `communication_data_type`); `powersgd` low-rank PowerSGD with error feedback, our
    reduction in place of DeepSpeed's (ZeRO 0/1, any tensor/pipeline degree)."""
    rank: int = 4
    """powersgd: rank of the approximation of each gradient matrix (bytes grow linearly)."""
    warmup_steps: int = 100
    """powersgd: optimizer steps reduced exactly before compression starts (torch's advice:
    about 10% of the run, and no less than the learning-rate warm-up)."""
    error_feedback: bool = True
    """powersgd: add what compression dropped on this rank to its next gradient."""
    min_compression_rate: float = 2.0
    """powersgd: reduce a matrix exactly when rank-r factors would not be this many times
    smaller (small or thin matrices; vectors are always reduced exactly)."""


@dataclass
class DataSource:
    path: str = ""
    """A directory written by `python -m launcher.prepare`."""
    weight: float = 1.0
    """Relative share of the training samples drawn from it (> 0; normalised over sources)."""


@dataclass
class DataConfig:
    path: Optional[str] = None
    """A directory written by `python -m launcher.prepare`, or `embedded` (the Python reference
    topics shipped in the repo); null = embedded, unless `sources` is set."""
    sources: list[DataSource] = field(default_factory=list)
    """Several prepared directories blended by weight, e.g. [{path: web, weight: 3},
    {path: code, weight: 1}] (instead of `path`); docs/DATA.md."""
    tokenizer: str = "byte"
    """`byte` (built in), a Hugging Face tokenizer.json, a SentencePiece tokenizer.model, or a
    directory holding one (tokenizer.json first). Prepared data must have been tokenized by
    the same tokenizer."""
    val_fraction: float = 0.05
    """Share of each dataset's documents held out for validation (unused with `val_path`)."""
    val_path: Optional[str] = None
    """A prepared directory to validate on instead (training then uses all documents)."""
    document_attention: bool = False
    """Keep attention inside each packed document and restart positions at its start
    (boundaries from the prepared index); otherwise documents attend across boundaries,
    separated by the end-of-document token (the GPT-NeoX/Megatron default)."""
    eod_mask_loss: bool = False
    """No loss where the input is a document's last token (predicting the next document's
    first token from the previous one's text)."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to run. 0: save the starting weights (e.g. model.init_from's) as
    checkpoint step 0 and exit, a conversion into this layout."""
    seed: int = 1234
    """Seed for initialization and data order (0 <= seed < 2**32)."""
    log_every: int = 10
    """Log metrics every this many steps (and at the last step)."""
    eval_every: int = 50
    """Validation loss every this many steps (and at the last step); 0 disables it."""
    eval_batches: int = 4
    """Global batches of held-out data per validation (a fixed, shuffled set)."""


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """Checkpoint directory; null = <run.dir>/checkpoints."""
    every: int = 0
    """Save every this many steps; 0 = only at the end."""
    keep_last: int = 2
    """Number of complete checkpoints to keep (the newest is never removed before a newer
    one is complete)."""
    resume: str = "auto"
    """`auto`: continue from the newest checkpoint that verifies, else start fresh;
    `required`: the same, but exit 2 when none verifies; `none`: start fresh (refused when
    the checkpoint directory holds checkpoints, unless `overwrite`); or a checkpoint path."""
    overwrite: bool = False
    """With resume: none, delete existing checkpoints and start over."""
    async_: bool = False
    """(YAML key `async`) Flush and publish checkpoints in the background while training
    goes on (files are written and hashed in the loop); same atomicity."""


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "disabled"
    """wandb logging mode."""
    project: str = "launcher"
    """wandb project."""
    entity: Optional[str] = None
    """wandb entity (team or user); null = your default."""
    name: Optional[str] = None
    """wandb run name; null = run.name."""
    tags: list[str] = field(default_factory=list)
    """wandb tags."""


@dataclass
class LoggingConfig:
    level: Literal["debug", "info", "warning"] = "info"
    """Console log level (rank 0); `debug` also shows DeepSpeed's memory reports at start."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases."""
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s of one device for MFU; null = from a table (A100, H100, H200 bf16)."""
    time_breakdown: bool = False
    """Log DeepSpeed's forward/backward/optimizer (and pipeline send/recv) timers per step.
    Adds device synchronisations: for profiling runs."""
    comm_bytes: bool = False
    """Count the bytes each rank hands to data-parallel collectives (gradient reduction and
    ZeRO's parameter all-gather) and log them per step (parallel/comm_bytes.py)."""


@dataclass
class RunConfig:
    name: str = "default"
    """Run name."""
    dir: Optional[str] = None
    """Run directory; null = runs/<name>."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    deepspeed: dict = field(default_factory=dict)
    """Extra DeepSpeed config keys passed through; a key that contradicts a generated one
    is an error."""
