"""What the bench scripts share: the launcher run for real, its step records, and the plain
PyTorch loop it is measured against. Not a bench itself (tests/test_bench.py skips `_*.py`).

    from bench._runs import WARMUP, bare_loop, run_launcher, threads
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP = 5  # steps per run left out of every timing (first-step allocations, caches, compilation)


def threads() -> int:
    """Threads per process: $OMP_NUM_THREADS, else 1 (each launcher rank gets the same)."""
    return int(os.environ.get("OMP_NUM_THREADS", "1"))


# Runs a command and reports the peak RSS of the largest of its descendants. Each run gets
# its own small wrapper: Linux carries a process's peak RSS across fork and exec, so a child
# of this (large) process would start from our peak.
PEAK_WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
                "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
                "sys.exit(r.returncode)")


def run_measured(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, int]:
    """(result, peak RSS in bytes of the largest process the command started)."""
    result = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *cmd], cwd=REPO, env=env, capture_output=True,
                            text=True)
    peak = int(re.findall(r"^peak_rss_kib (\d+)$", result.stderr, re.MULTILINE)[-1]) * 1024
    return result, peak


class LaunchError(RuntimeError):
    """launcher.train exited non-zero; the message ends with the tail of its output."""


@dataclass
class LaunchResult:
    records: list[dict]  # step records of metrics.jsonl after the WARMUP steps
    max_rss_bytes: int  # RSS high-water of the largest process (the launcher, or torchrun's largest rank)


def run_launcher(args: list[str], steps: int, nproc: int = 1) -> LaunchResult:
    """`python -m launcher.train *args` for `steps` steps (`torchrun --nproc_per_node nproc` when
    nproc > 1), one step record per step, no validation; its step records after warm-up."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = str(threads())
    runner = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, *runner, "-m", "launcher.train", *args, f"train.steps={steps}", "train.log_every=1",
               "train.eval_every=0", "checkpoint.every=0", f"run.dir={run_dir}"]
        result, peak = run_measured(cmd, env)
        if result.returncode:  # the output is captured: show why, not just the exit code
            raise LaunchError(f"launcher.train failed (exit {result.returncode}): {' '.join(cmd[1:])}\n"
                              f"{result.stderr[-3000:]}")
        from launcher.metrics.runlog import read_step_records

        records = read_step_records(Path(run_dir) / "metrics.jsonl")[0]
    return LaunchResult(records[WARMUP:], peak)


def bare_loop(cfg, steps: int) -> float:
    """Median tokens/s after warm-up of a plain PyTorch training loop (no DeepSpeed) in this
    process: launcher/model/llama.py LlamaModel (default block options) on the launcher's batches,
    with the same AdamW, clipping and schedule."""
    import torch

    from launcher.data.batches import training_batches
    from launcher.model.llama import LlamaModel, LossFn, layer_specs
    from launcher.training.optim import build_optimizer, build_scheduler
    from parallel.tensor_parallel import NO_TP

    torch.manual_seed(cfg.train.seed)
    model = LlamaModel(layer_specs(cfg.model, NO_TP, seed=cfg.train.seed))
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.optimizer, cfg.schedule, cfg.train.steps)
    loss_fn = LossFn(NO_TP)
    p = cfg.parallel
    with tempfile.TemporaryDirectory() as cache:
        batches = training_batches(cfg, Path(cache), global_batch=p.global_batch, micro_batch=p.micro_batch)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            micro = batches.next_step()
            for inputs, targets in micro:
                (loss_fn(model(inputs), targets) / len(micro)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    return p.global_batch * cfg.model.seq_len / statistics.median(times[WARMUP:])
