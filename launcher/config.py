"""The run configuration: one YAML file -> typed, validated dataclasses.

Data path: `load_config(path, overrides)` reads the YAML, applies `section.key=value`
overrides, type-checks every value against the dataclass annotations below and runs the
checks that do not depend on the world size (`check_config`). World-size checks live in
`parallel.topology.resolve_layout`, the rest of what a launch checks in `launcher.preflight`.
Every mistake raises `ConfigError`, whose message is a single line naming the offending key;
the entry point prints it and exits with code 2. Any input ends that way, never in a
traceback or a hang (tests/test_config_fuzz.py): numbers are finite, integers fit 64 bits,
sizes that planning iterates over have upper bounds (`LIMITS`), YAML that is not UTF-8, too
deep or an alias graph ("billion laughs") is refused, and user text is escaped to one line.

Why not pydantic: its errors are multi-line tables and it has no "did you mean"; the
type-checking we need (scalars, literals, lists, nested dataclasses) is ~80 lines below.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import re
import reprlib
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
    """A configuration mistake, reported as one line: `<key>: <what was expected>`.

    Keys and values come from the user (a YAML key, an override as typed) and may hold line
    breaks or control characters: both parts are escaped so the report stays one line."""

    def __init__(self, key: str, message: str):
        self.key = _one_line(str(key)) or "''"
        self.message = _one_line(str(message))
        super().__init__(f"{self.key}: {self.message}")


def _one_line(text: str) -> str:
    """`text` with every non-printable character (line breaks, tabs, controls, unassigned
    code points) written as its escape, e.g. a newline as \\n."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 60, 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4
_SHOW_CHARS = 100


def _show(value: Any) -> str:
    """A short repr for messages: bounded for long strings, deep or aliased ("billion laughs")
    YAML structures, and integers too long for str() (Python refuses more than 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"a {'negative ' if value < 0 else ''}{value.bit_length()}-bit integer"
    text = _REPR.repr(value)
    return text if len(text) <= _SHOW_CHARS else text[:_SHOW_CHARS - 3] + "..."


# --------------------------------------------------------------------------------------
# Sections. Each field is documented where it is declared (type and default are in the
# annotation); derived numbers (data degree, gradient accumulation) are not stored here.
# --------------------------------------------------------------------------------------


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
    data: Union[int, Literal["auto"]] = "auto"
    """Data-parallel degree (dp); `auto` = world_size / (tensor * pipeline)."""
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
    activations stored once, not tensor times). `auto`: on when tensor > 1."""
    fused_projections: bool = True
    """q, k, v (and gate, up) as one matmul each. Off only to measure what it buys."""
    collective_timeout_s: float = 1800.0
    """A collective (or barrier) that waits longer than this fails: the survivors of a dead
    peer exit and the job can restart instead of hanging. 1 s to 1e7 s."""


def sequence_parallel_on(parallel: ParallelConfig, model: ModelConfig, tp: int) -> bool:
    """parallel.sequence_parallel resolved for tensor degree tp: `auto` is on when tp > 1 and
    the sequence splits evenly (true with an uneven split is refused when the config loads)."""
    return resolve_sequence_parallel(parallel.sequence_parallel, model.seq_len, tp)


