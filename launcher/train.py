"""Entry point: `python -m launcher.train [--config PATH] [section.key=value ...]`.

Started by `torchrun --nproc_per_node N -m launcher.train`, by `srun` (one task per device),
by `mpirun -np N python -m launcher.train`, or as a single process.

    --print-config           print the resolved config (YAML) and exit
    --dry-run [--world-size N] [--gpu h100]
                             validate the config for N ranks of that GPU and print the layout,
                             stage table and memory estimate, without starting any process group
    --force                  start even when the estimate says a rank does not fit the device

Every configuration mistake is one line on stderr naming the key, and exit code 2, before
any process group or tensor exists.

Data path: YAML -> Config (launcher/config.py) -> Plan: layout + stage boundaries
(launcher/plan.py) -> DeepSpeed config + engine (launcher/engine.py) -> the loop below:
batches (launcher/data.py) -> engine.train_step -> metrics (launcher/metrics.py).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from launcher.config import CONFIG_ERROR_EXIT_CODE, EXIT_REQUEUE, Config, ConfigError, dump_config, load_config
from launcher.plan import describe

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class _ArgumentParser(argparse.ArgumentParser):
    """A usage mistake is a configuration mistake: one line naming the option, exit 2
    (argparse's own error() prints its usage block first)."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            key, what = message.split(": ", 1)[1].split()[0], f"unknown option ({self.prog} --help)"
        else:  # "argument --world-size: invalid int value: 'four'"
            key, _, what = message.removeprefix("argument ").partition(": ")
        print(f"config error: {ConfigError(key, what or message)}", file=sys.stderr)
        self.exit(CONFIG_ERROR_EXIT_CODE)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _ArgumentParser(prog="python -m launcher.train", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the layout, start nothing")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks to validate for with --dry-run (default: $WORLD_SIZE, else the smallest fit)")
    parser.add_argument("--gpu", default="h100", help="with --dry-run: the GPU to plan for (a100, h100, h200; "
                        "default h100); a launch uses the device it finds")
    parser.add_argument("--force", action="store_true",
                        help="start even when the planner estimates that a rank does not fit the device")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser.parse_args(argv)


class StopSignal:
    """SIGTERM / SIGUSR1 (Slurm's pre-emption warning): finish the step, checkpoint, exit 75.
    A signal may reach only some ranks, so the decision is one all-reduce per step."""

    def __init__(self):
        self.received: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self, device) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


@dataclass
class Run:
    """Everything the step loop touches, built once by `set_up`."""

    cfg: Config
    plan: Any  # launcher.plan.Plan
    penv: Any  # launcher.launch_env.ProcessEnv
    device: Any  # torch.device
    groups: Any  # parallel.topology.ProcessGroups
    engine: Any  # launcher.engine.TrainEngine
    log: Any  # launcher.metrics.RunLog
    train_batches: Any  # launcher.data.GlobalBatches
    val_batches: Any
    data: Any  # launcher.data.RunData: the datasets and both batch streams
    ckpt_root: Path
    verified: Any  # launcher.checkpoint.Verified
    resume_from: Optional[Path]
    resume_state: Any  # launcher.checkpoint.LauncherState of resume_from, else None
    weights_from: Optional[dict] = None  # where the initial weights came from (model.init_from)
    dp_bytes: Any = None  # parallel.comm_bytes.CollectiveBytes with logging.comm_bytes
    peak_tflops: Optional[float] = None
    flops_per_token: float = 0.0
    step: int = 0
    tokens_seen: int = 0


def train(cfg: Config, plan, ds_config: dict, penv, device, backend: str) -> int:
    """Start the process group, set up, resume, run the loop. Returns the exit code."""
    from launcher.launch_env import export_env
    from parallel.topology import init_distributed

    # DeepSpeed's ZeRO calls collectives torch has renamed; one warning per call would drown the log.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use", category=FutureWarning)
    stop = StopSignal()
    export_env(penv, device.index)  # on a GPU, LOCAL_RANK becomes the device index DeepSpeed reads
    init_distributed(backend, cfg.parallel.collective_timeout_s)
    import torch.distributed as dist

    run = None
    try:
        run = set_up(cfg, plan, ds_config, penv, device)
        resume(run)
        return train_loop(run, stop)
    except ConfigError as err:  # found once the ranks could look together (e.g. no checkpoint verifies)
        if penv.rank == 0:
            print(f"config error: {err}", file=sys.stderr, flush=True)
        return CONFIG_ERROR_EXIT_CODE
    finally:
        if run is not None:
            run.engine.ds.destroy()
        dist.destroy_process_group()


