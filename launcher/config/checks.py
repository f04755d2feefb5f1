"""The checks of a typed config that need no world size: each value in range, and the
values of a config consistent with each other.

`check_config` runs them section by section, in a fixed order: the first failing check is
the error reported, as one `ConfigError` line naming the key (the entry point prints it and
exits with code 2). Checks that need the world size live in parallel/layout.py
(`resolve_layout`); the rest of what a launch checks (data directories, output directories,
the device) in launcher/training/preflight.py. Any input ends in a config that passes or in
one such line, never a traceback or a hang (tests/test_config_fuzz.py): the sizes that
planning iterates over have upper bounds (`LIMITS`), so a typo cannot run the stage
partitioner for hours.
"""

from __future__ import annotations

import re
from pathlib import Path

from launcher.config.schema import Config, DataConfig, ModelConfig
from launcher.errors import ConfigError, show_value


def check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {show_value(value)}")


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
    "model.moe.experts": (1 << 12, "the largest published MoE models route over 256-384 experts"),
    "model.moe.shared_experts": (1 << 6, "DeepSeek's models use 1 or 2"),
    "model.moe.ffn": (1 << 20, "8x the largest hidden size in use"),
    "parallel.pipeline": (256, "the largest published pipelines have 64-128 stages"),
    "parallel.global_batch": (1 << 24, "16M sequences per optimizer step"),
}
SEED_RANGE = 2**32  # numpy's legacy seed (np.random.seed) takes 0 <= seed < 2**32
MAX_FP16_SCALE_POWER = 64  # the loss scale starts at 2**this: DeepSpeed's default is 16
# A collective (or barrier) timeout: at least a second (the first barrier of a job takes
# longer than that), at most ~115 days (a wait that long is a hang, not a timeout; inf and
# far larger values overflow Python's timedelta, or int64 nanoseconds in C++).
TIMEOUT_RANGE_S = (1.0, 1e7)
# launcher/data/sampling.py's Blend schedule needs BLEND_BLOCK / sources >= sources (its
# quotas stay >= 0).
MAX_DATA_SOURCES = 256


def check_config(cfg: Config) -> None:
    """Every check that needs no world size, in this order (the first failure is reported)."""
    _check_sizes(cfg)
    _check_model(cfg.model)
    _check_moe(cfg)
    _check_parallel(cfg)
    _check_precision_zero(cfg)
    _check_optimizer(cfg)
    _check_train(cfg)
    _check_checkpoint(cfg)
    _check_data(cfg.data)
    _check_logging_run(cfg)
    check_vocab_covers_tokenizer(cfg)


def _check_sizes(cfg: Config) -> None:
    """The model's sizes positive (before anything divides by them), then every size in
    `LIMITS`, the model's and the parallel section's, at most its bound."""
    for name in ("layers", "hidden", "heads", "ffn", "vocab", "seq_len"):
        check_positive(f"model.{name}", getattr(cfg.model, name))
    if cfg.model.moe is not None:
        for name in ("experts", "top_k", "ffn"):
            check_positive(f"model.moe.{name}", getattr(cfg.model.moe, name))
    for key in LIMITS:
        *path, name = key.split(".")
        section = cfg
        for part in path:  # model.moe is null for a dense model
            section = getattr(section, part) if section is not None else None
        if section is not None and getattr(section, name) != "auto":
            _at_most(key, getattr(section, name))


def _at_most(key: str, value: int) -> None:
    limit, why = LIMITS[key]
    if value > limit:
        raise ConfigError(key, f"{show_value(value)} is more than {limit:,}, the most this launcher plans for ({why}); "
                          "a typo?")


def _check_model(m: ModelConfig) -> None:
    if m.rope_theta <= 1:
        raise ConfigError("model.rope_theta", f"must be > 1 (RoPE's frequencies are theta**(-i/d); Llama uses "
                          f"10000 or 500000), got {m.rope_theta}")
    check_positive("model.norm_eps", m.norm_eps)
    check_positive("model.init_std", m.init_std)
    if m.rope_scaling is not None:
        r = m.rope_scaling
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            check_positive(f"model.rope_scaling.{name}", getattr(r, name))
        if r.high_freq_factor <= r.low_freq_factor:
            raise ConfigError("model.rope_scaling.high_freq_factor", f"{r.high_freq_factor} must be above "
                              f"low_freq_factor={r.low_freq_factor}")
    if m.kv_heads is not None:
        check_positive("model.kv_heads", m.kv_heads)
    if m.hidden % m.heads:
        raise ConfigError("model.heads", f"hidden={m.hidden} is not divisible by heads={show_value(m.heads)}")
    if m.head_dim % 2:
        raise ConfigError("model.heads", f"head_dim=hidden/heads={m.head_dim} must be even for RoPE")
    if m.heads % m.n_kv_heads:
        raise ConfigError("model.kv_heads", f"heads={m.heads} is not divisible by kv_heads={show_value(m.n_kv_heads)}")


