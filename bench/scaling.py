"""The planner's choices from 8 to 1024 GPUs, for docs/SCALING.md.

    python bench/scaling.py [--gpu h100] [--configs llama_7b llama_13b llama_70b] [--gpus 8 64 1024]
                            [--expert 8]

For each config and GPU count (nodes of 8): the fastest layout that fits (python -m
launcher.plan's first row, `auto` with recomputation only where needed), its predicted
tokens/s per GPU and MFU; SP: sequence parallelism (parallel.sequence_parallel: auto, on
when tp > 1); ep: an MoE's expert degree (the planner's choice among the tensor degree and
experts over tp x k data ranks of a node); cp: the context degree of a config that sets
parallel.context (its `auto`: 1 when a layout fits without cutting the sequence, at the
least recomputation that fits). `--expert N`: parallel.expert set to N (the
layouts tried keep it). Predictions from the cost model in
parallel/planner.py, not measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.config.load import load_config  # noqa: E402
from launcher.planning.auto import choose  # noqa: E402
from parallel.hardware import PRESETS  # noqa: E402
from parallel.planner import Cluster  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", default="h100", choices=sorted(PRESETS))
    parser.add_argument("--configs", nargs="+", default=["llama_7b", "llama_13b", "llama_70b"])
    parser.add_argument("--gpus", nargs="+", type=int, default=[8, 16, 32, 64, 128, 256, 512, 1024])
    parser.add_argument("--expert", type=int, default=None, help="parallel.expert for MoE configs")
    args = parser.parse_args()
    hardware = PRESETS[args.gpu]
    configs = {name: load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
               for name in args.configs}
    show_ep = bool(args.expert) or any(cfg.model.moe is not None for cfg in configs.values())
    show_cp = any(cfg.parallel.context != 1 for cfg in configs.values())
    ep_head, ep_rule = (" ep |", "---|") if show_ep else ("", "")
    cp_head, cp_rule = (" cp |", "---|") if show_cp else ("", "")
    print(f"| config | GPUs ({hardware.name}) | tp |{cp_head} pp | dp |{ep_head} mb | ZeRO | recompute | SP | GiB/rank | "
          "tokens/s/GPU | MFU |")
    print(f"|---|---|---|{cp_rule}---|---|{ep_rule}---|---|---|---|---|---|---|")
    for name, cfg in configs.items():
        for gpus in args.gpus:
            cluster = Cluster(max(1, gpus // 8), min(gpus, 8), hardware)
            auto = dataclasses.replace(cfg, parallel=dataclasses.replace(
                cfg.parallel, tensor="auto", pipeline="auto", micro_batch="auto", activation_checkpointing="auto",
                expert=args.expert or cfg.parallel.expert))
            best = choose(auto, cluster, "bf16")
            if best is None:
                print(f"| {name} | {gpus} | - |{' - |' if show_cp else ''} - | - |{' - |' if show_ep else ''} - | - | "
                      "- | - | does not fit | - | - |")
                continue
            c, lay = best.candidate, best.candidate.layout
            ep = f" {lay.expert_degree} |" if show_ep else ""
            cp = f" {lay.cp} |" if show_cp else ""
            print(f"| {name} | {gpus} | {lay.tp} |{cp} {lay.pp} | {lay.dp} |{ep} {lay.micro_batch} | {c.zero} | {c.recompute} | "
                  f"{'yes' if c.sequence_parallel else 'no'} | "
                  f"{best.peak.total / 2**30:.1f} | {best.tokens_per_s / gpus:,.0f} | {100 * best.mfu:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
