"""Checkpoint save throughput against `dd` (with fsync), and the step-time overhead of an
async save in flight, side by side in one run.

    python bench/checkpoint.py [--repeats 3] [section.key=value ...]

Save: one process builds the engine for a model whose checkpoint is a few hundred MB
(fp32 weights + AdamW moments, ZeRO 0), takes one step, then times `launcher.checkpoint.save`
end to end (DeepSpeed's files, fsync, checksums, manifest, atomic publish). `dd bs=1M
conv=fsync` writes the same number of bytes to the same directory, alternating with the
saves. Prints both throughputs and the ratio save / dd (target >= 0.7).

Async: median step time of steps with no save in flight against steps taken while a
background save (checkpoint.async) is flushing and checksumming (target overhead <= 10%).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = ["model.layers=2", "model.hidden=1024", "model.heads=8", "model.kv_heads=8", "model.ffn=2752",
         "model.seq_len=64", "parallel.tensor=1", "parallel.pipeline=1", "parallel.micro_batch=1",
         "parallel.global_batch=1", "zero.stage=0", "train.steps=1000"]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def dd(directory: Path, nbytes: int) -> float:
    target = directory / "dd.bin"
    start = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={max(1, nbytes >> 20)}", "conv=fsync"],
                   check=True, capture_output=True)
    elapsed = time.perf_counter() - start
    target.unlink()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory under runs/)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from launcher import checkpoint as ckpt
    from launcher.config import load_config
    from launcher.data import training_batches
    from launcher.engine import build_engine
    from launcher.launch_env import discover, export_env
    from launcher.precision import detect_device_support
    from launcher.preflight import preflight
    from parallel.topology import build_process_groups, init_distributed, pick_device

    import torch.distributed as dist

    cfg = load_config(REPO / "configs/default.yaml", MODEL + args.overrides)
    penv = discover()
    export_env(penv)
    # The launcher's own preflight: the same plan and DeepSpeed config `launcher.train` would build.
    plan, ds_config = preflight(cfg, 1, detect_device_support())
    device, backend = pick_device(0)
    init_distributed(backend)
    groups = build_process_groups(plan.layout, 0)
    engine = build_engine(cfg, plan, groups, device, ds_config)
    base = Path(args.dir) if args.dir else REPO / "runs"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=base))
    with tempfile.TemporaryDirectory() as cache:
        batches = training_batches(cfg, Path(cache), global_batch=1, micro_batch=1)
        engine.train_step(batches.next_step())
        verified = ckpt.Verified()  # what retention counts; every save here goes to a fresh root
        state = lambda step: ckpt.LauncherState(step, 0, step, ckpt.layout_record(cfg, plan), ckpt.fingerprint(cfg))  # noqa: E731

        save_s, dd_s, nbytes = [], [], 0
        for i in range(args.repeats):
            root = work / f"save{i}"
            start = time.perf_counter()
            ckpt.save(engine.ds, root, state(1), 0, 0, 1, keep_last=1, verified=verified).wait()
            save_s.append(time.perf_counter() - start)
            nbytes = dir_bytes(root / "step-00000001")
            shutil.rmtree(root)
            dd_s.append(dd(work, nbytes))

        # Async: step times with and without a background save in flight.
        quiet = []
        for _ in range(8):
            start = time.perf_counter()
            engine.train_step(batches.next_step())
            quiet.append(time.perf_counter() - start)
        busy = []
        for i in range(args.repeats):
            pending = ckpt.save(engine.ds, work / f"async{i}", state(2 + i), 0, 0, 1, keep_last=1, verified=verified,
                                background=True)
            while pending._thread is not None and pending._thread.is_alive():
                start = time.perf_counter()
                engine.train_step(batches.next_step())
                busy.append(time.perf_counter() - start)
            pending.wait()
        for _ in range(8):
            start = time.perf_counter()
            engine.train_step(batches.next_step())
            quiet.append(time.perf_counter() - start)
    shutil.rmtree(work)
    dist.destroy_process_group()

    mb = nbytes / 2**20
    save, ddt = statistics.median(save_s), statistics.median(dd_s)
    print(f"checkpoint: {mb:.0f} MiB, {args.repeats} repeats, dir {base}")
    print(f"launcher save (DeepSpeed files + fsync + checksums + publish): {mb / save:8.1f} MiB/s "
          f"(runs {', '.join(f'{mb / t:.0f}' for t in save_s)})")
    print(f"dd bs=1M conv=fsync, same bytes, same disk:                  {mb / ddt:8.1f} MiB/s "
          f"(runs {', '.join(f'{mb / t:.0f}' for t in dd_s)})")
    print(f"ratio save / dd: {ddt / save:.2f}")
    if busy:
        q, b = statistics.median(quiet), statistics.median(busy)
        print(f"async: step time {q * 1000:.1f} ms with no save in flight, {b * 1000:.1f} ms during a background "
              f"save ({len(busy)} steps): overhead {100 * (b / q - 1):+.1f}%")
    else:
        print("async: the background part finished before a step could be timed")


if __name__ == "__main__":
    main()
