"""The run configuration: one YAML file -> typed, validated dataclasses.

Data path: `load_config(path, overrides)` reads the YAML, applies `section.key=value`
overrides, type-checks every value against the dataclass annotations below and runs the
checks that do not depend on the world size (`check_config`). World-size checks live in
`parallel.topology.resolve_layout`. Every mistake raises `ConfigError`, whose message is a
single line naming the offending key; the entry point prints it and exits with code 2.

Why not pydantic: its errors are multi-line tables and it has no "did you mean"; the
type-checking we need (scalars, literals, lists, nested dataclasses) is ~80 lines below.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

# Exit codes of `python -m launcher.train` (docs/CHECKPOINTS.md): 0 only when training reached
# its last step; 1 an unexpected failure (worth a retry); 2 a configuration or usage error
# (never worth a retry); 75 a checkpoint was saved after SIGTERM/SIGUSR1: requeue to continue.
EXIT_OK = 0
EXIT_FAILURE = 1
CONFIG_ERROR_EXIT_CODE = 2
EXIT_REQUEUE = 75  # EX_TEMPFAIL in sysexits.h: "temporary failure, try again later"


class ConfigError(Exception):
    """A configuration mistake, reported as one line: `<key>: <what was expected>`."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


# --------------------------------------------------------------------------------------
# Sections. Each field is documented where it is declared (type and default are in the
# annotation); derived numbers (data degree, gradient accumulation) are not stored here.
# --------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    layers: int = 4
    """Number of transformer blocks."""
    hidden: int = 128
    """Model width (embedding size)."""
    heads: int = 4
    """Attention (query) heads; head_dim = hidden / heads."""
    kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention; null means = heads (plain MHA)."""
    ffn: int = 344
    """Hidden size of the SwiGLU feed-forward block."""
    vocab: int = 256
    """Vocabulary size (256 for the embedded byte-level tokenizer)."""
    seq_len: int = 128
    """Training sequence length in tokens."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head (DeepSpeed TiedLayerSpec across stages)."""
    init_std: float = 0.02
    """Std of the normal init; output projections use init_std / sqrt(2 * layers)."""

    @property
    def n_kv_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel degree (tp). Innermost axis: a tp group stays inside a node."""
    pipeline: int = 1
    """Pipeline-parallel degree (pp). Outermost axis."""
    data: Union[int, Literal["auto"]] = "auto"
    """Data-parallel degree (dp); `auto` = world_size / (tensor * pipeline)."""
    micro_batch: int = 1
    """Sequences per micro-batch on one data-parallel rank."""
    global_batch: int = 8
    """Sequences per optimizer step over all data-parallel ranks.
    Gradient accumulation = global_batch / (micro_batch * dp)."""
    partition: str = "balanced"
    """Pipeline stage split: `balanced` (ours: exact min-max FLOPs over half-blocks, with the
    memory cap below), or DeepSpeed's `uniform`, `parameters`, `type:<regex>`."""
    stage_memory_gb: Optional[float] = None
    """Memory cap per pipeline stage for `balanced` (weights, grads, optimizer state and
    in-flight activations, as estimated by parallel.costs); null = no cap."""
    activation_checkpointing: bool = False
    """Recompute each pipeline item's activations in the backward pass."""
    collective_timeout_s: float = 1800.0
    """A collective (or barrier) that waits longer than this fails: the survivors of a dead
    peer exit and the job can restart instead of hanging."""


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "lion"] = "adamw"
    """Optimizer."""
    lr: float = 1e-3
    """Peak learning rate (reached at the end of warm-up)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam/Lion betas (two numbers)."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class ScheduleConfig:
    warmup_steps: int = 10
    """Linear warm-up from 0 to optimizer.lr."""
    min_lr: float = 1e-4
    """Cosine decay ends at this learning rate, at the last training step."""


@dataclass
class PrecisionConfig:
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute dtype: `auto` = bf16 on GPU, fp32 on CPU."""
    fp16_initial_scale_power: int = 16
    """fp16 only: the dynamic loss scale starts at 2**this."""


