"""`python -m launcher.plan`: what a config needs and how fast it could run, before launch.

    python -m launcher.plan --config configs/llama_7b.yaml --nodes 4 --gpus-per-node 8 --gpu h100
        [--gpu-memory 80GB] [--efficiency 0.5] [--intra-node-gbps 450] [--inter-node-gbps 50]
        [--pcie-gbps 50] [--top 10] [--json] [--list-gpus] [section.key=value ...]

prints, for the config's layout, the memory of one rank of every pipeline stage (weights,
gradients, optimizer states under its ZeRO stage, activations x the micro-batches 1F1B
keeps in flight, the loss's and the reduction's buffers, fixed overhead, margin) and whether
it fits; the usual rule of thumb beside it; and the layouts that fit, fastest first, with
the reason the first wins. No GPU needed. The same estimate resolves `auto` in the parallel
section at launch, and refuses a layout that cannot fit before anything is allocated
(`python -m launcher.train --force` tries anyway). The model: parallel/memory.py (bytes),
parallel/planner.py (time), parallel/hardware.py (GPU figures), docs/SCALING.md; the
report itself: launcher/planning/report.py.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Optional

from launcher.cli import DEFAULT_CONFIG, ArgumentParser
from launcher.config.load import load_config
from launcher.errors import CONFIG_ERROR_EXIT_CODE, ConfigError
from launcher.planning.cluster import gpu_preset, size_gib
from launcher.planning.report import format_presets, format_report, report
from parallel.hardware import PRESETS
from parallel.planner import Cluster


def parse_args(argv: list[str]):
    parser = ArgumentParser(prog="python -m launcher.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--gpu", default="h100", help=f"GPU preset: {', '.join(PRESETS)} (default h100)")
    parser.add_argument("--gpu-memory", default=None, help="device memory instead of the preset's, in GiB, e.g. 24GB")
    parser.add_argument("--efficiency", type=float, default=None,
                        help="achievable fraction of peak FLOP/s for the matmuls (default: the preset's)")
    for name in ("intra-node-gbps", "inter-node-gbps", "pcie-gbps"):
        parser.add_argument(f"--{name}", type=float, default=None, help="GB/s per GPU, per direction")
    parser.add_argument("--top", type=int, default=10, help="layouts to list (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--list-gpus", action="store_true", help="print the GPU presets and their sources")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser.parse_intermixed_args(argv)  # overrides and options in any order


def cluster_from_args(args) -> Cluster:
    hardware = gpu_preset(args.gpu)
    if args.gpu_memory is not None:
        hardware = hardware.with_memory(size_gib(args.gpu_memory))
    changes = {}
    for field_name, arg in (("intra_node_gbps", args.intra_node_gbps), ("inter_node_gbps", args.inter_node_gbps),
                            ("pcie_gbps", args.pcie_gbps), ("efficiency", args.efficiency)):
        if arg is not None:
            if field_name == "efficiency":
                ok, expected = 0 < arg <= 1, "0 < efficiency <= 1, the share of peak FLOP/s a step reaches"
            else:
                ok, expected = 0 < arg < 1e6, "a bandwidth in GB/s, 0 < value < 1e6"
            if not ok:
                raise ConfigError(f"--{field_name.replace('_', '-')}", f"out of range: {arg} (expected {expected})")
            changes[field_name] = arg
    hardware = dataclasses.replace(hardware, **{k: v for k, v in changes.items() if k != "efficiency"})
    for name, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node), ("--top", args.top)):
        if not 1 <= value <= 1 << 20:
            raise ConfigError(name, f"must be 1 to {1 << 20}, got {value}")
    return Cluster(args.nodes, args.gpus_per_node, hardware, changes.get("efficiency", hardware.efficiency))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.list_gpus:
            print(format_presets())
            return 0
        cluster = cluster_from_args(args)
        cfg = load_config(args.config, args.overrides)
        result = report(cfg, args.config, cluster, args.top)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    print(json.dumps(result, indent=1) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
