"""Rewrite the figures, tables and sample outputs in README.md and docs/ from the code.

    python docs/refresh.py            # rewrite every generated block in place
    python docs/refresh.py --check    # exit 1 and name each block that differs (tests/test_docs.py)
    python docs/refresh.py --measure  # also re-run the measured blocks (the quickstart: ~4 min)

A block is the text between two markers in a Markdown file:

    <!-- generated: NAME (python docs/refresh.py) -->
    ...
    <!-- end generated -->

`generated` blocks are deterministic (the planner, the dry run, the partitioner, an error
message) and the check compares them with what the code prints today. `measured` blocks
(wall-clock figures, a 200-step loss) depend on the machine: `--measure` re-runs them and
they carry the command and the machine they came from; the check only proves their command
still runs in the suite (tests/test_docs.py).

Written by hand because no library regenerates Markdown fragments from our own commands
(cog and mdsh do similar work but add a dependency and their own syntax for a dozen blocks).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launcher.config.load import load_config  # noqa: E402
from launcher.planning.auto import choose  # noqa: E402
from parallel.costs import item_costs  # noqa: E402
from parallel.hardware import PRESETS  # noqa: E402
from parallel.partition import balanced, max_stage_flops, whole_block_split  # noqa: E402
from parallel.planner import Cluster  # noqa: E402

MARKER = re.compile(
    r"(<!-- (generated|measured): (?P<name>[\w-]+) \(python docs/refresh.py[^)]*\) -->\n)(?P<body>.*?)(<!-- end \2 -->)",
    re.S)
DOCUMENTS = ["README.md", "docs/SCALING.md", "docs/BENCHMARKS.md"]
SHIPPED = ["default", "llama_1b", "llama_7b", "llama_13b", "llama_70b", "llama3_8b", "llama3_8b_128k",
           "mixtral_8x7b", "deepseek_moe_16b"]


def command_output(args: list[str], expect_rc: int = 0) -> str:
    """What `python -m ...` prints on stdout and stderr, run as from a fresh checkout: in an
    empty directory that holds only `configs/`, so no run of the user's shows in the output."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1", "COLUMNS": "100"}
    with tempfile.TemporaryDirectory(prefix="docs-refresh-") as fresh:
        (Path(fresh) / "configs").symlink_to(REPO / "configs")
        done = subprocess.run([sys.executable, *args], cwd=fresh, env=env, capture_output=True, text=True,
                              timeout=900)
    if done.returncode != expect_rc:
        raise SystemExit(f"docs/refresh.py: `{' '.join(args)}` exited {done.returncode}: "
                         f"{(done.stderr or done.stdout).strip()[-500:]}")
    return (done.stdout + done.stderr).rstrip("\n")


def fenced(text: str, lang: str = "") -> str:
    return f"```{lang}\n{text}\n```\n"


def dry_run_70b() -> str:
    args = ["-m", "launcher.train", "--config", "configs/llama_70b.yaml", "--dry-run", "--world-size", "512"]
    return (fenced("python " + " ".join(args), "bash") + "\n" + fenced(command_output(args)))


def config_error() -> str:
    return fenced("$ python -m launcher.train model.hiden=64\n"
                  + command_output(["-m", "launcher.train", "model.hiden=64"], expect_rc=2))


def _auto_layout(cfg, gpus: int) -> str:
    cluster = Cluster(max(1, gpus // 8), min(gpus, 8), PRESETS["h100"])
    auto = dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, tensor="auto", pipeline="auto", micro_batch="auto", activation_checkpointing="auto"))
    best = choose(auto, cluster, "bf16")
    if best is None:
        return f"does not fit on {gpus}"
    c = best.candidate
    recompute = "" if c.recompute == "none" else f", {c.recompute} recomputation"
    experts = f" (experts over {c.layout.ep})" if c.layout.ep else ""
    context = f" x cp {c.layout.cp}" if c.layout.cp > 1 else ""
    return f"tp {c.layout.tp}{context} x pp {c.layout.pp} x dp {c.layout.dp}{experts}{recompute} on {gpus}"


def _shape(m) -> str:
    kv = f", GQA {m.heads}/{m.kv_heads}" if m.kv_heads and m.kv_heads != m.heads else ""
    vocab = "byte vocab 256" if m.vocab == 256 else f"vocab {m.vocab}"
    moe = (f", MoE: top {m.moe.top_k} of {m.moe.experts} experts" + (f" + {m.moe.shared_experts} shared"
                                                                       if m.moe.shared_experts else "")
           if m.moe is not None else "")
    rope = f", {m.rope_scaling.rope_type} RoPE scaling x{m.rope_scaling.factor:g}" if m.rope_scaling else ""
    return f"{m.layers} layers, hidden {m.hidden}, {m.heads} heads{kv}, {vocab}, seq {m.seq_len}{rope}{moe}"


def configs_table() -> str:
    rows = ["| file | shape | layout |", "|---|---|---|"]
    for name in SHIPPED:
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        p = cfg.parallel
        if "auto" in (p.tensor, p.pipeline):
            layout = "auto: " + ", ".join(_auto_layout(cfg, g) for g in (8, 32, 512)) + " H100"
        else:
            layout = f"tp {p.tensor} x pp {p.pipeline} x dp {p.data}"
        rows.append(f"| `{name}.yaml` | {_shape(cfg.model)} | {layout} |")
    return "\n".join(rows) + "\n"