@dataclass
class ZeroConfig:
    stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage. With pipeline > 1 only 0 and 1 (DeepSpeed's pipeline engine)."""


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
class DataConfig:
    path: str = "embedded"
    """`embedded` (the corpus shipped in the repo) or a path to a UTF-8 text file."""
    tokenizer: Literal["byte"] = "byte"
    """Byte-level tokenizer: vocabulary of 256, nothing to download."""
    val_fraction: float = 0.05
    """Share of the corpus held out for validation."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to run."""
    seed: int = 1234
    """Seed for initialization and data order."""
    log_every: int = 10
    """Log metrics every this many steps."""
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
    """(YAML key `async`) Flush, checksum and publish checkpoints in the background while
    training goes on; same atomicity."""


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
    """Console log level (rank 0)."""
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


# --------------------------------------------------------------------------------------
# Loading: YAML + overrides -> typed dataclasses
# --------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a mapping"}.get(tp, str(tp))


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return the typed value or raise."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            if arm is type(None) and value is None:
                return None
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build_section(tp, value, key)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # PyYAML (YAML 1.1) reads `3e-4` as a string; accept what users mean
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
    }.get(tp)
    if ok is None:
        raise TypeError(f"unsupported annotation {tp} for {key}")
    if not ok:
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def _unknown_key(key: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
    return ConfigError(key, f"unknown key{hint}")


def _build_section(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(prefix or "<top level>", f"expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [_yaml_name(f.name) for f in dataclasses.fields(cls)]
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        field_name = f"{name}_" if keyword.iskeyword(str(name)) else name
        if field_name not in hints:
            raise _unknown_key(key, str(name), names)
        values[field_name] = _coerce(value, hints[field_name], key)
    return cls(**values)


def _yaml_name(field_name: str) -> str:
    """A field named after a Python keyword (`async_`) is spelled without the underscore in YAML."""
    return field_name[:-1] if field_name.endswith("_") and keyword.iskeyword(field_name[:-1]) else field_name


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(text, "an override must look like section.key=value")
    dotted, _, raw_value = text.partition("=")
    path = dotted.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(dotted, "an override must name section.key, e.g. parallel.tensor=2")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError:
        value = raw_value  # not YAML: take it as a plain string and let the type check judge
    return path, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set `section.key=value` strings (values parsed as YAML) into the raw mapping."""
    for text in overrides:
        path, value = _parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(path), f"'{part}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", f"file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError("--config", f"{path}: {problem}{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("--config", f"{path}: expected a mapping of sections at the top level")
    return raw


def config_from_dict(raw: dict) -> Config:
    cfg = _build_section(Config, raw, "")
    check_config(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read, override, type-check and validate a config (world-size checks come later)."""
    raw = apply_overrides(read_yaml(path), list(overrides))
    return config_from_dict(raw)


def config_to_dict(cfg: Config) -> dict:
    def rename(node):
        if isinstance(node, dict):
            return {_yaml_name(k): rename(v) for k, v in node.items()}
        return node

    return rename(dataclasses.asdict(cfg))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------
# Checks that need no world size
# --------------------------------------------------------------------------------------


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_config(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    for name in ("layers", "hidden", "heads", "ffn", "vocab", "seq_len"):
        _positive(f"model.{name}", getattr(m, name))
    _positive("model.rope_theta", m.rope_theta)
    _positive("model.norm_eps", m.norm_eps)
    if m.kv_heads is not None:
        _positive("model.kv_heads", m.kv_heads)
    if m.hidden % m.heads:
        raise ConfigError("model.heads", f"hidden={m.hidden} is not divisible by heads={m.heads}")
    if m.head_dim % 2:
        raise ConfigError("model.heads", f"head_dim=hidden/heads={m.head_dim} must be even for RoPE")
    if m.heads % m.n_kv_heads:
        raise ConfigError("model.kv_heads", f"heads={m.heads} is not divisible by kv_heads={m.n_kv_heads}")

    for name in ("tensor", "pipeline", "micro_batch", "global_batch"):
        _positive(f"parallel.{name}", getattr(p, name))
    if p.data != "auto":
        _positive("parallel.data", p.data)
    tp = p.tensor
    for key, value in (("model.heads", m.heads), ("model.kv_heads", m.n_kv_heads),
                       ("model.ffn", m.ffn), ("model.vocab", m.vocab)):
        if value % tp:
            raise ConfigError(key, f"{key.split('.')[1]}={value} is not divisible by parallel.tensor={tp}")
    if m.layers < p.pipeline:
        raise ConfigError("parallel.pipeline",
                          f"pipeline={p.pipeline} stages but only model.layers={m.layers} layers")
    if p.partition not in ("balanced", "uniform", "parameters") and not p.partition.startswith("type:"):
        raise ConfigError("parallel.partition",
                          f"expected balanced, uniform, parameters or type:<regex>, got {p.partition!r}")
    _positive("parallel.collective_timeout_s", p.collective_timeout_s)
    if p.stage_memory_gb is not None:
        _positive("parallel.stage_memory_gb", p.stage_memory_gb)
    if p.pipeline > 1 and cfg.zero.stage > 1:
        raise ConfigError("zero.stage", f"ZeRO stage {cfg.zero.stage} cannot be used with parallel.pipeline="
                          f"{p.pipeline}: DeepSpeed's pipeline engine supports ZeRO 0 or 1")

    check_compression(cfg)

    o = cfg.optimizer
    _positive("optimizer.lr", o.lr)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError("optimizer.betas", f"expected two numbers in [0, 1), got {o.betas}")
    _positive("optimizer.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optimizer.grad_clip", o.grad_clip, allow_zero=True)
    _positive("schedule.warmup_steps", cfg.schedule.warmup_steps, allow_zero=True)
    _positive("schedule.min_lr", cfg.schedule.min_lr, allow_zero=True)
    if cfg.schedule.min_lr > o.lr:
        raise ConfigError("schedule.min_lr", f"min_lr={cfg.schedule.min_lr} is above optimizer.lr={o.lr}")

    t = cfg.train
    _positive("train.steps", t.steps)
    _positive("train.log_every", t.log_every)
    _positive("train.eval_every", t.eval_every, allow_zero=True)
    _positive("train.eval_batches", t.eval_batches)
    _positive("checkpoint.every", cfg.checkpoint.every, allow_zero=True)
    _positive("checkpoint.keep_last", cfg.checkpoint.keep_last)
    if cfg.checkpoint.resume not in ("auto", "required", "none") and not Path(cfg.checkpoint.resume).is_dir():
        raise ConfigError("checkpoint.resume", f"expected auto, required, none or a checkpoint directory; "
                          f"not found: {cfg.checkpoint.resume}")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError("data.val_fraction", f"expected a number in (0, 1), got {cfg.data.val_fraction}")
    if cfg.data.path != "embedded" and not Path(cfg.data.path).is_file():
        raise ConfigError("data.path", f"file not found: {cfg.data.path}")
    if cfg.logging.peak_tflops is not None:
        _positive("logging.peak_tflops", cfg.logging.peak_tflops)
    if cfg.data.tokenizer == "byte" and m.vocab < 256:
        raise ConfigError("model.vocab", f"the byte tokenizer needs vocab >= 256, got {m.vocab}")


def check_compression(cfg: Config) -> None:
    c = cfg.compression
    if c.method != "powersgd":
        return
    _positive("compression.rank", c.rank)
    _positive("compression.warmup_steps", c.warmup_steps, allow_zero=True)
    _positive("compression.min_compression_rate", c.min_compression_rate)
    if cfg.zero.stage > 1:
        raise ConfigError("compression.method", f"powersgd cannot be used with zero.stage={cfg.zero.stage}: ZeRO 2/3 "
                          "reduce-scatter each gradient inside backward, so there is no whole-gradient all-reduce to "
                          "compress; use ZeRO 0/1, or compression.method fp16/bf16")
    if cfg.precision.dtype == "fp16":
        raise ConfigError("compression.method", "powersgd cannot be used with precision.dtype=fp16: the gradients "
                          "carry the dynamic loss scale and overflow on skipped steps, which error feedback would "
                          "keep adding back; use bf16 or fp32")
