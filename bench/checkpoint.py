"""Checkpoint save throughput against `dd` (with fsync), and the step-time overhead of an
async save in flight, side by side in one run.

    python bench/checkpoint.py [--repeats 10] [section.key=value ...]

Save: one process builds the engine for a model whose checkpoint is a few hundred MB
(fp32 weights + AdamW moments, ZeRO 0), takes one step, then times `launcher.checkpoint.save.save`
end to end (DeepSpeed's files, checksums, fsync, manifest, atomic publish). `dd bs=1M
conv=fsync` writes the same number of bytes to the same directory, alternating with the
saves, so both see the same disk and the same neighbours. Prints min/median/max of both
throughputs, the ratio of the medians (target >= 0.8) and the worst ratio of a save and the
dd run next to it.

Async: the steps taken while a background save (checkpoint.async) is flushing and
publishing against the steps just before and just after it, 3x --repeats saves; prints the
median of those paired overheads (target <= 5%), the overhead of the medians, how long the
background half took and how long an async save holds the training loop.
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


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """'min / median / max' of a list of figures."""
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="saves and dd runs (the async part makes 3x as many)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory under runs/)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist

    from launcher.checkpoint.save import RankInfo, SaveOptions, save
    from launcher.checkpoint.state import LauncherState, SavedLayout, fingerprint
    from launcher.checkpoint.store import Verified
    from launcher.config.load import load_config
    from launcher.data.batches import training_batches
    from launcher.ds.distributed import init_distributed
    from launcher.planning.precision import detect_device_support
    from launcher.training.engine import build_engine
    from launcher.training.launch_env import discover, export_env, pick_device
    from launcher.training.preflight import preflight
    from parallel.topology import build_process_groups

    base = Path(args.dir) if args.dir else REPO / "runs"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=base))
    # its own run directory: the preflight must not read (or refuse) a user's runs/default
    cfg = load_config(REPO / "configs/default.yaml", [*MODEL, *args.overrides, f"run.dir={work}"])
    penv = discover()
    export_env(penv)
    # The launcher's own preflight: the same plan and DeepSpeed config `launcher.train` would build.
    plan, ds_config = preflight(cfg, 1, detect_device_support())
    device, backend = pick_device(0)
    init_distributed(backend)
    groups = build_process_groups(plan.layout, 0)
    engine = build_engine(cfg, plan, groups, device, ds_config)
    with tempfile.TemporaryDirectory() as cache:
        batches = training_batches(cfg, Path(cache), global_batch=1, micro_batch=1)
        engine.train_step(batches.next_step())
        verified = Verified()  # what retention counts; every save here goes to a fresh root
        state = lambda step: LauncherState(step, 0, step, SavedLayout.of_run(cfg, plan), fingerprint(cfg))  # noqa: E731
        ranks = RankInfo(rank=0, local_rank=0, world_size=1)

        def timed_step() -> float:
            start = time.perf_counter()
            engine.train_step(batches.next_step())
            return time.perf_counter() - start

        save_s, dd_s, nbytes, after_sync = [], [], 0, []
        for i in range(args.repeats):
            root = work / f"save{i}"
            before = timed_step()
            start = time.perf_counter()
            save(engine.ds, root, state(1), ranks, SaveOptions(keep_last=1), verified).wait()
            save_s.append(time.perf_counter() - start)
            # The step right after a save, with nothing in flight: what a save costs the next
            # step by itself (caches, page cache), for comparison with the async figure.
            after_sync.append(timed_step() / before - 1)
            nbytes = dir_bytes(root / "step-00000001")
            shutil.rmtree(root)
            dd_s.append(dd(work, nbytes))

        # Async: the steps taken while each background save is in flight against the quiet
        # steps just before and just after it. Paired, so that the load of the machine's other
        # users, which comes and goes over seconds, falls on both sides alike.
        quiet, busy, paired, foreground_s, background_s = [], [], [], [], []
        for i in range(3 * args.repeats):  # one pair is one step each side: take many
            before = timed_step()
            started = time.perf_counter()
            pending = save(engine.ds, work / f"async{i}", state(2 + i), ranks,
                           SaveOptions(keep_last=1, background=True), verified)
            start, inflight = time.perf_counter(), []
            while pending._thread is not None and pending._thread.is_alive():
                inflight.append(timed_step())
            pending.wait()
            background_s.append(pending.seconds)
            foreground_s.append(start - started)
            shutil.rmtree(work / f"async{i}")
            after = timed_step()
            quiet += [before, after]
            busy += inflight
            if inflight:
                paired.append(statistics.mean(inflight) / statistics.mean([before, after]) - 1)
    shutil.rmtree(work)
    dist.destroy_process_group()

    mb = nbytes / 2**20
    save_mb, dd_mb = [mb / t for t in save_s], [mb / t for t in dd_s]
    print(f"checkpoint: {mb:.0f} MiB, {args.repeats} repeats, dir {base}")
    print("MiB/s, min / median / max:")
    print(f"launcher save (DeepSpeed files + checksums + fsync + publish): {spread(save_mb)} "
          f"(runs {', '.join(f'{x:.0f}' for x in save_mb)})")
    print(f"dd bs=1M conv=fsync, same bytes, same disk:                  {spread(dd_mb)} "
          f"(runs {', '.join(f'{x:.0f}' for x in dd_mb)})")
    print(f"ratio save / dd: {statistics.median(save_mb) / statistics.median(dd_mb):.2f}")
    print(f"worst ratio of a save to the dd next to it: {min(d / s for s, d in zip(save_s, dd_s)):.2f}")
    if busy:
        q, b = statistics.median(quiet), statistics.median(busy)
        print(f"async: step ms, min / median / max: no save in flight {spread([t * 1000 for t in quiet])} "
              f"({len(quiet)} steps); during a background save {spread([t * 1000 for t in busy])} ({len(busy)} steps); "
              f"background half {spread([t * 1000 for t in background_s], '{:.0f}')} ms")
        print(f"async save, ms in the training loop, min / median / max: "
              f"{spread([t * 1000 for t in foreground_s], '{:.0f}')} (a synchronous save: "
              f"{spread([t * 1000 for t in save_s], '{:.0f}')})")
        print(f"async overhead, each save's steps in flight against the steps just before and after it, "
              f"min / median / max: {spread([100 * p for p in paired], '{:+.1f}%')}")
        print(f"async overhead (median step in flight / median step without): {100 * (b / q - 1):+.1f}%")
        print(f"for comparison, the step right after a synchronous save against the one before it, "
              f"min / median / max: {spread([100 * p for p in after_sync], '{:+.1f}%')}")
    else:
        print("async: the background part finished before a step could be timed")

if __name__ == "__main__":
    main()