def set_up(cfg: Config, plan, ds_config: dict, penv, device) -> Run:
    """Process groups, the checkpoint to resume from, the run directory, the engine, data."""
    import numpy as np
    import psutil
    import torch
    import torch.distributed as dist

    from launcher import checkpoint as ckpt
    from launcher.data import describe_data, open_run_data, prepare_embedded
    from launcher.engine import build_engine, count_dp_bytes
    from launcher.metrics import RunLog, gpu_peak_tflops, run_dir
    from launcher.tracking import Tracker
    from parallel.costs import flops_per_token
    from parallel.topology import build_process_groups

    group_ready = time.time()  # the world group is up (init_distributed): a restart's timeline, with `started`
    groups = build_process_groups(plan.layout, penv.rank, cfg.parallel.collective_timeout_s)
    is_writer, root, verified = penv.rank == 0, ckpt.checkpoint_root(cfg), ckpt.Verified()
    resume_from = None
    if cfg.checkpoint.resume != "none":
        resume_from = ckpt.choose_resume(root, ckpt.explicit_resume(cfg), penv.rank, penv.world_size,
                                         warn=lambda text: is_writer and print(f"warning: {text}", flush=True),
                                         verified=verified)
        if resume_from is None and (cfg.checkpoint.resume != "auto" or verified.bad):
            raise ckpt.nothing_to_resume(cfg, root, verified)
    elif cfg.checkpoint.overwrite and is_writer and root.exists():
        shutil.rmtree(root)
    saved = ckpt.LauncherState.read(resume_from) if resume_from else None
    log = RunLog(run_dir(cfg), is_writer=is_writer)
    log.tracker = Tracker(cfg, log.path, is_writer)
    nodes = [None] * penv.world_size  # where every rank runs (Slurm's node name, else the host)
    dist.all_gather_object(nodes, os.environ.get("SLURMD_NODENAME") or socket.gethostname())
    per_node = {n: nodes.count(n) for n in dict.fromkeys(nodes)}
    log.info(f"launch     {penv.launcher}: rank {penv.rank} of {penv.world_size}, master {penv.master_addr}:"
             f"{penv.master_port}, nodes {', '.join(f'{n} x{c}' for n, c in per_node.items())}")
    # `step` is where this attempt starts: it supersedes earlier records of later steps.
    log.event({"event": "launch", "step": saved.step if saved else 0, "world_size": penv.world_size, "nodes": nodes,
               "attempt": int(os.environ.get("SLURM_RESTART_COUNT", os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))),
               "started": psutil.Process().create_time(), "group_ready": group_ready})
    log.info(describe(cfg, plan, device=f"{device.type} + {'nccl' if device.type == 'cuda' else 'gloo'}"))
    log.write_config(cfg)
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
        gpu_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    return Run(cfg=cfg, plan=plan, penv=penv, device=device, groups=groups, engine=engine, log=log,
               train_batches=data.train, val_batches=data.val, data=data,
               ckpt_root=root, verified=verified, resume_from=resume_from, resume_state=saved, dp_bytes=dp_bytes, peak_tflops=peak,
               flops_per_token=flops_per_token(cfg.model), weights_from=weights_from)


def initial_weights(cfg: Config, saved, log) -> tuple[Optional[str], Optional[dict]]:
    """(directory to load the initial weights from, or None, and where the run's weights
    came from, for its checkpoints): model.init_from when starting, the checkpoint's record
    when resuming (a resume loads the checkpoint's weights, whatever init_from says now)."""
    from launcher.hf_weights import weights_source

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
    from launcher import checkpoint as ckpt

    if run.resume_from is None:
        return
    saved = run.resume_state
    began = time.time()
    current = ckpt.layout_record(run.cfg, run.plan)
    note = ckpt.load(run.engine.ds, run.resume_from, saved.layout, current, rank=run.penv.rank,
                     tp_rank=run.groups.coord.tp, model=saved.fingerprint["model"],
                     compressor=run.engine.compressor, device=run.device)
    if note:
        run.log.info(f"notice: {note}")
    run.step, run.tokens_seen = saved.step, saved.tokens_seen
    data_note = run.train_batches.load_state_dict(saved.data or {"consumed_samples": saved.consumed_samples})
    if data_note:
        run.log.info(f"notice: {data_note}")
    run.log.event({"event": "resume", "step": run.step, "from": str(run.resume_from), "tokens_seen": run.tokens_seen,
                   "world_size": run.plan.layout.world_size, "dp": run.plan.layout.dp, "saved_dp": saved.layout["dp"],
                   "resharded": not ckpt.deepspeed_loads(saved.layout, current), "load_s": round(time.time() - began, 3)})


