"""Setting up a run: everything the step loop touches, built once.

`set_up` builds the process groups, picks the checkpoint to resume from, opens the run
directory and its log, builds the engine (launcher/training/engine.py) and opens the data;
`resume` then loads the chosen checkpoint. launcher/training/loop.py runs the steps.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import psutil
import torch
import torch.distributed as dist

from launcher.checkpoint.load import load, load_moe_state
from launcher.checkpoint.state import (
    LauncherState,
    SavedLayout,
    deepspeed_loads,
    same_layout,
)
from launcher.checkpoint.store import (
    Verified,
    checkpoint_root,
    choose_resume,
    explicit_resume,
    nothing_to_resume,
)
from launcher.config.derived import run_dir
from launcher.config.schema import Config
from launcher.data.batches import GlobalBatches, RunData, describe_data, open_run_data
from launcher.data.sources import prepare_embedded
from launcher.ds.seams import count_dp_bytes
from launcher.hf.weights import weights_source
from launcher.metrics.runlog import RunLog
from launcher.metrics.tracking import Tracker
from launcher.planning.plan import Plan, describe
from launcher.training.engine import TrainEngine, build_engine
from launcher.training.launch_env import ProcessEnv
from launcher.training.optim import schedule_change
from parallel.comm_bytes import CollectiveBytes
from parallel.costs import flops_per_token
from parallel.hardware import peak_tflops_of
from parallel.topology import ProcessGroups, build_process_groups


@dataclass
class Run:
    """Everything the step loop touches, built once by `set_up`."""

    cfg: Config
    plan: Plan
    penv: ProcessEnv
    device: torch.device
    groups: ProcessGroups
    engine: TrainEngine
    log: RunLog
    train_batches: GlobalBatches
    val_batches: GlobalBatches
    data: RunData  # the datasets and both batch streams
    ckpt_root: Path
    verified: Verified
    resume_from: Optional[Path]
    resume_state: Optional[LauncherState]  # the state saved with resume_from
    weights_from: Optional[dict] = None  # where the initial weights came from (model.init_from)
    dp_bytes: Optional[CollectiveBytes] = None  # with logging.comm_bytes
    peak_tflops: Optional[float] = None
    flops_per_token: float = 0.0
    step: int = 0
    tokens_seen: int = 0


def set_up(cfg: Config, plan: Plan, ds_config: dict, penv: ProcessEnv, device: torch.device) -> Run:
    """Process groups, the checkpoint to resume from, the run directory, the engine, data."""
    group_ready = time.time()  # the world group is up (init_distributed): a restart's timeline, with `started`
    groups = build_process_groups(plan.layout, penv.rank, cfg.parallel.collective_timeout_s)
    root, verified, resume_from = checkpoint_to_resume(cfg, penv)
    saved = LauncherState.read(resume_from) if resume_from else None
    log = open_log(cfg, plan, penv, device, started_at=saved.step if saved else 0, group_ready=group_ready)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)

    dp_bytes = count_dp_bytes(groups) if cfg.logging.comm_bytes else None
    init_from, weights_from = initial_weights(cfg, saved, log)
    engine = build_engine(cfg, plan, groups, device, ds_config, init_from=init_from)
    if init_from:
        log.info(f"init       weights of this rank read from {init_from} (tp rank {groups.coord.tp}, "
                 f"pipeline stage {groups.coord.pp}); optimizer state fresh, step 0")
    if penv.local_rank == 0:  # one writer per node prepares the embedded corpus, if used
        prepare_embedded(cfg.data, log.path / "data")
    dist.barrier()
    lay = plan.layout
    data = open_run_data(cfg.data, cfg.model.seq_len, cfg.train.seed, log.path / "data", global_batch=lay.global_batch,
                         micro_batch=lay.micro_batch, dp=lay.dp, dp_rank=groups.coord.dp)
    log.info(describe_data(data))
    peak = cfg.logging.peak_tflops or (
        peak_tflops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    return Run(cfg=cfg, plan=plan, penv=penv, device=device, groups=groups, engine=engine, log=log,
               train_batches=data.train, val_batches=data.val, data=data, ckpt_root=root, verified=verified,
               resume_from=resume_from, resume_state=saved, dp_bytes=dp_bytes, peak_tflops=peak,
               flops_per_token=flops_per_token(cfg.model), weights_from=weights_from)


def checkpoint_to_resume(cfg: Config, penv: ProcessEnv) -> tuple[Path, Verified, Optional[Path]]:
    """(checkpoint root, what was verified, the checkpoint to resume from or None), agreed by
    all ranks; `resume: none` with `overwrite` clears the root first."""
    is_writer, root, verified = penv.rank == 0, checkpoint_root(cfg), Verified()
    resume_from = None
    if cfg.checkpoint.resume != "none":
        resume_from = choose_resume(root, explicit_resume(cfg), penv.rank, penv.world_size,
                                    warn=lambda text: is_writer and print(f"warning: {text}", flush=True),
                                    verified=verified)
        if resume_from is None and (cfg.checkpoint.resume != "auto" or verified.bad):
            raise nothing_to_resume(cfg, root, verified)
    elif cfg.checkpoint.overwrite and is_writer and root.exists():
        shutil.rmtree(root)
    return root, verified, resume_from


def open_log(cfg: Config, plan: Plan, penv: ProcessEnv, device: torch.device, *, started_at: int,
             group_ready: float) -> RunLog:
    """The run's log (rank 0 writes): where every rank runs, the launch event, the layout."""
    log = RunLog(run_dir(cfg), is_writer=penv.rank == 0)
    log.tracker = Tracker(cfg, log.path, penv.rank == 0)
    nodes = [None] * penv.world_size  # where every rank runs (Slurm's node name, else the host)
    dist.all_gather_object(nodes, os.environ.get("SLURMD_NODENAME") or socket.gethostname())
    per_node = {n: nodes.count(n) for n in dict.fromkeys(nodes)}
    log.info(f"launch     {penv.launcher}: rank {penv.rank} of {penv.world_size}, master {penv.master_addr}:"
             f"{penv.master_port}, nodes {', '.join(f'{n} x{c}' for n, c in per_node.items())}")
    # `step` is where this attempt starts: it supersedes earlier records of later steps.
    log.event({"event": "launch", "step": started_at, "world_size": penv.world_size, "nodes": nodes,
               "attempt": int(os.environ.get("SLURM_RESTART_COUNT", os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))),
               "started": psutil.Process().create_time(), "group_ready": group_ready})
    log.info(describe(cfg, plan, device=f"{device.type} + {'nccl' if device.type == 'cuda' else 'gloo'}"))
    log.write_config(cfg)
    return log


