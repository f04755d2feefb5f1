"""Hugging Face import and export at size: memory and time against the model's size.

    python bench/interop.py [--config configs/llama_1b.yaml] [--tp 2] [--pp 2] [--dir DIR]
                            [section.key=value ...]

(1) Writes a Hugging Face Llama directory of the config's shape with random fp32 weights,
    one tensor at a time (2 GB safetensors shards), as `save_pretrained` would lay it out.
(2) Import: `torchrun --nproc_per_node tp*pp -m launcher.train model.init_from=DIR
    train.steps=0` (each rank reads its slices, saves checkpoint step 0, ZeRO 1, fp32); the
    peak RSS of the largest process (ru_maxrss over the waited-for children) against the
    model's size and against one rank's share of it.
(3) Export of that checkpoint: `python -m launcher.export` (its own peak-RSS line: the
    whole process and its growth while exporting, against the exported bytes).
(4) Round trip: every tensor of (3) compared with (1) bit for bit, streamed one at a time.

The default is TinyLlama-1.1B's shape (configs/llama_1b.yaml), ~4.4 GB in fp32: about
15 GB of disk under --dir and a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench._runs import run_measured  # noqa: E402

GB = 1e9


def write_hf_dir(model, out: Path, shard_bytes: int = 2_000_000_000) -> int:
    """Random fp32 weights of `model` as a Hugging Face directory; returns its bytes."""
    import torch
    from safetensors.torch import save_file

    from launcher.hf.export import hf_config, plan_shards
    from launcher.model import weights as hf_names

    out.mkdir(parents=True, exist_ok=True)
    entries = [(ours, hf, hf_names.full_shape(model, ours)) for ours, hf in hf_names.weights(model)]
    shards = plan_shards(entries, 4, shard_bytes)
    names = [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    gen, weight_map, total = torch.Generator().manual_seed(0), {}, 0
    for name, shard in zip(names, shards):
        tensors = {hf: (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02)
                   for _, hf, shape in shard}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for hf, t in tensors.items():
            weight_map[hf] = name
            total += t.numel() * 4
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(hf_config(model, model.vocab, torch.float32, None, None)))
    return total


def compare_dirs(a: Path, b: Path) -> tuple[int, int]:
    """(tensors equal bit for bit, tensors compared), one tensor in memory at a time per side."""
    import torch
    from safetensors import safe_open

    def where(d: Path) -> dict:
        index = d / "model.safetensors.index.json"
        if index.is_file():
            return json.loads(index.read_text())["weight_map"]
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            return {k: "model.safetensors" for k in f.keys()}

    wa, wb = where(a), where(b)
    assert sorted(wa) == sorted(wb), "the exported tensor names differ"
    equal = 0
    for name in wa:
        with safe_open(str(a / wa[name]), "pt") as fa, safe_open(str(b / wb[name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            equal += int(x.dtype == y.dtype and torch.equal(x, y))
    return equal, len(wa)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "llama_1b.yaml"))
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed)")
    parser.add_argument("--write-only", default=None, help=argparse.SUPPRESS)  # phase (1), in its own process
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from launcher.config.load import load_config

    model = load_config(args.config, args.overrides).model
    if args.write_only:
        print(write_hf_dir(model, Path(args.write_only)))
        return 0
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-interop-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    try:
        start = time.perf_counter()
        written = subprocess.run([sys.executable, __file__, "--config", args.config, "--write-only", str(work / "hf"),
                                  *args.overrides], cwd=REPO, env=env, capture_output=True, text=True, check=True)
        size = int(written.stdout.strip().splitlines()[-1])
        params = size // 4
        print(f"model      {params / 1e9:.3f}B parameters ({args.config}), {size / GB:.2f} GB fp32 in "
              f"{work / 'hf'} ({time.perf_counter() - start:.0f} s to write)")

        nproc = args.tp * args.pp
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "launcher.train", "--config", args.config, *args.overrides, f"model.init_from={work / 'hf'}",
               f"parallel.tensor={args.tp}", f"parallel.pipeline={args.pp}", "parallel.micro_batch=1",
               f"parallel.global_batch={nproc}", "zero.stage=1", "precision.dtype=fp32", "train.steps=0",
               "schedule.warmup_steps=0", f"run.dir={work / 'run'}", "checkpoint.keep_last=1"]
        start = time.perf_counter()
        result, peak = run_measured(cmd, env)
        if result.returncode:
            print(result.stdout[-3000:], result.stderr[-3000:], file=sys.stderr)
            return 1
        seconds = time.perf_counter() - start
        print(f"import     tp {args.tp} x pp {args.pp} ({nproc} processes), load + save step 0: {seconds:.0f} s; "
              f"largest process peak RSS {peak / GB:.2f} GB = {peak / size:.2f}x the model, "
              f"{peak / (size / nproc):.2f}x one rank's share (1/{nproc})")

        start = time.perf_counter()
        result, _ = run_measured([sys.executable, "-m", "launcher.export", "--checkpoint", str(work / "run"),
                                  "--out", str(work / "exported"), "--max-shard-gb", "2"], env)
        if result.returncode:
            print(result.stderr[-3000:], file=sys.stderr)
            return 1
        line = result.stdout.strip().splitlines()[-1]
        match = re.search(r"peak RSS (\d+) MiB \(([\d.]+)x the model\), \+(\d+) MiB while exporting \(([\d.]+)x\)", line)
        print(f"export     {time.perf_counter() - start:.0f} s; peak RSS {int(match[1]) / 1024:.2f} GiB = "
              f"{match[2]}x the model, growth while exporting {int(match[3]) / 1024:.2f} GiB = {match[4]}x")

        equal, total = compare_dirs(work / "hf", work / "exported")
        print(f"round trip {equal} of {total} tensors equal bit for bit")
        print(f"export peak / model: {float(match[2]):.2f}")
        return 0 if equal == total else 1
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