def resolve_sequence_parallel(setting: Union[bool, str], seq_len: int, tp: int) -> bool:
    """The same from the setting's value (the planner resolves it for every candidate tp)."""
    if setting == "auto":
        return tp > 1 and seq_len % tp == 0
    return bool(setting) and tp > 1


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
    its gradients accumulate in fp32; else fp32), fp32 on CPU (launcher/precision.py)."""
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
    """`byte` (built in), or a Hugging Face tokenizer.json or a directory holding one. Prepared
    data must have been tokenized by the same tokenizer."""
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


INT64 = 2**63  # every integer ends up in an int64 (torch, numpy, DeepSpeed's C++ side)
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _finite_float(value: Any, key: str) -> float:
    """Every float in the config is a size, rate or time: nan and +-inf cannot train."""
    try:
        number = float(value)
    except OverflowError:
        raise ConfigError(key, f"expected a finite number, got {_show(value)} (too large for a float)") from None
    if not math.isfinite(number):
        raise ConfigError(key, f"expected a finite number, got {_show(value)}")
    return number


# The `deepspeed:` pass-through block becomes DeepSpeed's JSON config: a tree of mappings
# with string keys, lists and JSON scalars. Its size is bounded (DeepSpeed's own configs have
# a few dozen keys) so that a YAML alias graph ("billion laughs") is refused before anything
# walks it as a tree.
_DEEPSPEED_BLOCK_NODES = 10_000
_DEEPSPEED_BLOCK_DEPTH = 32


def _check_json_like(value: Any, key: str) -> None:
    budget = [_DEEPSPEED_BLOCK_NODES]
    open_nodes: set[int] = set()  # the containers on the path from the root: a YAML alias loop

    def walk(node: Any, path: str, depth: int) -> None:
        if id(node) in open_nodes:
            raise ConfigError(path, "contains itself (a YAML alias inside its own anchor)")
        budget[0] -= 1
        if budget[0] < 0:
            raise ConfigError(key, f"more than {_DEEPSPEED_BLOCK_NODES} values (YAML aliases repeated?): "
                              "a DeepSpeed config is a few dozen keys")
        if depth > _DEEPSPEED_BLOCK_DEPTH:
            raise ConfigError(path, f"nested more than {_DEEPSPEED_BLOCK_DEPTH} levels deep")
        if isinstance(node, (dict, list)):
            open_nodes.add(id(node))
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for k, v in items:
                if isinstance(node, dict) and not isinstance(k, str):
                    raise ConfigError(f"{path}.{_show(k)}", "DeepSpeed config keys must be strings (quote it)")
                walk(v, f"{path}.{k}" if isinstance(node, dict) else f"{path}[{k}]", depth + 1)
            open_nodes.discard(id(node))
        elif isinstance(node, float):
            _finite_float(node, path)
        elif isinstance(node, int) and not -INT64 <= node < INT64:
            raise ConfigError(path, f"{_show(node)} is out of range (a 64-bit integer)")
        elif node is not None and not isinstance(node, (str, int)):  # bool is an int
            raise ConfigError(path, f"expected a JSON value (mapping, list, string, number, true/false, null), "
                              f"got {_show(node)}")

    walk(value, key, 0)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return the typed value or raise."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arm, key)
            except ConfigError as err:
                errors.append(err)
        # The value has the right type for an arm but a wrong value (nan for a float): say so.
        specific = [e for e in errors if "finite" in e.message]
        if specific:
            raise specific[0]
        raise ConfigError(key, f"expected {_type_name(tp)}, got {_show(value)}")
    if origin is Literal:
        if type(value) in {type(a) for a in typing.get_args(tp)} and value in typing.get_args(tp):
            return value
        raise ConfigError(key, f"expected {_type_name(tp)}, got {_show(value)}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {_show(value)}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build_section(tp, value, key)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return _finite_float(value, key)  # PyYAML (YAML 1.1) reads `3e-4` as a string; accept what users mean
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
        raise ConfigError(key, f"expected {_type_name(tp)}, got {_show(value)}")
    if tp is int and not -INT64 <= value < INT64:
        raise ConfigError(key, f"{_show(value)} is out of range (a 64-bit integer)")
    if tp is dict:
        _check_json_like(value, key)
    return _finite_float(value, key) if tp is float else value


def _unknown_key(key: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
    return ConfigError(key, f"unknown key{hint}")


def _build_section(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(prefix or "<top level>", f"expected a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    names = [_yaml_name(f.name) for f in dataclasses.fields(cls)]
    values = {}
    for name, value in raw.items():
        shown = name if isinstance(name, str) else _show(name)  # YAML keys may be numbers, null, true
        key = f"{prefix}.{shown}" if prefix else shown
        field_name = f"{name}_" if isinstance(name, str) and keyword.iskeyword(name) else name
        if not isinstance(name, str) or field_name not in hints:
            raise _unknown_key(key, shown, names)
        values[field_name] = _coerce(value, hints[field_name], key)
    return cls(**values)


def _yaml_name(field_name: str) -> str:
    """A field named after a Python keyword (`async_`) is spelled without the underscore in YAML."""
    return field_name[:-1] if field_name.endswith("_") and keyword.iskeyword(field_name[:-1]) else field_name


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(text if text.strip() else repr(text), "an override must look like section.key=value")
    dotted, _, raw_value = text.partition("=")
    path = dotted.strip().split(".")
    if len(path) < 2 or not all(part.strip() for part in path):
        raise ConfigError(dotted if dotted.strip() else repr(text),
                          "an override must name section.key, e.g. parallel.tensor=2")
    path = [part.strip() for part in path]
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: an int of more than 4300 digits
        value = raw_value  # not YAML: take it as a plain string and let the type check judge
    return path, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set `section.key=value` strings (values parsed as YAML) into the raw mapping."""
    for text in overrides:
        path, value = _parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:  # absent, or an empty section (`model:` alone in the file)
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(path), f"'{part}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