def initial_weights(cfg: Config, saved, log) -> tuple[Optional[str], Optional[dict]]:
    """(directory to load the initial weights from, or None, and where the run's weights
    came from, for its checkpoints): model.init_from when starting, the checkpoint's record
    when resuming (a resume loads the checkpoint's weights, whatever init_from says now)."""
    if saved is not None:
        weights_from = saved.fingerprint.get("weights_from")
        if cfg.model.init_from and (weights_from or {}).get("init_from") != str(Path(cfg.model.init_from).resolve()):
            log.info(f"notice: model.init_from={cfg.model.init_from} not loaded: resuming from a checkpoint "
                     f"(whose weights came from {(weights_from or {}).get('init_from', 'a random init')})")
        return None, weights_from
    if cfg.model.init_from:
        return cfg.model.init_from, weights_source(cfg.model.init_from)
    return None, None


def resume(run: Run) -> None:
    """Load the chosen checkpoint (model, optimizer, scheduler, RNG, sampler position)."""
    if run.resume_from is None:
        return
    saved = run.resume_state
    began = time.time()
    current = SavedLayout.of_run(run.cfg, run.plan)
    resharded, notices = load(run.engine.ds, run.resume_from, saved, current, rank=run.penv.rank,
                              shard_ranks=(run.groups.coord.tp, run.groups.ep_rank),
                              compressor=run.engine.compressor, device=run.device)
    if run.engine.moe_state is not None:
        load_moe_state(run.resume_from, run.engine.moe_state, run.device)
    run.step, run.tokens_seen = saved.step, saved.tokens_seen
    how = f"layout {current.describe()}"  # one line: which checkpoint, verified, its step, the layout change
    if resharded:
        how = resharded
    elif not same_layout(saved.layout, current):
        how = f"layout {saved.layout.describe()} -> {current.describe()} (read by DeepSpeed's elastic loader)"
    run.log.info(f"resume     {run.resume_from} (verified): step {saved.step}; {how}")
    for notice in notices:
        run.log.info(f"notice: {notice}")
    schedule_note = schedule_change(saved.fingerprint.get("schedule"), run.cfg, saved.step)
    if schedule_note:
        run.log.info(f"notice: {schedule_note}")
    data_note = run.train_batches.load_state_dict(saved.data or {"consumed_samples": saved.consumed_samples})
    if data_note:
        run.log.info(f"notice: {data_note}")
    run.log.event({"event": "resume", "step": run.step, "from": str(run.resume_from), "tokens_seen": run.tokens_seen,
                   "world_size": run.plan.layout.world_size, "dp": run.plan.layout.dp, "saved_dp": saved.layout.dp,
                   "resharded": not deepspeed_loads(saved.layout, current), "load_s": round(time.time() - began, 3)})
