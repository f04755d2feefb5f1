"""Every script in bench/ runs at its smallest settings and prints its figures.

The benchmarks are run by hand, rarely, so nothing else notices when a change elsewhere
breaks one (a new record kind in metrics.jsonl, a changed signature). Each runs here for a
few seconds on a tiny model; the figures are not checked against targets, only that they
are numbers (a NaN or a missing line fails).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from launch import REPO, base_env
from launch import WORKDIR  # noqa: E402

POSITIVE = r"[\d,.]*[1-9][\d,.]*"  # a number with a non-zero digit

BENCHES = sorted(path for path in (REPO / "bench").glob("*.py") if not path.name.startswith("_"))  # _*.py: shared helpers

# Per script: its smallest arguments ("{tmp}" is the test's temporary directory) and a
# figure line it must print (or several, all of which must match). A new bench script fails
# below until it has an entry.
SMOKE = {
    # a 2-layer model of hidden 64, one repeat: the table and the dispatch share
    "moe.py": (["--hidden", "64", "--layers", "2", "--expert-ffn", "32", "--seq", "32", "--batch", "2",
                "--repeats", "1"],
               [r"^\| moe \| [\d.]+M \| [\d,]+ \| \d\.\d{3} \|$", r"^dispatch share of one dropless MoE .*: -?\d+%$",
                r"^all-to-all bytes per rank, .* over 2 tp ranks: measured [\d,]*[1-9][\d,]*, planner [\d,]+ "
                r"\(ratio \d\.\d{3}\)$",
                r"^all-to-all bytes per rank, .* over 2 data ranks: measured [\d,]*[1-9][\d,]*, planner [\d,]+ "
                r"\(ratio \d\.\d{3}\)$"]),
    # one MoE layer of hidden 64 at 256 tokens, ours and DeepSpeed's, one repeat
    "moe_deepspeed.py": (["--hidden", "64", "--expert-ffn", "32", "--tokens", "256", "--repeats", "1"],
                         r"^\| 256 \| [\d.]+ \| [\d.]+ \| \d+\.\d{2} \| [\d.]+ \| [\d.]+ \|$"),
    # a 64-token sequence at context 1 and 2, one repeat, no recomputation
    "context.py": (["--seq", "64", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--contexts", "1", "2",
                    "--recompute", "none", "--repeats", "1"],
                   (rf"^\| none \| 2 \| {POSITIVE} \| {POSITIVE} \| {POSITIVE} \| \d\.\d{{3}} \| {POSITIVE} "
                    rf"\| {POSITIVE} \|$",
                    rf"^\| 2 \| [\d.]+ \| {POSITIVE} \| {POSITIVE} \| \d+\.\d{{2}} \| {POSITIVE} \|$")),
    # 1 MB of text, a 500-token BPE, 1 and 2 workers; no first-step timing (it prepares 100x).
    "prepare.py": (["--mb", "1", "--vocab", "500", "--workers", "2", "--no-first-step", "--dir", "{tmp}"],
                   r"^per-worker ratio, --workers \d+: \d+\.\d{2}$"),
    # 5 warm-up steps + 1 timed step, one repeat of each side, a 2-layer model.
    "overhead.py": (["--steps", "6", "--repeats", "1", "model.layers=2", "model.seq_len=32",
                     "parallel.global_batch=2", "parallel.micro_batch=1", "schedule.warmup_steps=1"],
                    r"^ratio launcher / bare: \d+\.\d{3}$"),
    # 5 warm-up steps + 1 timed step, three of its rows (one not applicable at 1 process), a 2-layer model.
    "step.py": (["--steps", "6", "--repeats", "1", "--variants", "baseline,selective,sequence_parallel,reference",
                 "--peak-size", "512", "model.layers=2", "model.seq_len=32", "parallel.global_batch=2",
                 "parallel.micro_batch=1", "schedule.warmup_steps=1"],
                (*(rf"^\| {name} \| [^|]+ \| {POSITIVE} \| {POSITIVE} \| {POSITIVE}% \| {POSITIVE} \| {POSITIVE} GiB \|"
                   for name in ("baseline", "selective")),
                 rf"^\| reference \| [^|]+ \| {POSITIVE} \| {POSITIVE} \| {POSITIVE}% \| {POSITIVE} \| - \|",
                 r"^\| sequence_parallel \| n/a: needs parallel.tensor > 1 [^|]*(\| - ){6}\|$",
                 r"^launcher at 1 process / reference: \d+\.\d{3} \(target >= 0\.97\): (PASS|MISS)$")),
    # One save against one dd, on a checkpoint of a few MB instead of a few hundred.
    "checkpoint.py": (["--repeats", "1", "--dir", "{tmp}", "model.hidden=128", "model.ffn=344",
                       "model.heads=4", "model.kv_heads=4"],
                      r"^ratio save / dd: \d+\.\d{2}$"),
    # A 2-layer, 18M-parameter model instead of the 1.1B default.
    "interop.py": (["model.layers=2", "model.hidden=256", "model.heads=8", "model.kv_heads=4", "model.ffn=688"],
                   r"^export peak / model: \d+\.\d{2}$"),
    # One config at two GPU counts (the planner only: no process started).
    "scaling.py": (["--configs", "llama_7b", "--gpus", "8", "64"], r"^\| llama_7b \| 64 \| \d+ \| \d+ \| \d+ \|"),
    # One run on 2 processes, data parallel only (the default config needs 8: tp 2 x pp 2 x dp 2).
    "compression.py": (["--steps", "2", "--nproc", "2", "--runs", "none", "parallel.tensor=1",
                        "parallel.pipeline=1", "model.layers=2", "parallel.global_batch=4", "schedule.warmup_steps=1"],
                       r"^\| none \| 1 \| [\d,.]+ kB \| [\d.]+x \| [\d,.]+ kB \| [\d.]+x \| [\d.]+ \| [\d.]+ \| "
                       r"[\d.]+ \| [+-][\d.]+% \| [\d.]+ \|$"),
    # The table of the recorded run in bench/recovery_runs (a real one needs root, the local
    # Slurm cluster and minutes: tests/test_slurm.py runs the same timeline code on a live job).
    "recovery.py": (["--from", "bench/recovery_runs"],
                    r"^spare: first resumed step [\d.]+ s after the kill \(resumed from step \d+\)$"),
}


@pytest.mark.parametrize("script", BENCHES, ids=lambda path: path.name)
def test_bench_runs(script, tmp_path):
    assert script.name in SMOKE, f"bench/{script.name}: add its smallest arguments to SMOKE in {__file__}"
    args, figures = SMOKE[script.name]
    # timeout: a hang fails; generous because a fresh machine first builds DeepSpeed's CPU ops.
    result = subprocess.run([sys.executable, f"bench/{script.name}", *(a.format(tmp=tmp_path) for a in args)],
                            cwd=WORKDIR, env=base_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-3000:]}\n"
                                    f"STDERR:\n{result.stderr[-6000:]}")
    for figure in (figures,) if isinstance(figures, str) else figures:
        assert re.search(figure, result.stdout, re.MULTILINE), f"no line matches {figure!r}:\n{result.stdout}"