def _check_moe(cfg: Config) -> None:
    """model.moe's keys, and what expert parallelism supports today."""
    moe, p = cfg.model.moe, cfg.parallel
    if p.expert != "auto":
        check_positive("parallel.expert", p.expert)
        if moe is None and p.expert != 1:
            raise ConfigError("parallel.expert", f"{show_value(p.expert)} without model.moe: a dense model has no "
                              "experts (use 1 or auto)")
        if moe is not None and p.tensor != "auto" and p.expert % p.tensor:
            raise ConfigError("parallel.expert", f"{show_value(p.expert)}: the experts are split over the tensor ranks "
                              f"and then over data ranks (docs/MOE.md), so it is a multiple of "
                              f"parallel.tensor={show_value(p.tensor)}")
        if moe is not None and p.tensor != "auto" and p.expert != p.tensor and cfg.zero.stage == 3:
            raise ConfigError("parallel.expert", f"{show_value(p.expert)} above parallel.tensor={show_value(p.tensor)} "
                              "with zero.stage=3: expert parallelism over data ranks runs with ZeRO 0-2")
    if moe is None:
        return
    for name in ("shared_experts", "first_dense", "aux_loss_coef", "bias_rate"):
        check_positive(f"model.moe.{name}", getattr(moe, name), allow_zero=True)
    if moe.top_k > moe.experts:
        raise ConfigError("model.moe.top_k", f"{moe.top_k} is more than model.moe.experts={moe.experts}")
    if moe.first_dense > cfg.model.layers:
        raise ConfigError("model.moe.first_dense", f"{moe.first_dense} is more than model.layers={cfg.model.layers}")
    if moe.capacity_factor is not None:
        check_positive("model.moe.capacity_factor", moe.capacity_factor)
        if moe.capacity_factor > moe.experts:
            raise ConfigError("model.moe.capacity_factor", f"{moe.capacity_factor:g} is more than "
                              f"model.moe.experts={moe.experts}: past that no token can be dropped (use null)")
    if cfg.precision.dtype == "fp16" and moe.balance == "aux_loss":
        raise ConfigError("precision.dtype", "fp16 with model.moe.balance=aux_loss: the aux loss's gradient does not "
                          "carry fp16's dynamic loss scale; use bf16 or fp32, or balance=bias")
    degree, key = (p.expert, "parallel.expert") if p.expert != "auto" else (p.tensor, "parallel.tensor")
    if degree != "auto" and moe.experts % degree:
        raise ConfigError("model.moe.experts", f"{moe.experts} is not divisible by {key}={degree} (the "
                          "experts are split over the expert-parallel ranks)")
    if p.tensor != "auto" and p.tensor > 1 and cfg.model.seq_len != "auto" and cfg.model.seq_len % p.tensor:
        raise ConfigError("parallel.tensor", f"{p.tensor} with model.moe: model.seq_len={cfg.model.seq_len} is not "
                          "divisible by it (each tensor rank routes seq_len / tensor positions)")