def train_loop(run: Run, stop: StopSignal) -> int:
    """The step loop: batches -> engine.train_step -> record -> checkpoint. Exit code."""
    import torch.distributed as dist

    from launcher.checkpoint import PendingSave

    cfg, lay, engine = run.cfg, run.plan.layout, run.engine
    pending, last = PendingSave(lambda: None, background=False), {}
    if cfg.train.steps == 0 and run.resume_from is None:  # a conversion: the starting weights as step 0
        pending = save_checkpoint(run, background=False)
    while run.step < cfg.train.steps:
        run.step += 1
        lr = engine.ds.get_lr()[0]  # the rate this step's update uses
        start = time.perf_counter()
        batches = run.train_batches.next_step() if engine.reads_data else None
        if run.dp_bytes:
            run.dp_bytes.take()  # from here on, this step's collectives only
        loss, grad_norm = engine.train_step(batches)
        step_time = time.perf_counter() - start
        extra = engine.time_breakdown_ms()  # this step's forward/backward/optimizer split
        if run.dp_bytes:
            extra.update(step_bytes(run))
        run.tokens_seen += lay.global_batch * cfg.model.seq_len
        if is_record_step(cfg, run.step):
            last = step_record(run, loss, lr, grad_norm, step_time, extra)
            run.log.log(last, cfg.train.steps)
        stopping = stop.agreed(run.device)
        every = cfg.checkpoint.every
        if stopping or run.step == cfg.train.steps or (every and run.step % every == 0):
            pending.wait()  # one save in flight at a time
            pending = save_checkpoint(run, background=cfg.checkpoint.async_ and not stopping)
        if stopping:
            run.log.event({"event": "stop", "step": run.step, "signal": stop.received, "exit_code": EXIT_REQUEUE})
            run.log.info(f"stopped by {stop.received or 'a signal on another rank'} at step {run.step}: checkpoint "
                         f"saved; exit {EXIT_REQUEUE} (requeue to continue)")
            run.log.close({"stopped_at_step": run.step})
            dist.barrier()
            return EXIT_REQUEUE
    pending.wait()  # the last checkpoint is published before we report success
    dist.barrier()  # no collective may still be in flight when the groups go away
    run.log.summary(run.step, last, run.tokens_seen)
    run.log.close({"final_step": run.step, "final_loss": last.get("loss"), "final_val_loss": last.get("val_loss"),
                   "tokens_seen": run.tokens_seen})
    return 0


def is_record_step(cfg: Config, step: int) -> bool:
    """Log steps, validation steps (their record carries val_loss) and the last step."""
    every_eval = cfg.train.eval_every and step % cfg.train.eval_every == 0
    return step % cfg.train.log_every == 0 or bool(every_eval) or step == cfg.train.steps


def validation_loss(run: Run) -> float:
    """Mean loss over a fixed set of held-out global batches (every stage runs them; only
    the first and last pipeline stages read them)."""
    global_batch, reads = run.plan.layout.global_batch, run.engine.reads_data
    total = sum(run.engine.eval_loss(run.val_batches.micro_batches(i * global_batch) if reads else None)
                for i in range(run.cfg.train.eval_batches))
    return total / run.cfg.train.eval_batches


def step_bytes(run: Run) -> dict:
    """Bytes this step handed to data-parallel collectives, mean over ranks."""
    import torch
    import torch.distributed as dist

    counts = run.dp_bytes.take()
    total = torch.tensor([counts["reduce"], counts["gather"]], dtype=torch.float64, device=run.device)
    dist.all_reduce(total)
    reduce_bytes, gather_bytes = (total / run.plan.layout.world_size).tolist()
    return {"dp_reduce_bytes": reduce_bytes, "dp_gather_bytes": gather_bytes}