MAX_CONFIG_BYTES = 1 << 20  # a config is a few kB; a larger file is the wrong file (a checkpoint, a corpus)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", f"file not found: {path}")
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError("--config", f"{path}: {path.stat().st_size:,} bytes is not a config file "
                              f"(at most {MAX_CONFIG_BYTES:,})")
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError("--config", f"{path}: cannot read it: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError("--config", f"{path}: not UTF-8 text (byte {err.start}, line {line})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError("--config", f"{path}: {problem}{where}") from None
    except RecursionError:
        raise ConfigError("--config", f"{path}: invalid YAML: nested too deeply") from None
    except ValueError as err:  # PyYAML's int(): more than 4300 digits
        raise ConfigError("--config", f"{path}: invalid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("--config", f"{path}: expected a mapping of sections at the top level, "
                          f"got {_show(raw)}")
    return raw


def config_from_dict(raw: dict) -> Config:
    cfg = _build_section(Config, raw, "")
    if isinstance(cfg.parallel.activation_checkpointing, bool):  # the older spelling
        cfg.parallel.activation_checkpointing = "full" if cfg.parallel.activation_checkpointing else "none"
    resolve_init_from(cfg, raw)
    resolve_vocab(cfg)
    check_config(cfg)
    return cfg


# The model keys `auto` reads from model.init_from's config.json (launcher/hf_weights.py).
AUTO_MODEL_KEYS = ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq_len", "rope_theta", "rope_scaling",
                   "norm_eps", "tie_embeddings")