def partition_table() -> str:
    rows = ["| model, stages | balanced (half-blocks) | DeepSpeed `parameters` (whole blocks) | "
            "DeepSpeed `uniform` (whole blocks) |", "|---|---|---|---|"]
    for name, stages in [("llama_7b", 8), ("llama3_8b", 4), ("llama3_8b", 8)]:
        costs = item_costs(load_config(REPO / "configs" / f"{name}.yaml").model)
        ideal = sum(c.flops_per_token for c in costs) / stages
        ours = max_stage_flops(costs, balanced(costs, stages)) / ideal
        theirs = [max_stage_flops(costs, whole_block_split(m, costs, stages)) / ideal
                  for m in ("parameters", "uniform")]
        rows.append(f"| {name}, {stages} | {ours:.3f} | {theirs[0]:.3f} | {theirs[1]:.3f} |")
    return "\n".join(rows) + "\n"


def scaling_table() -> str:
    return command_output([str(REPO / "bench" / "scaling.py"), "--gpu", "h100"]) + "\n"


def moe_scaling_table() -> str:
    return command_output([str(REPO / "bench" / "scaling.py"), "--gpu", "h100", "--configs", "mixtral_8x7b",
                           "deepseek_moe_16b"]) + "\n"


def moe_expert_over_data_table() -> str:
    return command_output([str(REPO / "bench" / "scaling.py"), "--gpu", "h100", "--configs", "deepseek_moe_16b",
                           "--expert", "8", "--gpus", "8", "16", "64", "256"]) + "\n"


def context_scaling_table() -> str:
    return command_output([str(REPO / "bench" / "scaling.py"), "--gpu", "h100", "--configs", "llama3_8b_128k",
                           "--gpus", "8", "16", "64"]) + "\n"


def quickstart() -> str:
    """The README's main job, timed from the command to step 1 and to its last line, as on a
    fresh install (an empty torch extensions directory: nothing built before), and the time
    `python -m launcher.train --help` takes (measured)."""
    import time

    args = ["-m", "torch.distributed.run", "--nproc_per_node", "8", "-m", "launcher.train"]
    with tempfile.TemporaryDirectory(prefix="docs-refresh-ext-") as extensions:
        start = time.monotonic()
        out, first_step = timed_lines(args, {"TORCH_EXTENSIONS_DIR": extensions}, "step 1/")
        minutes = (time.monotonic() - start) / 60
    helps = []
    for _ in range(3):
        begin = time.monotonic()
        command_output(["-m", "launcher.train", "--help"])
        helps.append(time.monotonic() - begin)
    lines = [line for line in out.splitlines() if line.startswith(("step ", "done:"))]
    sample = "\n".join(lines[:2] + ["..."] + lines[-3:])
    return (f"Measured by `python docs/refresh.py --measure` ({os.cpu_count()} cores, "
            f"{platform.processor() or platform.machine()}, an empty torch extensions directory as on a fresh "
            f"install): step 1 logged {first_step:.0f} s after the command, the last line after {minutes:.1f} min; "
            f"`python -m launcher.train --help` takes {min(helps):.1f} s.\n\n" + fenced(sample))


def timed_lines(args: list[str], env: dict[str, str], marker: str) -> tuple[str, float]:
    """`command_output`, also giving the seconds until a line starting with `marker` appeared."""
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1", "COLUMNS": "100", **env}
    start, seen, lines = time.monotonic(), None, []
    with tempfile.TemporaryDirectory(prefix="docs-refresh-") as fresh:
        (Path(fresh) / "configs").symlink_to(REPO / "configs")
        with subprocess.Popen([sys.executable, *args], cwd=fresh, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if seen is None and line.startswith(marker):
                    seen = time.monotonic() - start
        if proc.returncode != 0 or seen is None:
            raise SystemExit(f"docs/refresh.py: `{' '.join(args)}` exited {proc.returncode} "
                             f"(saw {marker!r}: {seen is not None}): {' '.join(lines[-5:])[-500:]}")
    return "\n".join(lines), seen


GENERATED: dict[str, Callable[[], str]] = {
    "dry-run-70b": dry_run_70b, "config-error": config_error, "configs-table": configs_table, "moe-scaling-table": moe_scaling_table,
    "partition-table": partition_table, "scaling-table": scaling_table,
    "moe-expert-over-data-table": moe_expert_over_data_table, "context-scaling-table": context_scaling_table,
}
MEASURED: dict[str, Callable[[], str]] = {"quickstart": quickstart}


def refresh(text: str, measure: bool, cache: dict[str, str]) -> tuple[str, list[str]]:
    """`text` with every generated block (and measured ones when asked) rewritten; the names of
    the blocks that changed."""
    changed: list[str] = []

    def replace(match: re.Match) -> str:
        kind, name = match.group(2), match.group("name")
        table = GENERATED if kind == "generated" else MEASURED
        if name not in table:
            raise SystemExit(f"docs/refresh.py: unknown {kind} block {name!r}")
        if kind == "measured" and not measure:
            return match.group(0)
        if name not in cache:
            cache[name] = table[name]()
        if cache[name] != match.group("body"):
            changed.append(name)
        return match.group(1) + cache[name] + match.group(5)

    return MARKER.sub(replace, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a block is stale")
    parser.add_argument("--measure", action="store_true", help="re-run the measured blocks too")
    args = parser.parse_args(argv)
    cache: dict[str, str] = {}
    stale = []
    for doc in DOCUMENTS:
        path = REPO / doc
        text, changed = refresh(path.read_text(), args.measure, cache)
        stale += [f"{doc}: {name}" for name in changed]
        if changed and not args.check:
            path.write_text(text)
    if stale:
        verb = "stale" if args.check else "rewritten"
        print(f"{verb}: " + ", ".join(stale) + ("  (run: python docs/refresh.py)" if args.check else ""))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
