"""From a loaded config to what a launch (or a dry run) starts: `auto` resolved for the world
and device, the checks that need them (launcher/training/preflight.py), the fit estimate.

Nothing here starts a process group: a mistake is a ConfigError before any tensor exists.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch

from launcher.checkpoint.state import resume_layout
from launcher.checkpoint.store import (
    checkpoint_root,
    explicit_resume,
    resume_candidates,
    step_of,
)
from launcher.config.derived import run_dir
from launcher.config.schema import Config
from launcher.ds.seams import check_deepspeed_version
from launcher.errors import ConfigError
from launcher.planning.auto import default_world_size, fit_line, resolve_auto
from launcher.planning.cluster import assumed_cluster, detect_cluster, gpu_preset
from launcher.planning.effective import effective_settings
from launcher.planning.plan import Plan, describe
from launcher.planning.precision import ASSUMED_GPU, detect_device_support, resolve_dtype
from launcher.training.launch_env import ProcessEnv, discover, pick_device
from launcher.training.preflight import preflight
from parallel.layout import resolve_layout


@dataclass
class Launch:
    """What this rank starts: the resolved config and plan, DeepSpeed's config, where it runs."""

    cfg: Config
    plan: Plan
    ds_config: dict
    penv: ProcessEnv
    device: torch.device
    backend: str
    note: str  # what `auto` chose and the fit estimate, for rank 0 to print


def prepare_launch(cfg: Config, force: bool) -> Launch:
    """This process's launch: the environment torchrun, srun or mpirun gave it, its device,
    `auto` resolved for them, every check passed."""
    check_deepspeed_version()
    penv = discover()
    device, backend = pick_device(penv.local_rank, penv.local_world_size)  # the GPU this rank drives
    cluster = detect_cluster(penv.world_size, penv.local_world_size, device)
    support = detect_device_support()
    cfg, auto_note = resolve_auto(cfg, penv.world_size, cluster, support, resume_layout(cfg))
    cfg, effective_note = effective_settings(cfg, penv.world_size, cluster, support)
    plan, ds_config = preflight(cfg, penv.world_size, support)
    fit = fit_line(cfg, plan, cluster, force)  # before anything is allocated
    note = "\n".join(line for line in (auto_note, effective_note, fit) if line)
    return Launch(cfg=cfg, plan=plan, ds_config=ds_config, penv=penv, device=device, backend=backend, note=note)


def dry_run_world_size(cfg: Config, given: Optional[int], gpu: str) -> int:
    """--world-size, else $WORLD_SIZE, else the smallest world the model fits on that GPU."""
    if given is not None:  # 0 or less is refused by the layout check, not taken for "unset"
        return given
    if os.environ.get("WORLD_SIZE", "").strip():
        try:
            return int(os.environ["WORLD_SIZE"])
        except ValueError:
            raise ConfigError("WORLD_SIZE", f"expected a number of ranks, got {os.environ['WORLD_SIZE']!r}") from None
    return default_world_size(cfg, gpu_preset(gpu))


def dry_run(cfg: Config, world_size: int, gpu: str, force: bool) -> str:
    """The same checks as a launch of `world_size` ranks of that GPU, and what it would run."""
    check_deepspeed_version()
    cluster = assumed_cluster(world_size, gpu_preset(gpu))
    cfg, auto_note = resolve_auto(cfg, world_size, cluster, ASSUMED_GPU, resume_layout(cfg))
    cfg, effective_note = effective_settings(cfg, world_size, cluster, ASSUMED_GPU)
    plan, _ = preflight(cfg, world_size, ASSUMED_GPU)
    fit = fit_line(cfg, plan, cluster, force)
    lines = (auto_note, effective_note, describe(cfg, plan, device=ASSUMED_GPU.name), fit, resume_line(cfg))
    return "\n".join(line for line in lines if line)


def resolved_config(cfg: Config, world_size: int, gpu: str) -> Config:
    """What a launch of `world_size` ranks of that GPU runs, with nothing left to decide
    (--print-config): `auto` resolved as --dry-run resolves it, precision.dtype and
    parallel.data spelled out, the run and checkpoint directories absolute, and
    checkpoint.resume: auto as `required` when there is a checkpoint to resume (the same
    search, newest first), else `none`."""
    cluster = assumed_cluster(world_size, gpu_preset(gpu))
    cfg, _ = resolve_auto(cfg, world_size, cluster, ASSUMED_GPU, resume_layout(cfg))
    cfg, _ = effective_settings(cfg, world_size, cluster, ASSUMED_GPU)
    resume = cfg.checkpoint.resume
    if resume == "auto":
        resume = "required" if resume_candidates(checkpoint_root(cfg), None) else "none"
    return dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(cfg.parallel, data=resolve_layout(cfg.parallel, world_size).dp),
        precision=dataclasses.replace(cfg.precision, dtype=resolve_dtype(cfg, ASSUMED_GPU)),
        checkpoint=dataclasses.replace(cfg.checkpoint, dir=str(checkpoint_root(cfg).absolute()), resume=resume),
        run=dataclasses.replace(cfg.run, dir=str(run_dir(cfg).absolute())))


def resume_line(cfg: Config) -> str:
    """Which checkpoint a launch would resume from (it verifies it then, newest first)."""
    if cfg.checkpoint.resume == "none":
        return "resume     none: a fresh start (checkpoint.resume: none)"
    candidates = resume_candidates(checkpoint_root(cfg), explicit_resume(cfg))
    if not candidates:
        return f"resume     nothing to resume under {checkpoint_root(cfg)}: a fresh start"
    older = f", else an older one of {len(candidates)}" if len(candidates) > 1 else ""
    return f"resume     {candidates[0]} (step {step_of(candidates[0])}) if it verifies at launch{older}"
