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
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench._runs import WARMUP, LaunchError, bare_loop, run_launcher, threads  # noqa: E402


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

    from launcher.config.load import load_config

    torch.set_num_threads(threads())
    overrides = ["parallel.tensor=1", "parallel.pipeline=1", "zero.stage=0", *args.overrides]
    cfg = load_config(args.config, overrides + [f"train.steps={args.steps}"])
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(cfg, args.steps))
        try:
            records = run_launcher(["--config", args.config, *overrides], args.steps).records
        except LaunchError as error:
            sys.exit(str(error))
        ours.append(statistics.median(r["tokens_per_s"] for r in records))
    b, o = statistics.median(bare), statistics.median(ours)
    m = cfg.model
    print(f"model: {m.layers} layers, hidden {m.hidden}, seq {m.seq_len}; global batch {cfg.parallel.global_batch}, "
          f"micro batch {cfg.parallel.micro_batch}; overrides {' '.join(overrides)}")
    print(f"bare PyTorch loop  {b:12,.0f} tokens/s   (runs: {', '.join(f'{x:,.0f}' for x in bare)})")
    print(f"launcher.train     {o:12,.0f} tokens/s   (runs: {', '.join(f'{x:,.0f}' for x in ours)})")
    print(f"ratio launcher / bare: {o / b:.3f}")


if __name__ == "__main__":
    main()
