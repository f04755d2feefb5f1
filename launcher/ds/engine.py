"""The one call that builds DeepSpeed's engine (deepspeed.initialize), imported after this
package has chosen DeepSpeed's accelerator."""

from __future__ import annotations

import deepspeed


def initialize(model, optimizer, lr_scheduler, config: dict, mpu=None):
    """DeepSpeed's engine (DeepSpeedEngine, or PipelineEngine for a PipelineModule). It picks
    its device from $LOCAL_RANK, which launcher/training/launch_env.export_env set to ours."""
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                           config=config, mpu=mpu)
    return engine