def _check_parallel(cfg: Config) -> None:
    """The degrees that are not `auto`, and what they must divide in the model."""
    m, p = cfg.model, cfg.parallel
    for name in ("tensor", "pipeline", "micro_batch", "global_batch", "data"):
        if getattr(p, name) != "auto":
            check_positive(f"parallel.{name}", getattr(p, name))
    tp = 1 if p.tensor == "auto" else p.tensor
    if p.sequence_parallel is True and tp > 1 and m.seq_len != "auto" and m.seq_len % tp:
        raise ConfigError("parallel.sequence_parallel", f"model.seq_len={m.seq_len} is not divisible by "
                          f"parallel.tensor={tp}: each tensor rank holds seq_len / tensor positions")
    for key, value in (("model.heads", m.heads), ("model.kv_heads", m.n_kv_heads),
                       ("model.ffn", m.ffn), ("model.vocab", m.vocab)):
        if value % tp:
            raise ConfigError(key, f"{key.split('.')[1]}={value} is not divisible by parallel.tensor={show_value(tp)}")
    if p.pipeline != "auto" and m.layers < p.pipeline:
        raise ConfigError("parallel.pipeline",
                          f"pipeline={p.pipeline} stages but only model.layers={m.layers} layers")
    if p.micro_batch != "auto" and p.micro_batch > p.global_batch:
        raise ConfigError("parallel.micro_batch", f"micro_batch={show_value(p.micro_batch)} is more than "
                          f"parallel.global_batch={p.global_batch}")
    if p.partition not in ("balanced", "uniform", "parameters") and not p.partition.startswith("type:"):
        raise ConfigError("parallel.partition",
                          f"expected balanced, uniform, parameters or type:<regex>, got {show_value(p.partition)}")
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
        check_positive("parallel.stage_memory_gb", p.stage_memory_gb)
    _check_context(cfg)


def _check_context(cfg: Config) -> None:
    """parallel.context: the sequence is cut into 2 x context chunks (parallel/context.py)."""
    m, p = cfg.model, cfg.parallel
    if p.context == "auto":
        return
    check_positive("parallel.context", p.context)
    if p.context == 1 or m.seq_len == "auto":
        return
    if m.seq_len % (2 * p.context):
        raise ConfigError("parallel.context", f"{p.context}: model.seq_len={m.seq_len} is not divisible by 2 x "
                          f"context = {2 * p.context} (each sequence is cut into 2 x context chunks)")
    tp = 1 if p.tensor == "auto" else p.tensor
    if p.sequence_parallel is True and tp > 1 and (m.seq_len // p.context) % tp:
        raise ConfigError("parallel.context", f"{p.context}: seq_len / context = {m.seq_len // p.context} "
                          f"positions per rank are not divisible by parallel.tensor={tp} (sequence parallelism)")
    if m.moe is not None and m.moe.capacity_factor is not None:
        raise ConfigError("model.moe.capacity_factor", f"{m.moe.capacity_factor} with parallel.context="
                          f"{p.context}: an expert's capacity is counted in sequence order, which the "
                          "context ranks' chunks do not follow; train dropless (null) with context "
                          "parallelism (docs/CONTEXT.md)")


def _check_precision_zero(cfg: Config) -> None:
    """ZeRO with the pipeline, the fp16 loss scale, gradient compression, optimizer offload."""
    p = cfg.parallel
    if p.pipeline != "auto" and p.pipeline > 1 and cfg.zero.stage > 1:
        raise ConfigError("zero.stage", f"ZeRO stage {cfg.zero.stage} cannot be used with parallel.pipeline="
                          f"{p.pipeline}: DeepSpeed's pipeline engine supports ZeRO 0 or 1")
    power = cfg.precision.fp16_initial_scale_power
    if not 0 <= power <= MAX_FP16_SCALE_POWER:
        raise ConfigError("precision.fp16_initial_scale_power", f"expected 0 to {MAX_FP16_SCALE_POWER} (the loss "
                          f"scale starts at 2**power; DeepSpeed's default is 16), got {show_value(power)}")
    check_compression(cfg)
    if cfg.zero.offload_optimizer and cfg.zero.stage == 0:
        raise ConfigError("zero.offload_optimizer", "needs zero.stage 1, 2 or 3 (DeepSpeed offloads ZeRO's "
                          "optimizer partitions)")
    if cfg.zero.offload_optimizer and cfg.compression.method == "powersgd":
        raise ConfigError("zero.offload_optimizer", "cannot be combined with compression.method=powersgd (its "
                          "reduction writes into ZeRO's device-side gradient buffers)")


def check_compression(cfg: Config) -> None:
    c = cfg.compression
    if c.method != "powersgd":
        return
    check_positive("compression.rank", c.rank)
    # warmup_steps may exceed train.steps: the whole run then takes the exact reduction through
    # our PowerSGD path (tests compare it with DeepSpeed's own reduction that way).
    check_positive("compression.warmup_steps", c.warmup_steps, allow_zero=True)
    check_positive("compression.min_compression_rate", c.min_compression_rate)
    if cfg.zero.stage > 1:
        raise ConfigError("compression.method", f"powersgd cannot be used with zero.stage={cfg.zero.stage}: ZeRO 2/3 "
                          "reduce-scatter each gradient inside backward, so there is no whole-gradient all-reduce to "
                          "compress; use ZeRO 0/1, or compression.method fp16/bf16")
    if cfg.precision.dtype == "fp16":
        raise ConfigError("compression.method", "powersgd cannot be used with precision.dtype=fp16: the gradients "
                          "carry the dynamic loss scale and overflow on skipped steps, which error feedback would "
                          "keep adding back; use bf16 or fp32")


def _check_optimizer(cfg: Config) -> None:
    """The optimizer section and the schedule's floor (schedule.warmup_steps: _check_train)."""
    o = cfg.optimizer
    check_positive("optimizer.lr", o.lr)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError("optimizer.betas", f"expected two numbers in [0, 1), got {show_value(o.betas)}")
    check_positive("optimizer.eps", o.eps)
    check_positive("optimizer.weight_decay", o.weight_decay, allow_zero=True)
    check_positive("optimizer.grad_clip", o.grad_clip, allow_zero=True)
    check_positive("schedule.min_lr", cfg.schedule.min_lr, allow_zero=True)
    if cfg.schedule.min_lr > o.lr:
        raise ConfigError("schedule.min_lr", f"min_lr={cfg.schedule.min_lr} is above optimizer.lr={o.lr}")


def _check_train(cfg: Config) -> None:
    """The train section, and the warm-up that must fit in the run."""
    t = cfg.train
    check_positive("train.steps", t.steps, allow_zero=True)
    check_positive("schedule.warmup_steps", cfg.schedule.warmup_steps, allow_zero=True)
    if cfg.schedule.warmup_steps > t.steps > 0:
        # The learning rate would never reach optimizer.lr and the cosine decay never start.
        raise ConfigError("schedule.warmup_steps", f"warmup_steps={show_value(cfg.schedule.warmup_steps)} is longer "
                          f"than the run (train.steps={show_value(t.steps)}): lower it (0 = no warm-up) or train longer")
    # log_every, eval_every and checkpoint.every may exceed the run: the last step is always
    # logged, evaluated (eval_every > 0) and checkpointed.
    check_positive("train.log_every", t.log_every)
    check_positive("train.eval_every", t.eval_every, allow_zero=True)
    check_positive("train.eval_batches", t.eval_batches)
    if not 0 <= t.seed < SEED_RANGE:
        raise ConfigError("train.seed", f"expected 0 <= seed < 2**32 (numpy's seed range), got {show_value(t.seed)}")


def _check_checkpoint(cfg: Config) -> None:
    check_positive("checkpoint.every", cfg.checkpoint.every, allow_zero=True)
    check_positive("checkpoint.keep_last", cfg.checkpoint.keep_last)
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "required", "none") and (not resume.strip() or not Path(resume).is_dir()):
        raise ConfigError("checkpoint.resume", f"expected auto, required, none or a checkpoint directory; "
                          f"not found: {resume}")


