"""Step throughput: tokens/s, TFLOP/s per device and MFU, every switch of the lean step on and off.

    python bench/step.py [--config configs/X.yaml] [--steps 20] [--repeats 3]
                         [--variants baseline,fused_projections,...] [section.key=value ...]

Each row is the real command line, `python -m launcher.train` (`torchrun --nproc_per_node
world` when the layout has more than one rank), on the device at hand (CUDA when visible,
else CPU), same data and seed: the baseline is the config as it is (the default config
unless --config; parallel.tensor=1 and parallel.pipeline=1 unless given as overrides), every
other row is the baseline with ONE switch changed (`all_on`: every switch on). Runs alternate
(baseline, each variant, ..., then again) so machine noise hits all; a run's figure is its
median step after WARMUP steps, a row's the median over repeats.

    baseline            the config's own settings
    fused_projections   parallel.fused_projections flipped (q/k/v and gate/up as one matmul)
    sequence_parallel   parallel.sequence_parallel flipped (needs parallel.tensor > 1)
    none|selective|full parallel.activation_checkpointing set to it (skipped where it is the baseline's)
    compile             model.compile flipped (its compile time is in the warm-up steps)
    all_on              fused, sequence parallel (tensor > 1), selective recomputation, compiled
    reference           CPU, 1 process only: a plain PyTorch loop of the same model on the same
                        batches (bench/_runs.bare_loop); target launcher / reference >= 0.97

TFLOP/s per device = parallel.costs.flops_per_token (6N + attention: model FLOPs, so the
recomputation of selective/full checkpointing is not counted) x tokens/s / world. MFU is
against the datasheet dense bf16 peak on CUDA (parallel/hardware.py) and, on CPU, which has
no datasheet figure, against the best torch.mm TFLOP/s this run measures on the same threads.
On a GPU (bf16, target >= 45% MFU on one H100):  python bench/step.py --config configs/llama_1b.yaml
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench._runs import WARMUP, LaunchError, bare_loop, run_launcher, threads  # noqa: E402

VARIANTS = ["baseline", "fused_projections", "sequence_parallel", "none", "selective", "full", "compile", "all_on",
            "reference"]
REFERENCE_TARGET = 0.97


def zero_note(cfg, world: int) -> str:
    """What the launch makes of zero.stage at this world (ZeRO at dp 1 runs as ZeRO 0)."""
    from launcher.planning.effective import skip_zero_at_one_rank
    from launcher.planning.precision import detect_device_support

    ran, _ = skip_zero_at_one_rank(cfg, world, detect_device_support())
    return f" (runs as ZeRO {ran.zero.stage} at dp 1)" if ran.zero.stage != cfg.zero.stage else ""


def baseline_switches(cfg, tp: int, cuda: bool) -> dict[str, str]:
    """The baseline's value of every switch, as an override would spell it (`auto` as the
    launch decides it on this device)."""
    from launcher.config.derived import sequence_parallel_on
    from launcher.planning.effective import sequence_parallel_here
    from parallel.costs import recompute_mode

    def text(value) -> str:
        return str(value).lower()

    return {"parallel.fused_projections": text(cfg.parallel.fused_projections),
            "parallel.sequence_parallel": text(sequence_parallel_on(sequence_parallel_here(cfg, cuda).parallel,
                                                                    cfg.model, tp)),
            "parallel.activation_checkpointing": recompute_mode(cfg.parallel.activation_checkpointing),
            "model.compile": text(cfg.model.compile)}


def variant_overrides(name: str, base: dict[str, str], tp: int, world: int, cuda: bool) -> Union[list[str], str]:
    """The overrides that make `name` from the baseline, or why the row does not apply."""
    def flip(key: str) -> list[str]:
        return [f"{key}={'false' if base[key] == 'true' else 'true'}"]

    if name == "baseline":
        return []
    if name == "fused_projections":
        return flip("parallel.fused_projections")
    if name == "sequence_parallel":
        return flip("parallel.sequence_parallel") if tp > 1 else "n/a: needs parallel.tensor > 1 (one process here)"
    if name in ("none", "selective", "full"):
        key = "parallel.activation_checkpointing"
        return f"n/a: the baseline's {key}" if base[key] == name else [f"{key}={name}"]
    if name == "compile":
        return flip("model.compile")
    if name == "all_on":
        on = {"parallel.fused_projections": "true", "parallel.activation_checkpointing": "selective",
              "model.compile": "true", **({"parallel.sequence_parallel": "true"} if tp > 1 else {})}
        changed = [f"{k}={v}" for k, v in on.items() if base[k] != v]
        return changed or "n/a: the baseline has every switch on"
    assert name == "reference"
    if cuda or world > 1:
        return "n/a: CPU at 1 process only"
    return ["(plain PyTorch loop)"]


def measured_peak(dtype: str, device: str, size: int, tries: int = 5) -> float:
    """Best TFLOP/s of a (size x size) @ (size x size) torch.mm in `dtype` on `device` (this
    process's threads), over `tries` after one warm-up."""
    import torch

    kind = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    a, b = (torch.randn(size, size, device=device).to(kind) for _ in range(2))
    best = float("inf")
    for _ in range(tries + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


@dataclass
class Row:
    name: str
    change: Union[list[str], str]  # overrides, or why the row does not apply
    tokens_per_s: list[float] = field(default_factory=list)  # one per repeat
    memory: list[float] = field(default_factory=list)  # bytes, one per repeat
    error: Optional[str] = None

    @property
    def applies(self) -> bool:
        return isinstance(self.change, list)


def measure(row: Row, args, overrides: list[str], world: int, cfg) -> None:
    """One run of the row's variant, appended to its figures (its error kept if it fails)."""
    if row.name == "reference":
        row.tokens_per_s.append(bare_loop(cfg, args.steps))
        return
    try:
        result = run_launcher(["--config", args.config, *overrides, *row.change], args.steps, nproc=world)
    except LaunchError as error:
        row.error = str(error)
        return
    row.tokens_per_s.append(statistics.median(r["tokens_per_s"] for r in result.records))
    gpu = [r["peak_mem_gb"] * 2**30 for r in result.records if "peak_mem_gb" in r]
    row.memory.append(max(gpu) if gpu else result.max_rss_bytes)


def table(rows: list[Row], base_switches: dict[str, str], flops_per_token: float, world: int, peak: float,
          measured: bool, cuda: bool) -> list[str]:
    mfu = "MFU vs measured matmul peak" if measured else "MFU vs datasheet peak"
    memory = "peak memory (max_memory_allocated, rank 0)" if cuda else "RSS high-water (largest process)"
    lines = [f"| variant | change | tokens/s | TFLOP/s/device | {mfu} | vs baseline | {memory} | runs (tokens/s) |",
             "|---|---|---|---|---|---|---|---|"]
    base = next((statistics.median(r.tokens_per_s) for r in rows if r.name == "baseline" and r.tokens_per_s), None)
    as_configured = "as configured: " + " ".join(f"{k}={v}" for k, v in base_switches.items())
    for r in rows:
        change = (" ".join(r.change) or as_configured) if r.applies else r.change
        if r.error or not r.applies:
            lines.append(f"| {r.name} | {change} | {'FAILED (see stderr)' if r.error else '-'} | - | - | - | - | - |")
            continue
        tps = statistics.median(r.tokens_per_s)
        tflops = flops_per_token * tps / world / 1e12
        mem = f"{max(r.memory) / 2**30:.2f} GiB" if r.memory else "-"
        ratio = f"{tps / base:.3f}" if base else "-"
        lines.append(f"| {r.name} | {change} | {tps:,.0f} | {tflops:.3g} | {100 * tflops / peak:.3g}% "
                     f"| {ratio} | {mem} | {', '.join(f'{x:,.0f}' for x in r.tokens_per_s)} |")
    return lines


def main() -> None:
    from launcher.cli import DEFAULT_CONFIG

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=20, help="steps per run, the first %d are warm-up" % WARMUP)
    parser.add_argument("--repeats", type=int, default=3, help="runs of every variant, alternated")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--peak-size", type=int, default=None, help="matrix size of the measured CPU peak "
                        "(default 2048; 8192 on CUDA when the device is not in parallel/hardware.py)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args()
    names = args.variants.split(",")
    if unknown := [n for n in names if n not in VARIANTS]:
        parser.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    if args.steps <= WARMUP:  # every step would be warm-up: nothing left to time
        parser.error(f"--steps must be more than the {WARMUP} warm-up steps")
    import torch

    from launcher.config.load import load_config
    from launcher.errors import ConfigError
    from launcher.planning.precision import detect_device_support, resolve_dtype
    from parallel.costs import flops_per_token
    from parallel.hardware import peak_tflops_of

    torch.set_num_threads(threads())
    overrides = ["parallel.tensor=1", "parallel.pipeline=1", *args.overrides]
    try:
        cfg = load_config(args.config, overrides + [f"train.steps={args.steps}"])
    except ConfigError as error:  # what the launcher would refuse: one line, before any run
        sys.exit(f"config error: {error}")
    p = cfg.parallel
    if "auto" in (p.tensor, p.pipeline, p.micro_batch):
        parser.error("parallel.tensor, parallel.pipeline and parallel.micro_batch must be numbers here (not auto)")
    world = p.tensor * p.pipeline * (p.data if isinstance(p.data, int) else 1)
    cuda = torch.cuda.is_available()
    dtype = resolve_dtype(cfg, detect_device_support())
    base = baseline_switches(cfg, p.tensor, cuda)
    rows = [Row(n, variant_overrides(n, base, p.tensor, world, cuda)) for n in names]

    gpu_name = torch.cuda.get_device_name() if cuda else None
    peak = peak_tflops_of(gpu_name) if cuda else None
    measured = peak is None
    if not measured:
        peak_text = f"{peak:g} TFLOP/s dense bf16, datasheet ({gpu_name}, parallel/hardware.py)"
    else:
        size = args.peak_size or (8192 if cuda else 2048)
        peak = measured_peak(dtype, "cuda" if cuda else "cpu", size)
        where = f"{gpu_name}, not in parallel/hardware.py" if cuda else f"{threads()} thread(s)"
        peak_text = (f"{peak:.3g} TFLOP/s measured: best {dtype} torch.mm {size}x{size} on {where} "
                     f"(MFU below is vs this measured matmul peak, not a datasheet figure)")

    for repeat in range(args.repeats):
        for row in rows:
            if row.applies and not row.error:
                measure(row, args, overrides, world, cfg)
                print(f"repeat {repeat + 1}/{args.repeats}: {row.name} done", file=sys.stderr, flush=True)

    m, fpt = cfg.model, flops_per_token(cfg.model)
    device = f"cuda: {gpu_name}" if cuda else f"cpu ({threads()} thread(s) per process)"
    print(f"device: {device}")
    shown = Path(args.config).resolve()
    shown = shown.relative_to(REPO) if shown.is_relative_to(REPO) else shown  # no machine paths in reports
    print(f"config: {shown}; overrides: {' '.join(overrides)}")
    print(f"world: {world} process(es): tensor {p.tensor} x pipeline {p.pipeline} x data {world // (p.tensor * p.pipeline)}"
          f"{' (torchrun)' if world > 1 else ''}; zero.stage {cfg.zero.stage}{zero_note(cfg, world)}")
    print(f"dtype: {dtype}")
    print(f"model: {m.layers} layers, hidden {m.hidden}, seq {m.seq_len}, vocab {m.vocab}; global batch "
          f"{p.global_batch}, micro batch {p.micro_batch}; {fpt / 1e6:.4g} MFLOP per token (6N + attention)")
    print(f"peak used: {peak_text}")
    print(f"timing: {args.steps} steps per run, the first {WARMUP} warm-up, median step; {args.repeats} repeat(s) "
          f"alternated, median over repeats")
    print("MFU counts model FLOPs (6N + attention per token), not the FLOPs of recomputation: selective/full "
          "checkpointing do more work than they are credited for.")
    print()
    for line in table(rows, base, fpt, world, peak, measured, cuda):
        print(line)
    ref = next((r for r in rows if r.name == "reference" and r.applies and r.tokens_per_s), None)
    base = next((r for r in rows if r.name == "baseline" and r.tokens_per_s), None)
    if ref and base:
        ratio = statistics.median(base.tokens_per_s) / statistics.median(ref.tokens_per_s)
        print(f"\nlauncher at 1 process / reference: {ratio:.3f} (target >= {REFERENCE_TARGET}): "
              f"{'PASS' if ratio >= REFERENCE_TARGET else 'MISS'}")
    failed = [r for r in rows if r.error]
    for r in failed:
        print(f"\n{r.name} failed: {r.error}", file=sys.stderr)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
