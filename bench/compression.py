"""Gradient compression side by side: bytes on the data-parallel group, step time, loss.

    python bench/compression.py [--steps 300] [--nproc 8] [--runs none,fp16,bf16,powersgd,...]
                                [section.key=value ...]

Each run is the real command line, `torchrun --nproc_per_node 8 -m launcher.train` on the
default config (tensor 2 x pipeline 2 x data 2, ZeRO 1) with `logging.comm_bytes=true`,
one after the other on the same machine, same data, same seed. A run is a compression
method, optionally with `@zero0` (ZeRO 0 instead of 1, which has no parameter all-gather).
Per run it prints the median bytes per step each rank hands to data-parallel gradient
reductions and to ZeRO's parameter all-gather (after PowerSGD's warm-up), the median step
time, and the loss at the end: the mean training loss of the last 10 steps and the
validation loss. Ratios are against `none` with the same ZeRO stage.
Target (issue 6): PowerSGD >= 8x fewer bytes with a final loss within 3% of `none`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from launcher.metrics.runlog import read_step_records  # noqa: E402

DEFAULT_RUNS = "none,fp16,bf16,powersgd,none@zero0,powersgd@zero0"


def run(name: str, steps: int, nproc: int, overrides: list[str], work: Path) -> dict:
    method, _, variant = name.partition("@")
    run_dir = work / name.replace("@", "-")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "launcher.train", f"train.steps={steps}", "train.log_every=1", f"train.eval_every={steps}",
           "checkpoint.every=0", "logging.comm_bytes=true", f"compression.method={method}",
           f"run.dir={run_dir}", *(["zero.stage=0"] if variant == "zero0" else []), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{name} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    steps_ = read_step_records(run_dir / "metrics.jsonl")[0]
    settled = steps_[len(steps_) // 2:]  # past any warm-up (compression, allocator, caches)
    return {"run": name, "zero": 0 if variant == "zero0" else 1,
            "reduce_bytes": statistics.median(r["dp_reduce_bytes"] for r in settled),
            "gather_bytes": statistics.median(r["dp_gather_bytes"] for r in settled),
            "step_s": statistics.median(r["step_time_s"] for r in settled),
            "loss": statistics.mean(r["loss"] for r in steps_[-10:]),
            "val_loss": steps_[-1]["val_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--nproc", type=int, default=8)
    parser.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma-separated (default {DEFAULT_RUNS})")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        results = []
        for name in args.runs.split(","):
            results.append(run(name, args.steps, args.nproc, args.overrides, Path(work)))
            print(f"done: {name}", file=sys.stderr, flush=True)
    baseline = {r["zero"]: r for r in results if r["run"].partition("@")[0] == "none"}
    print(f"{args.steps} steps, {args.nproc} processes, default config {' '.join(args.overrides)}")
    print("| run | ZeRO | grad reduction, bytes/step/rank | fewer than none | + param all-gather | total fewer "
          "than none | step s | vs none | loss (last 10 steps) | vs none | val loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        base = baseline.get(r["zero"], r)  # no `none` run with this ZeRO stage: ratios against itself
        total, base_total = r["reduce_bytes"] + r["gather_bytes"], base["reduce_bytes"] + base["gather_bytes"]
        print(f"| {r['run']} | {r['zero']} | {r['reduce_bytes'] / 1e3:,.1f} kB | "
              f"{base['reduce_bytes'] / r['reduce_bytes']:.1f}x | {r['gather_bytes'] / 1e3:,.1f} kB | "
              f"{base_total / total:.2f}x | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f} | "
              f"{r['loss']:.4f} | {(r['loss'] / base['loss'] - 1) * 100:+.1f}% | {r['val_loss']:.4f} |")


if __name__ == "__main__":
    main()