def _check_data(data: DataConfig) -> None:
    if not 0 < data.val_fraction < 1:
        raise ConfigError("data.val_fraction", f"expected a number in (0, 1), got {data.val_fraction}")
    check_data_sources(data)


def check_data_sources(data: DataConfig) -> None:
    """The shape of `data.path` / `data.sources` (what the directories hold is checked at
    launch: launcher/training/preflight.py, check_data)."""
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
            raise ConfigError(f"data.sources[{i}].path", f"{show_value(source.path)} is listed twice; give it one weight")
        seen.add(source.path)
        check_positive(f"data.sources[{i}].weight", source.weight)


def _check_logging_run(cfg: Config) -> None:
    if cfg.logging.peak_tflops is not None:
        check_positive("logging.peak_tflops", cfg.logging.peak_tflops)
    if not cfg.run.name.strip():
        raise ConfigError("run.name", "must not be empty (the run directory is runs/<name>)")


def check_vocab_covers_tokenizer(cfg: Config) -> None:
    """model.vocab against data.tokenizer (read from disk: last, after every cheap check)."""
    # lazy: the tokenizer module pulls in numpy, which `plan --help` does not need
    from launcher.formats.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if cfg.model.vocab < tokenizer.vocab_size:
        raise ConfigError("model.vocab", f"{cfg.model.vocab} does not cover the {tokenizer.vocab_size:,} tokens of "
                          f"data.tokenizer={show_value(cfg.data.tokenizer)}: raise it, or set model.vocab: auto")
