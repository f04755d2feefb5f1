"""Overhead of the launcher against a bare PyTorch loop, side by side in one run.

    python bench/overhead.py [--steps 40] [--repeats 3] [section.key=value ...]

Both sides train the same model class (launcher.model.LlamaModel) on the same batches with
the same AdamW, clipping and schedule, in one process: the launcher through
`python -m launcher.train` (DeepSpeed engine, data path, logging), the bare loop with plain
torch (no DeepSpeed). Runs alternate (bare, launcher, bare, ...) so machine noise hits both;
each run reports the median step time after warm-up. Prints tokens/s and the ratio
launcher / bare (target >= 0.95).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from launcher.metrics import read_step_records  # noqa: E402
WARMUP = 5


def bare_loop(cfg, steps: int) -> float:
    """Median tokens/s of a plain PyTorch training loop (no DeepSpeed)."""
    import torch

    from launcher.data import training_batches
    from launcher.model import LlamaModel, LossFn, layer_specs
    from launcher.optim import build_optimizer, build_scheduler
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


def launcher_run(overrides: list[str], steps: int) -> float:
    """Median tokens/s that `python -m launcher.train` reports in metrics.jsonl."""
    with tempfile.TemporaryDirectory() as run_dir:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        result = subprocess.run([sys.executable, "-m", "launcher.train", *overrides, f"train.steps={steps}",
                                 "train.log_every=1", "train.eval_every=0", f"run.dir={run_dir}"],
                                cwd=REPO, env=env, capture_output=True, text=True)
        if result.returncode:  # the output is captured: show why, not just the exit code
            sys.exit(f"launcher.train failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        records = read_step_records(Path(run_dir) / "metrics.jsonl")[0]
    return statistics.median(r["tokens_per_s"] for r in records[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.steps <= WARMUP:  # every step would be warm-up: nothing left to time
        parser.error(f"--steps must be more than the {WARMUP} warm-up steps")
    import torch

    from launcher.config import load_config

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    overrides = ["parallel.tensor=1", "parallel.pipeline=1", "zero.stage=0", *args.overrides]
    cfg = load_config(args.config, overrides + [f"train.steps={args.steps}"])
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(cfg, args.steps))
        ours.append(launcher_run(["--config", args.config, *overrides], args.steps))
    b, o = statistics.median(bare), statistics.median(ours)
    m = cfg.model
    print(f"model: {m.layers} layers, hidden {m.hidden}, seq {m.seq_len}; global batch {cfg.parallel.global_batch}, "
          f"micro batch {cfg.parallel.micro_batch}; overrides {' '.join(overrides)}")
    print(f"bare PyTorch loop  {b:12,.0f} tokens/s   (runs: {', '.join(f'{x:,.0f}' for x in bare)})")
    print(f"launcher.train     {o:12,.0f} tokens/s   (runs: {', '.join(f'{x:,.0f}' for x in ours)})")
    print(f"ratio launcher / bare: {o / b:.3f}")


if __name__ == "__main__":
    main()
