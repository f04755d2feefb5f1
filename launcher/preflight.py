"""Every check that runs before a process group or tensor exists, in one place.

`--dry-run` and the real launch call the same `preflight`, so a dry run that passes never
ends in a configuration error at launch. The one difference is the device: the launch asks
the machine it runs on (`launcher.precision.detect_device_support`), a dry run assumes the
GPU cluster the config is meant for.
"""

from __future__ import annotations

import logging

from launcher.config import Config, ConfigError
from launcher.plan import Plan, make_plan
from launcher.precision import DeviceSupport


def preflight(cfg: Config, world_size: int, device: DeviceSupport) -> tuple[Plan, dict]:
    """(plan, DeepSpeed config) for this world size, or a ConfigError naming the key."""
    from launcher.checkpoint import check_resume_config
    from launcher.engine import deepspeed_config
    from launcher.tracking import check_wandb_login

    plan = make_plan(cfg, world_size, device)
    ds_config = deepspeed_config(cfg, plan)
    check_deepspeed_config(ds_config, cfg.deepspeed, plan)
    check_resume_config(cfg, plan)
    check_wandb_login(cfg.logging.wandb)
    return plan, ds_config


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
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger

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