def resolve_init_from(cfg: Config, raw: dict) -> None:
    """`model.init_from`: the model keys that are `auto` or left out take the directory's
    config.json values, a data.tokenizer left out its tokenizer.json. Without init_from,
    `auto` is an error (except model.vocab's, from the tokenizer)."""
    m = cfg.model
    if m.init_from is None:
        for name in AUTO_MODEL_KEYS:
            if name != "vocab" and getattr(m, name) == "auto":
                raise ConfigError(f"model.{name}", "auto reads a Hugging Face config.json: set model.init_from "
                                  "to the model directory, or give a value")
        return
    from launcher.hf_weights import hf_model_values

    if not m.init_from.strip():
        raise ConfigError("model.init_from", "empty: give a Hugging Face model directory, or null")
    values = hf_model_values(Path(m.init_from))
    given = raw.get("model") or {}
    hints = typing.get_type_hints(ModelConfig)
    for name in AUTO_MODEL_KEYS:
        if name not in given or getattr(m, name) == "auto":
            setattr(m, name, _coerce(values[name], hints[name], f"model.{name}"))
            if name == "vocab" and cfg.parallel.tensor != "auto":  # even vocabulary-parallel shards
                _positive("parallel.tensor", cfg.parallel.tensor)
                m.vocab = -(-m.vocab // cfg.parallel.tensor) * cfg.parallel.tensor
    if "tokenizer" not in (raw.get("data") or {}) and (Path(m.init_from) / "tokenizer.json").is_file():
        cfg.data.tokenizer = m.init_from


def resolve_vocab(cfg: Config) -> None:
    """`model.vocab: auto` -> the tokenizer's size padded for tensor parallelism."""
    if cfg.model.vocab != "auto":
        return
    from launcher.tokenizer import load_tokenizer, padded_vocab

    tp = 1 if cfg.parallel.tensor == "auto" else cfg.parallel.tensor  # auto picks a tp dividing the vocabulary
    _positive("parallel.tensor", tp)
    cfg.model.vocab = padded_vocab(load_tokenizer(cfg.data.tokenizer).vocab_size, tp)


def model_config(values: dict, key: str = "model") -> ModelConfig:
    """A ModelConfig from plain values (a checkpoint's fingerprint, a Hugging Face
    config.json's), type-checked as the config file's model section is."""
    return _build_section(ModelConfig, values, key)


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
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {_show(value)}")


# Upper bounds on the sizes that planning iterates over or multiplies out. Generous for
# real models up to ~1T parameters: Llama 3 405B has 126 layers, hidden 16384, ffn 53248,
# vocab 128256; Megatron-LM's 1T example 128 layers, hidden 25600, pp 64; Gemma's vocab is
# 256000; DeepNet trained 1000 layers. Beyond them a value is a typo (an extra digit), and
# the stage partitioner (a dynamic program over the 2 * layers + 3 pipeline items and the
# pp stages) would run for minutes to hours before saying anything.
LIMITS = {
    "model.layers": (1024, "DeepNet's 1000 layers are the deepest trained transformer"),
    "model.hidden": (1 << 17, "1T-parameter models use hidden 25600"),
    "model.ffn": (1 << 20, "8x the largest hidden size in use"),
    "model.vocab": (1 << 22, "the largest vocabularies in use have 256K entries"),
    "model.seq_len": (1 << 24, "16M tokens per sequence"),
    "parallel.pipeline": (256, "the largest published pipelines have 64-128 stages"),
    "parallel.global_batch": (1 << 24, "16M sequences per optimizer step"),
}
SEED_RANGE = 2**32  # numpy's legacy seed (np.random.seed) takes 0 <= seed < 2**32
MAX_FP16_SCALE_POWER = 64  # the loss scale starts at 2**this: DeepSpeed's default is 16
# A collective (or barrier) timeout: at least a second (the first barrier of a job takes
# longer than that), at most ~115 days (a wait that long is a hang, not a timeout; inf and
# far larger values overflow Python's timedelta, or int64 nanoseconds in C++).
TIMEOUT_RANGE_S = (1.0, 1e7)


def _at_most(key: str, value: int) -> None:
    limit, why = LIMITS[key]
    if value > limit:
        raise ConfigError(key, f"{_show(value)} is more than {limit:,}, the most this launcher plans for ({why}); "
                          "a typo?")


def check_config(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    for name in ("layers", "hidden", "heads", "ffn", "vocab", "seq_len"):
        _positive(f"model.{name}", getattr(m, name))
    for key in LIMITS:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) != "auto":
            _at_most(key, getattr(getattr(cfg, section), name))
    if m.rope_theta <= 1:
        raise ConfigError("model.rope_theta", f"must be > 1 (RoPE's frequencies are theta**(-i/d); Llama uses "
                          f"10000 or 500000), got {m.rope_theta}")
    _positive("model.norm_eps", m.norm_eps)
    _positive("model.init_std", m.init_std)
    if m.rope_scaling is not None:
        r = m.rope_scaling
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            _positive(f"model.rope_scaling.{name}", getattr(r, name))
        if r.high_freq_factor <= r.low_freq_factor:
            raise ConfigError("model.rope_scaling.high_freq_factor", f"{r.high_freq_factor} must be above "
                              f"low_freq_factor={r.low_freq_factor}")
    if m.kv_heads is not None:
        _positive("model.kv_heads", m.kv_heads)
    if m.hidden % m.heads:
        raise ConfigError("model.heads", f"hidden={m.hidden} is not divisible by heads={_show(m.heads)}")
    if m.head_dim % 2:
        raise ConfigError("model.heads", f"head_dim=hidden/heads={m.head_dim} must be even for RoPE")
    if m.heads % m.n_kv_heads:
        raise ConfigError("model.kv_heads", f"heads={m.heads} is not divisible by kv_heads={_show(m.n_kv_heads)}")

    for name in ("tensor", "pipeline", "micro_batch", "global_batch", "data"):
        if getattr(p, name) != "auto":
            _positive(f"parallel.{name}", getattr(p, name))
    tp = 1 if p.tensor == "auto" else p.tensor
    if p.sequence_parallel is True and tp > 1 and m.seq_len != "auto" and m.seq_len % tp:
        raise ConfigError("parallel.sequence_parallel", f"model.seq_len={m.seq_len} is not divisible by "
                          f"parallel.tensor={tp}: each tensor rank holds seq_len / tensor positions")
    for key, value in (("model.heads", m.heads), ("model.kv_heads", m.n_kv_heads),
                       ("model.ffn", m.ffn), ("model.vocab", m.vocab)):
        if value % tp:
            raise ConfigError(key, f"{key.split('.')[1]}={value} is not divisible by parallel.tensor={_show(tp)}")
    if p.pipeline != "auto" and m.layers < p.pipeline:
        raise ConfigError("parallel.pipeline",
                          f"pipeline={p.pipeline} stages but only model.layers={m.layers} layers")
    if p.micro_batch != "auto" and p.micro_batch > p.global_batch:
        raise ConfigError("parallel.micro_batch", f"micro_batch={_show(p.micro_batch)} is more than "
                          f"parallel.global_batch={p.global_batch}")
    if p.partition not in ("balanced", "uniform", "parameters") and not p.partition.startswith("type:"):
        raise ConfigError("parallel.partition",
                          f"expected balanced, uniform, parameters or type:<regex>, got {_show(p.partition)}")
    if p.partition.startswith("type:"):
        try:
            re.compile(p.partition[len("type:"):])
        except (re.error, RecursionError, OverflowError) as err:
            raise ConfigError("parallel.partition", f"type:<regex>: not a regular expression: {err}") from None
    low, high = TIMEOUT_RANGE_S
    if not low <= p.collective_timeout_s <= high:
        raise ConfigError("parallel.collective_timeout_s", f"expected {low:g} to {high:g} seconds, got "
                          f"{p.collective_timeout_s:g}")
    if p.stage_memory_gb is not None:
        _positive("parallel.stage_memory_gb", p.stage_memory_gb)
    if p.pipeline != "auto" and p.pipeline > 1 and cfg.zero.stage > 1:
        raise ConfigError("zero.stage", f"ZeRO stage {cfg.zero.stage} cannot be used with parallel.pipeline="
                          f"{p.pipeline}: DeepSpeed's pipeline engine supports ZeRO 0 or 1")
    power = cfg.precision.fp16_initial_scale_power
    if not 0 <= power <= MAX_FP16_SCALE_POWER:
        raise ConfigError("precision.fp16_initial_scale_power", f"expected 0 to {MAX_FP16_SCALE_POWER} (the loss "
                          f"scale starts at 2**power; DeepSpeed's default is 16), got {_show(power)}")

    check_compression(cfg)
    if cfg.zero.offload_optimizer and cfg.zero.stage == 0:
        raise ConfigError("zero.offload_optimizer", "needs zero.stage 1, 2 or 3 (DeepSpeed offloads ZeRO's "
                          "optimizer partitions)")
    if cfg.zero.offload_optimizer and cfg.compression.method == "powersgd":
        raise ConfigError("zero.offload_optimizer", "cannot be combined with compression.method=powersgd (its "
                          "reduction writes into ZeRO's device-side gradient buffers)")

    o = cfg.optimizer
    _positive("optimizer.lr", o.lr)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError("optimizer.betas", f"expected two numbers in [0, 1), got {_show(o.betas)}")
    _positive("optimizer.eps", o.eps)
    _positive("optimizer.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optimizer.grad_clip", o.grad_clip, allow_zero=True)
    _positive("schedule.min_lr", cfg.schedule.min_lr, allow_zero=True)
    if cfg.schedule.min_lr > o.lr:
        raise ConfigError("schedule.min_lr", f"min_lr={cfg.schedule.min_lr} is above optimizer.lr={o.lr}")

    t = cfg.train
    _positive("train.steps", t.steps, allow_zero=True)
    _positive("schedule.warmup_steps", cfg.schedule.warmup_steps, allow_zero=True)
    if cfg.schedule.warmup_steps > t.steps > 0:
        # The learning rate would never reach optimizer.lr and the cosine decay never start.
        raise ConfigError("schedule.warmup_steps", f"warmup_steps={_show(cfg.schedule.warmup_steps)} is longer "
                          f"than the run (train.steps={_show(t.steps)}): lower it (0 = no warm-up) or train longer")
    # log_every, eval_every and checkpoint.every may exceed the run: the last step is always
    # logged, evaluated (eval_every > 0) and checkpointed.
    _positive("train.log_every", t.log_every)
    _positive("train.eval_every", t.eval_every, allow_zero=True)
    _positive("train.eval_batches", t.eval_batches)
    if not 0 <= t.seed < SEED_RANGE:
        raise ConfigError("train.seed", f"expected 0 <= seed < 2**32 (numpy's seed range), got {_show(t.seed)}")
    _positive("checkpoint.every", cfg.checkpoint.every, allow_zero=True)
    _positive("checkpoint.keep_last", cfg.checkpoint.keep_last)
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "required", "none") and (not resume.strip() or not Path(resume).is_dir()):
        raise ConfigError("checkpoint.resume", f"expected auto, required, none or a checkpoint directory; "
                          f"not found: {resume}")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError("data.val_fraction", f"expected a number in (0, 1), got {cfg.data.val_fraction}")
    check_data_sources(cfg.data)
    if cfg.logging.peak_tflops is not None:
        _positive("logging.peak_tflops", cfg.logging.peak_tflops)
    if not cfg.run.name.strip():
        raise ConfigError("run.name", "must not be empty (the run directory is runs/<name>)")
    check_vocab_covers_tokenizer(cfg)


