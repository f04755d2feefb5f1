"""Two settings whose fast value depends on the resolved layout and the device: sequence
parallelism (`parallel.sequence_parallel: auto`) and ZeRO at one data-parallel rank.

`effective_settings` runs after `resolve_auto` (the degrees are numbers) and before the plan
is made, so that the plan, DeepSpeed's config, the checkpoint's saved layout and every
printed line see the value the run uses. Each decision is one line for rank 0 to print.
"""

from __future__ import annotations

import dataclasses

from launcher.config.schema import Config
from launcher.errors import ConfigError
from launcher.planning.auto import config_estimate
from launcher.planning.plan import make_plan
from launcher.planning.precision import DeviceSupport, resolve_dtype
from parallel.layout import resolve_layout
from parallel.planner import Cluster


def effective_settings(cfg: Config, world_size: int, cluster: Cluster, device: DeviceSupport) -> tuple[Config, str]:
    """`cfg` with `sequence_parallel: auto` decided for the device and ZeRO skipped at dp 1
    where it can be, and the lines that say so ('' when neither applies)."""
    cfg, sp_note = resolve_sequence_parallel_auto(cfg, world_size, cluster, device)
    cfg, zero_note = skip_zero_at_one_rank(cfg, world_size, device)
    return cfg, "\n".join(line for line in (sp_note, zero_note) if line)


def sequence_parallel_default(tp: int, seq_len: int, gpu: bool) -> bool:
    """What `auto` means without a memory problem: on with NCCL (GPU), where it stores the
    residual stream once instead of tp times for the same bytes over NVLink; off with gloo
    (CPU), where its extra all-gathers cost more than they save (bench/step.py at tp 2:
    3,730 tokens/s with it, 6,576 without)."""
    return gpu and tp > 1 and seq_len % tp == 0


def sequence_parallel_here(cfg: Config, gpu: bool) -> Config:
    """`auto` as a launch on this machine (gpu: a GPU is visible) decides it when memory is no
    problem (--print-config: no world, no planner); left as is while parallel.tensor is auto."""
    p = cfg.parallel
    if p.sequence_parallel != "auto" or p.tensor == "auto":
        return cfg
    return _with_sequence_parallel(cfg, sequence_parallel_default(p.tensor, cfg.model.seq_len, gpu))


def resolve_sequence_parallel_auto(cfg: Config, world_size: int, cluster: Cluster,
                                   device: DeviceSupport) -> tuple[Config, str]:
    """`auto` -> true or false for this device; on a CPU also on when the planner says the
    layout fits only with it."""
    p, seq_len = cfg.parallel, cfg.model.seq_len
    if p.sequence_parallel != "auto":
        return cfg, ""
    on, why = sequence_parallel_default(p.tensor, seq_len, device.is_gpu), ""
    if p.tensor > 1 and seq_len % p.tensor == 0:
        why = "NCCL: the residual stream stored once, not tensor times" if on else "gloo: faster without it"
        if not on and not _fits(_with_sequence_parallel(cfg, False), world_size, cluster, device):
            on, why = True, "gloo, but the layout fits only with it"
    resolved = _with_sequence_parallel(cfg, on)
    if not why:  # tensor 1, or a sequence that does not split: nothing was decided
        return resolved, ""
    return resolved, f"auto       parallel.sequence_parallel -> {'on' if on else 'off'} ({why})"


def _with_sequence_parallel(cfg: Config, on: bool) -> Config:
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, sequence_parallel=on))


def _fits(cfg: Config, world_size: int, cluster: Cluster, device: DeviceSupport) -> bool:
    try:
        return config_estimate(cfg, make_plan(cfg, world_size, device), cluster).fits
    except ConfigError:  # e.g. no stage split under parallel.stage_memory_gb without it
        return False


def skip_zero_at_one_rank(cfg: Config, world_size: int, device: DeviceSupport) -> tuple[Config, str]:
    """ZeRO 1 or 2 at dp 1 has nothing to shard but still wraps the optimizer (flat buffers,
    an extra copy of every gradient and weight per step: bench/step.py measured 0.89x plain
    PyTorch with it, 1.06x without), so an fp32 run there runs as ZeRO 0. Kept: bf16 and
    fp16 (their optimizers are DeepSpeed's mixed-precision wrappers either way, and its bf16
    optimizer at ZeRO 0 cannot load its own pipeline checkpoint: KeyError in
    `_load_legacy_checkpoint`), ZeRO 3 (another checkpoint format, chosen on purpose),
    optimizer offload, and a `deepspeed.zero_optimization` block. A checkpoint written so
    resumes on another data degree with ZeRO by resharding."""
    z, p = cfg.zero, cfg.parallel
    if z.stage not in (1, 2) or z.offload_optimizer or "zero_optimization" in cfg.deepspeed:
        return cfg, ""
    if resolve_layout(p, world_size).dp != 1 or resolve_dtype(cfg, device) != "fp32":
        return cfg, ""
    skipped = dataclasses.replace(cfg, zero=dataclasses.replace(z, stage=0))
    return skipped, (f"zero       stage {z.stage} skipped at dp 1 (nothing to shard): runs as ZeRO 0; "
                     "its checkpoints resume on any data degree")
