"""The step loop: batches -> engine.train_step -> metrics record -> checkpoint, until
train.steps or a stop signal (SIGTERM / SIGUSR1: checkpoint, then exit 75 to be requeued).
`train` starts the process group, sets the run up, resumes and runs the loop.
"""

from __future__ import annotations

import signal
import sys
import time
import warnings

import torch
import torch.distributed as dist

from launcher.checkpoint.save import PendingSave, RankInfo, SaveOptions, save
from launcher.checkpoint.state import LauncherState, SavedLayout, fingerprint
from launcher.checkpoint.store import tag_for
from launcher.config.schema import Config
from launcher.data.batches import realised_shares
from launcher.ds.distributed import init_distributed
from launcher.errors import CONFIG_ERROR_EXIT_CODE, EXIT_REQUEUE, ConfigError
from launcher.training.launch_env import export_env
from launcher.training.setup import Run, resume, set_up


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

        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


def train(cfg: Config, plan, ds_config: dict, penv, device, backend: str) -> int:
    """Start the process group, set up, resume, run the loop. Returns the exit code."""

    # DeepSpeed's ZeRO calls collectives torch has renamed; one warning per call would drown the log.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use", category=FutureWarning)
    stop = StopSignal()
    export_env(penv, device.index)  # on a GPU, LOCAL_RANK becomes the device index DeepSpeed reads
    init_distributed(backend, cfg.parallel.collective_timeout_s)

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


def train_loop(run: Run, stop: StopSignal) -> int:
    """The step loop: batches -> engine.train_step -> record -> checkpoint. Exit code."""
    cfg, lay, engine = run.cfg, run.plan.layout, run.engine
    pending, last = PendingSave(lambda: None, background=False), {}
    if cfg.train.steps == 0 and run.resume_from is None:  # a conversion: the starting weights as step 0
        pending = save_checkpoint(run, background=False)
    first = run.step + 1  # this attempt's first step is logged: the run shows it trains without waiting log_every
    run.log.start_progress(cfg.train.steps, run.step)
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
        extra.update(engine.moe_after_step())  # every step: the balancing bias moves after each
        if run.dp_bytes:
            extra.update(step_bytes(run))
        run.tokens_seen += lay.global_batch * cfg.model.seq_len
        if is_record_step(cfg, run.step, first):
            last = step_record(run, loss, lr, grad_norm, step_time, extra)
            run.log.log(last, cfg.train.steps)
        run.log.advance()
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


def is_record_step(cfg: Config, step: int, first: int = 1) -> bool:
    """Log steps, validation steps (their record carries val_loss), the attempt's `first`
    step and the last step."""
    every_eval = cfg.train.eval_every and step % cfg.train.eval_every == 0
    return step % cfg.train.log_every == 0 or bool(every_eval) or step in (first, cfg.train.steps)


def validation_loss(run: Run) -> float:
    """Mean loss over a fixed set of held-out global batches (every stage runs them; only
    the first and last pipeline stages read them)."""
    global_batch, reads = run.plan.layout.global_batch, run.engine.reads_data
    total = sum(run.engine.eval_loss(run.val_batches.micro_batches(i * global_batch) if reads else None)
                for i in range(run.cfg.train.eval_batches))
    return total / run.cfg.train.eval_batches


def step_bytes(run: Run) -> dict:
    """Bytes this step handed to data-parallel collectives, mean over ranks."""

    counts = run.dp_bytes.take()
    total = torch.tensor([counts["reduce"], counts["gather"]], dtype=torch.float64, device=run.device)
    dist.all_reduce(total)
    reduce_bytes, gather_bytes = (total / run.plan.layout.world_size).tolist()
    return {"dp_reduce_bytes": reduce_bytes, "dp_gather_bytes": gather_bytes}


def step_record(run: Run, loss: float, lr: float, grad_norm, step_time: float, extra: dict) -> dict:
    """One metrics.jsonl record: what a single process on the whole global batch would report."""


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

    cfg, lay = run.cfg, run.plan.layout
    state = LauncherState(step=run.step, tokens_seen=run.tokens_seen,
                          consumed_samples=run.step * lay.global_batch, data=run.train_batches.state_dict(),
                          layout=SavedLayout.of_run(cfg, run.plan),
                          fingerprint=fingerprint(cfg, run.weights_from))
    ranks = RankInfo(rank=run.penv.rank, local_rank=run.penv.local_rank, world_size=run.penv.world_size)
    options = SaveOptions(keep_last=cfg.checkpoint.keep_last, background=background,
                          timeout_s=cfg.parallel.collective_timeout_s)
    start = time.perf_counter()
    pending = save(run.engine.ds, run.ckpt_root, state, ranks, options, run.verified, compressor=run.engine.compressor,
                   moe_state=run.engine.moe_state)
    run.log.event({"event": "checkpoint", "step": run.step, "path": str(run.ckpt_root / tag_for(run.step)),
                   "save_s": time.perf_counter() - start, "background": background})
    return pending