# launcher.data.Blend's schedule needs BLEND_BLOCK / sources >= sources (its quotas stay >= 0).
MAX_DATA_SOURCES = 256


def check_data_sources(data: DataConfig) -> None:
    """The shape of `data.path` / `data.sources` (what the directories hold is checked at
    launch: launcher.preflight.check_data)."""
    for key, value in (("data.path", data.path), ("data.val_path", data.val_path)):
        if value is not None and not value.strip():
            raise ConfigError(key, "must not be empty (null = the default)")
    if not data.sources:
        return
    if data.path is not None:
        raise ConfigError("data.path", "set either data.path (one dataset) or data.sources (a blend), not both")
    if len(data.sources) > MAX_DATA_SOURCES:
        raise ConfigError("data.sources", f"{len(data.sources)} sources; at most {MAX_DATA_SOURCES} are supported")
    seen = set()
    for i, source in enumerate(data.sources):
        if not source.path.strip():
            raise ConfigError(f"data.sources[{i}].path", "must name a prepared directory")
        if source.path in seen:
            raise ConfigError(f"data.sources[{i}].path", f"{_show(source.path)} is listed twice; give it one weight")
        seen.add(source.path)
        _positive(f"data.sources[{i}].weight", source.weight)


def check_vocab_covers_tokenizer(cfg: Config) -> None:
    from launcher.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if cfg.model.vocab < tokenizer.vocab_size:
        raise ConfigError("model.vocab", f"{cfg.model.vocab} does not cover the {tokenizer.vocab_size:,} tokens of "
                          f"data.tokenizer={_show(cfg.data.tokenizer)}: raise it, or set model.vocab: auto")


def check_compression(cfg: Config) -> None:
    c = cfg.compression
    if c.method != "powersgd":
        return
    _positive("compression.rank", c.rank)
    # warmup_steps may exceed train.steps: the whole run then takes the exact reduction through
    # our PowerSGD path (tests compare it with DeepSpeed's own reduction that way).
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
