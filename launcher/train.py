"""Entry point: `python -m launcher.train [--config PATH] [section.key=value ...]`.

Started by `torchrun --nproc_per_node N -m launcher.train`, by `srun` (one task per device),
by `mpirun -np N python -m launcher.train`, or as a single process.

    --print-config           print the resolved config (YAML) and exit
    --dry-run [--world-size N]
                             validate the config for N ranks and print the layout and stage
                             table, without starting any process group

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
from pathlib import Path

from launcher.config import CONFIG_ERROR_EXIT_CODE, EXIT_REQUEUE, Config, ConfigError, dump_config, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launcher.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the layout, start nothing")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks to validate for with --dry-run (default: $WORLD_SIZE, else the smallest fit)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser.parse_args(argv)


def dry_run(cfg: Config, world_size: int) -> str:
    from launcher.plan import describe, make_plan

    plan = make_plan(cfg, world_size, has_gpu=True)
    return describe(cfg, plan, device="cuda + nccl (assumed; cpu + gloo where no GPU)")


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


def train(cfg: Config, plan, ds_config: dict, penv) -> int:
    """Start the process group, build the engine, resume, run the loop. Returns the exit code."""
    import numpy as np
    import torch

    from launcher import checkpoint as ckpt
    from launcher.data import GlobalBatches, load_tokens
    from launcher.engine import build_engine, count_dp_bytes
    from launcher.launch_env import export_env
    from launcher.metrics import RunLog, gpu_peak_tflops, run_dir
    from launcher.plan import describe
    from launcher.tracking import Tracker
    from parallel.costs import flops_per_token
    from parallel.topology import build_process_groups, init_distributed, pick_device

    # DeepSpeed's ZeRO calls collectives torch has renamed; one warning per call would drown the log.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use", category=FutureWarning)
    stop = StopSignal()
    export_env(penv)
    device, backend = pick_device(penv.local_rank)
    init_distributed(backend, cfg.parallel.collective_timeout_s)
    import deepspeed
    import torch.distributed as dist

    engine = None
    try:
        groups = build_process_groups(plan.layout, penv.rank)
        lay, seq, is_writer = plan.layout, cfg.model.seq_len, penv.rank == 0
        root = ckpt.checkpoint_root(cfg)
        resume_from = None if cfg.checkpoint.resume == "none" else ckpt.choose_resume(
            root, ckpt.explicit_resume(cfg), penv.rank, penv.world_size,
            warn=lambda text: is_writer and print(f"warning: {text}", flush=True))
        if resume_from is None and cfg.checkpoint.resume not in ("auto", "none"):
            if is_writer:
                print(f"config error: checkpoint.resume: {cfg.checkpoint.resume}, but no checkpoint in "
                      f"{root} verifies", file=sys.stderr, flush=True)
            return CONFIG_ERROR_EXIT_CODE
        if resume_from is None and cfg.checkpoint.overwrite and is_writer and root.exists():
            shutil.rmtree(root)
        log = RunLog(run_dir(cfg), is_writer=is_writer, fresh=resume_from is None)
        log.tracker = Tracker(cfg, log.path, is_writer)
        nodes = [None] * penv.world_size  # where every rank runs (Slurm's node name, else the host)
        dist.all_gather_object(nodes, os.environ.get("SLURMD_NODENAME") or socket.gethostname())
        per_node = {n: nodes.count(n) for n in dict.fromkeys(nodes)}
        log.info(f"launch     {penv.launcher}: rank {penv.rank} of {penv.world_size}, master {penv.master_addr}:"
                 f"{penv.master_port}, nodes {', '.join(f'{n} x{c}' for n, c in per_node.items())}")
        log.event({"event": "launch", "step": 0, "world_size": penv.world_size, "nodes": nodes,
                   "attempt": int(os.environ.get("SLURM_RESTART_COUNT", os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)))})
        log.info(describe(cfg, plan, device=f"{device.type} + {backend}"))
        log.write_config(cfg)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)

        dp_bytes = count_dp_bytes(groups) if cfg.logging.comm_bytes else None
        engine = build_engine(cfg, plan, groups, device, ds_config)
        splits = load_tokens(cfg.data, log.path / "data")
        batch_args = dict(global_batch=lay.global_batch, micro_batch=lay.micro_batch, dp=lay.dp,
                          dp_rank=groups.coord.dp, seed=cfg.train.seed)
        train_batches = GlobalBatches(splits.train, seq, **batch_args)
        val_batches = GlobalBatches(splits.val, seq, **batch_args)  # fixed set: always from position 0
        peak = cfg.logging.peak_tflops or (
            gpu_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
        flops_token = flops_per_token(cfg.model)

        step, tokens_seen, last = 0, 0, {}
        if resume_from is not None:
            saved = ckpt.LauncherState.read(resume_from)
            note = ckpt.load(engine.ds, resume_from, saved_dp=saved.layout["dp"], current_dp=lay.dp, rank=penv.rank,
                             same_layout=saved.layout == ckpt.layout_record(cfg, plan),
                             compressor=engine.compressor, device=device)
            if note:
                log.info(f"warning: {note}")
            step, tokens_seen = saved.step, saved.tokens_seen
            train_batches.load_state_dict({"consumed_samples": saved.consumed_samples})
            log.event({"event": "resume", "step": step, "from": str(resume_from), "tokens_seen": tokens_seen,
                       "world_size": lay.world_size, "dp": lay.dp, "saved_dp": saved.layout["dp"]})

        def validation_loss() -> float:
            """Mean loss over a fixed set of held-out global batches."""
            return sum(engine.eval_loss(val_batches.micro_batches(i * lay.global_batch) if engine.reads_data else None)
                       for i in range(cfg.train.eval_batches)) / cfg.train.eval_batches

        def step_bytes() -> dict:
            """Bytes this step handed to data-parallel collectives, mean over ranks."""
            counts = dp_bytes.take()
            total = torch.tensor([counts["reduce"], counts["gather"]], dtype=torch.float64, device=device)
            dist.all_reduce(total)
            reduce_bytes, gather_bytes = (total / lay.world_size).tolist()
            return {"dp_reduce_bytes": reduce_bytes, "dp_gather_bytes": gather_bytes}

        def step_record(loss: float, lr: float, grad_norm, step_time: float, breakdown: dict) -> dict:
            tokens_per_s = lay.global_batch * seq / step_time
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                      "samples_per_s": lay.global_batch / step_time, "step_time_s": step_time,
                      "tokens_seen": tokens_seen, "world_size": lay.world_size,
                      "tflops_per_device": flops_token * tokens_per_s / lay.world_size / 1e12, "time": time.time(),
                      **breakdown}
            if engine.loss_scale() is not None:
                record["loss_scale"] = engine.loss_scale()
            if peak:
                record["mfu"] = record["tflops_per_device"] / peak
            if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                record["val_loss"] = validation_loss()
            if device.type == "cuda":
                record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            return record

        def save_checkpoint(background: bool) -> ckpt.PendingSave:
            state = ckpt.LauncherState(step=step, tokens_seen=tokens_seen, consumed_samples=step * lay.global_batch,
                                       layout=ckpt.layout_record(cfg, plan), fingerprint=ckpt.fingerprint(cfg))
            start = time.perf_counter()
            pending = ckpt.save(engine.ds, root, state, penv.rank, penv.local_rank, penv.world_size,
                                cfg.checkpoint.keep_last, background=background, compressor=engine.compressor,
                                timeout_s=cfg.parallel.collective_timeout_s)
            log.event({"event": "checkpoint", "step": step, "path": str(root / ckpt.tag_for(step)),
                       "save_s": time.perf_counter() - start, "background": background})
            return pending

        # The training loop.
        pending = ckpt.PendingSave(lambda: None, background=False)
        while step < cfg.train.steps:
            step += 1
            lr = engine.ds.get_lr()[0]  # the rate this step's update uses
            start = time.perf_counter()
            batches = train_batches.next_step() if engine.reads_data else None
            if dp_bytes:
                dp_bytes.take()  # from here on, this step's collectives only
            loss, grad_norm = engine.train_step(batches)
            step_time = time.perf_counter() - start
            breakdown = engine.time_breakdown_ms()  # this step's forward/backward/optimizer split
            if dp_bytes:
                breakdown.update(step_bytes())
            tokens_seen += lay.global_batch * seq
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                last = step_record(loss, lr, grad_norm, step_time, breakdown)
                log.log(last, cfg.train.steps)
            stopping = stop.agreed(device)
            every = cfg.checkpoint.every
            if stopping or step == cfg.train.steps or (every and step % every == 0):
                pending.wait()  # one save in flight at a time
                pending = save_checkpoint(background=cfg.checkpoint.async_ and not stopping)
            if stopping:
                log.event({"event": "stop", "step": step, "signal": stop.received, "exit_code": EXIT_REQUEUE})
                log.info(f"stopped by {stop.received or 'a signal on another rank'} at step {step}: checkpoint "
                         f"saved; exit {EXIT_REQUEUE} (requeue to continue)")
                log.close({"stopped_at_step": step})
                dist.barrier()
                return EXIT_REQUEUE
        pending.wait()  # the last checkpoint is published before we report success
        dist.barrier()  # no collective may still be in flight when the groups go away
        log.summary(step, last, tokens_seen)
        log.close({"final_step": step, "final_loss": last.get("loss"), "final_val_loss": last.get("val_loss"),
                   "tokens_seen": tokens_seen})
        return 0
    finally:
        del deepspeed
        if engine is not None:
            engine.ds.destroy()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        if args.dry_run:
            from launcher.plan import default_world_size

            world_size = args.world_size or int(os.environ.get("WORLD_SIZE", 0)) or default_world_size(cfg)
            print(f"config     {args.config} (dry run for {world_size} ranks: nothing started)")
            print(dry_run(cfg, world_size))
            return 0
        import torch

        from launcher.launch_env import discover
        from launcher.plan import make_plan

        # Pick DeepSpeed's accelerator ourselves: no probing, no "unable to detect" warning.
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        penv = discover()
        plan = make_plan(cfg, penv.world_size, has_gpu=torch.cuda.is_available())
        from launcher.engine import deepspeed_config

        ds_config = deepspeed_config(cfg, plan)
        from launcher.checkpoint import check_resume_config

        check_resume_config(cfg, plan)
        from launcher.tracking import check_wandb_login

        check_wandb_login(cfg.logging.wandb)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    return train(cfg, plan, ds_config, penv)


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
