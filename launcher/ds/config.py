"""DeepSpeed's JSON config, generated from ours (`deepspeed_config`), and its check by
DeepSpeed's own parser before launch (`check_deepspeed_config`). The engine is built in
launcher/training/engine.py:

pipeline > 1: DeepSpeed's PipelineModule (cut at our boundaries) + PipelineEngine (1F1B),
              ZeRO 0/1.
pipeline = 1: the plain DeepSpeedEngine with our mpu (tp and dp groups), ZeRO 0-3.
"""

from __future__ import annotations

import logging

from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.utils import logger

from launcher.config.derived import sequence_parallel_on
from launcher.config.schema import Config
from launcher.errors import ConfigError
from launcher.planning.plan import Plan


def deepspeed_config(cfg: Config, plan: Plan) -> dict:
    """The DeepSpeed config, generated from ours, with the user's `deepspeed:` block merged
    in. A user key that contradicts a generated one is a ConfigError (one source of truth)."""
    lay = plan.layout
    generated = {
        # DeepSpeed's data dimension is the ranks holding the same experts (parallel/layout.py):
        # the global batch as it counts it (all of it unless an MoE's experts span data ranks)
        "train_batch_size": lay.micro_batch * lay.grad_accum * lay.ds_data,
        "train_micro_batch_size_per_gpu": lay.micro_batch,
        "gradient_accumulation_steps": lay.grad_accum,
        "gradient_clipping": cfg.optimizer.grad_clip,
        # elastic_checkpoint: ZeRO 1/2 optimizer shards saved so that a resume may change dp
        "zero_optimization": {"stage": cfg.zero.stage, **({"elastic_checkpoint": True} if cfg.zero.stage in (1, 2) else {})},
        "bf16": {"enabled": plan.dtype == "bf16"},
        "fp16": {"enabled": plan.dtype == "fp16", "loss_scale": 0,
                 "initial_scale_power": cfg.precision.fp16_initial_scale_power},
        "zero_allow_untested_optimizer": True,  # Lion is ours; ZeRO wraps any torch optimizer
        "steps_per_print": 2**31 - 1,  # we log; keep DeepSpeed's own step prints quiet
        "wall_clock_breakdown": cfg.logging.time_breakdown,
    }
    if lay.pp > 1 and (sequence_parallel_on(cfg.parallel, cfg.model, lay.tp) or lay.experts_over_dp > 1):
        # DeepSpeed's pipeline sends each activation split over its model group and
        # all-gathers it on the receiving stage, which is right only for activations that
        # are the same on every rank of that group; with sequence parallelism each tp rank
        # sends its own sequence shard, and with experts over data ranks the model group
        # holds different data ranks' micro-batches.
        generated["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if plan.dtype == "bf16":
        generated.update(bf16_gradient_settings(cfg, plan))
    if cfg.zero.offload_optimizer:
        # The config's own optimizer steps the host-side partitions; DeepSpeed would otherwise
        # insist on its compiled CPU Adam (a C++ build at first use).
        generated["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        generated["zero_force_ds_cpu_optimizer"] = False
    method = cfg.compression.method
    if method in ("fp16", "bf16"):
        generated["communication_data_type"] = method
    elif method == "powersgd" and cfg.zero.stage == 1:
        # ZeRO 1's own reduction stays in place for its bookkeeping (each rank's partition of
        # the already averaged gradient into the optimizer's buffers) with its collective made
        # the identity (`route_dp_reduction`). These settings make that collective a single
        # full-gradient all-reduce per bucket, in the step, in the order we reduce.
        generated["zero_optimization"].update(reduce_scatter=False, overlap_comm=False, contiguous_gradients=True)
    return merge_user_block(generated, cfg.deepspeed)


def bf16_gradient_settings(cfg: Config, plan: Plan) -> dict:
    """bf16 training accumulates micro-batch gradients and reduces them over data parallel
    in fp32, as Megatron and torchtitan do: a bf16 sum of 16+ micro-batches loses the
    small ones (8 bits of mantissa). DeepSpeed's paths:
      - pipeline, ZeRO 0: its bf16 optimizer, which accumulates in fp32 by construction;
      - ZeRO 1: `grad_accum_dtype: fp32` selects that same bf16 optimizer (fp32 master
        weights and gradients, optimizer state sharded);
      - ZeRO 2/3: `grad_accum_dtype: fp32` gives its partitions fp32 gradient buffers;
      - no pipeline, ZeRO 0: DeepSpeed's bf16 wrapper sums micro-batch gradients in the bf16
        `.grad` and refuses `grad_accum_dtype: fp32` (NotImplementedError), so it is refused.
    The reduction's dtype follows `communication_data_type` (default: the model's, bf16),
    so it is set to fp32 unless compression.method asks for less."""
    if plan.layout.pp == 1 and cfg.zero.stage == 0:
        raise ConfigError("zero.stage", "bf16 with zero.stage=0 and parallel.pipeline=1 would accumulate gradients "
                          "in bf16 (DeepSpeed has no fp32 accumulation there); use zero.stage=1 (its bf16 "
                          "optimizer, fp32 gradients), or precision.dtype=fp32")
    settings: dict = {"communication_data_type": "fp32"}
    if cfg.zero.stage > 0:
        settings["data_types"] = {"grad_accum_dtype": "fp32"}
    return settings


def merge_user_block(generated: dict, user: dict, prefix: str = "deepspeed") -> dict:
    merged = dict(generated)
    for key, value in user.items():
        path = f"{prefix}.{key}"
        if key not in generated:
            merged[key] = value
        elif isinstance(generated[key], dict) and isinstance(value, dict):
            merged[key] = merge_user_block(generated[key], value, path)
        elif generated[key] != value:
            raise ConfigError(path, f"{value!r} contradicts the value generated from the config "
                              f"({generated[key]!r}); set it through the launcher's own keys")
    return merged


def check_deepspeed_config(ds_config: dict, user_block: dict, plan: Plan) -> None:
    """Parse the generated config with DeepSpeed's own parser (what `deepspeed.initialize`
    does first), so a bad `deepspeed:` pass-through key fails here, named, not at launch."""
    if _deepspeed_config_problem(ds_config, plan) is None:
        return
    # The generated part is known good; find the first user key that breaks it, to name it.
    generated = {k: v for k, v in ds_config.items() if k not in user_block}
    for key in user_block:
        problem = _deepspeed_config_problem({**generated, key: ds_config[key]}, plan)
        if problem is not None:
            raise ConfigError(f"deepspeed.{key}", f"DeepSpeed rejects it: {problem}")
        generated[key] = ds_config[key]
    raise ConfigError("deepspeed", f"DeepSpeed rejects the block: {_deepspeed_config_problem(ds_config, plan)}")


def _deepspeed_config_problem(ds_config: dict, plan: Plan) -> str | None:

    # Without a process group DeepSpeed's parser assumes one data-parallel rank; the batch
    # arithmetic for our dp was checked by resolve_layout, so give it a one-rank batch.
    probe = {**ds_config, "train_batch_size": plan.layout.micro_batch * plan.layout.grad_accum}
    level = logger.level
    logger.setLevel(logging.ERROR)  # its parser logs the world size it assumed
    try:
        DeepSpeedConfig(probe)
    except Exception as err:  # pydantic ValidationError, AssertionError, ValueError, TypeError, ...
        if hasattr(err, "errors"):  # pydantic: a multi-line table; its first entry says enough
            first = err.errors()[0]
            return f"{'.'.join(str(part) for part in first['loc'])}: {first['msg']}"
        return " ".join(str(err).split()) or type(err).__name__
    finally:
        logger.setLevel(level)
    return None