def step_record(run: Run, loss: float, lr: float, grad_norm, step_time: float, extra: dict) -> dict:
    """One metrics.jsonl record: what a single process on the whole global batch would report."""
    import torch

    from launcher.data import realised_shares

    cfg, lay = run.cfg, run.plan.layout
    tokens_per_s = lay.global_batch * cfg.model.seq_len / step_time
    record = {"step": run.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
              "samples_per_s": lay.global_batch / step_time, "step_time_s": step_time,
              "tokens_seen": run.tokens_seen, "world_size": lay.world_size,
              "tflops_per_device": run.flops_per_token * tokens_per_s / lay.world_size / 1e12, "time": time.time(),
              **extra}
    if len(run.data.datasets) > 1:  # requested vs realised shares of the blend
        record["data_shares"] = realised_shares(run.train_batches.state_dict())
    if run.engine.loss_scale() is not None:
        record["loss_scale"] = run.engine.loss_scale()
    if run.peak_tflops:
        record["mfu"] = record["tflops_per_device"] / run.peak_tflops
    if cfg.train.eval_every and (run.step % cfg.train.eval_every == 0 or run.step == cfg.train.steps):
        record["val_loss"] = validation_loss(run)
    if run.device.type == "cuda":
        record["peak_mem_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    return record


def save_checkpoint(run: Run, background: bool):
    """Write this step's checkpoint (finished in the background with checkpoint.async)."""
    from launcher import checkpoint as ckpt

    cfg, lay = run.cfg, run.plan.layout
    state = ckpt.LauncherState(step=run.step, tokens_seen=run.tokens_seen,
                               consumed_samples=run.step * lay.global_batch, data=run.train_batches.state_dict(),
                               layout=ckpt.layout_record(cfg, run.plan),
                               fingerprint=ckpt.fingerprint(cfg, run.weights_from))
    start = time.perf_counter()
    pending = ckpt.save(run.engine.ds, run.ckpt_root, state, run.penv.rank, run.penv.local_rank, run.penv.world_size,
                        cfg.checkpoint.keep_last, run.verified, background=background,
                        compressor=run.engine.compressor, timeout_s=cfg.parallel.collective_timeout_s)
    run.log.event({"event": "checkpoint", "step": run.step, "path": str(run.ckpt_root / ckpt.tag_for(run.step)),
                   "save_s": time.perf_counter() - start, "background": background})
    return pending


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:  # --help (0), or a usage error, already printed as one line (2)
        return exit_.code
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        from launcher.launch_env import choose_deepspeed_accelerator

        choose_deepspeed_accelerator()
        from launcher.checkpoint import resume_layout
        from launcher.plan import assumed_cluster, detect_cluster, fit_line, gpu_preset, resolve_auto
        from launcher.precision import ASSUMED_GPU, detect_device_support
        from launcher.preflight import preflight

        if args.dry_run:
            from launcher.plan import default_world_size

            world_size = args.world_size  # 0 or less is refused by the layout check, not taken for "unset"
            if world_size is None and os.environ.get("WORLD_SIZE", "").strip():
                try:
                    world_size = int(os.environ["WORLD_SIZE"])
                except ValueError:
                    raise ConfigError("WORLD_SIZE", f"expected a number of ranks, got {os.environ['WORLD_SIZE']!r}"
                                      ) from None
            if world_size is None:
                world_size = default_world_size(cfg, gpu_preset(args.gpu))
            cluster = assumed_cluster(world_size, gpu_preset(args.gpu))
            cfg, auto_note = resolve_auto(cfg, world_size, cluster, ASSUMED_GPU, resume_layout(cfg))
            plan, _ = preflight(cfg, world_size, ASSUMED_GPU)
            fit = fit_line(cfg, plan, cluster, args.force)
            print(f"config     {args.config} (dry run for {world_size} ranks: nothing started)")
            print("\n".join(line for line in (auto_note, describe(cfg, plan, device=ASSUMED_GPU.name), fit) if line))
            return 0
        from launcher.launch_env import discover

        from parallel.topology import pick_device

        penv = discover()
        device, backend = pick_device(penv.local_rank, penv.local_world_size)  # the GPU this rank drives
        cluster = detect_cluster(penv.world_size, penv.local_world_size, device)
        support = detect_device_support()
        cfg, auto_note = resolve_auto(cfg, penv.world_size, cluster, support, resume_layout(cfg))
        plan, ds_config = preflight(cfg, penv.world_size, support)
        fit = fit_line(cfg, plan, cluster, args.force)  # before anything is allocated
        if penv.rank == 0:
            print("\n".join(line for line in (auto_note, fit) if line), flush=True)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    return train(cfg, plan, ds_config, penv, device, backend)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if "mpi4py.MPI" in sys.modules:  # started by mpirun: MPI must see a clean finalize
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    # Everything is written and closed by now. Skip the interpreter's teardown: a gloo or
    # DeepSpeed worker thread destroyed during finalization can abort ("terminate called
    # without an active exception") a process that finished cleanly, turning exit 0 into
    # SIGABRT (seen about once in a hundred ZeRO-2 runs on CPU).
    os._exit(code)
