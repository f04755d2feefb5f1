"""Entry point: `python -m launcher.train [--config PATH] [section.key=value ...]`.

Started by `torchrun --nproc_per_node N -m launcher.train`, by `srun` (one task per device),
by `mpirun -np N python -m launcher.train`, or as a single process.

    --print-config [--world-size N] [--gpu h100]
                             print the config a launch of N ranks of that GPU runs (YAML, no
                             `auto` left: resolved as --dry-run resolves it) and exit
    --dry-run [--world-size N] [--gpu h100]
                             validate the config for N ranks of that GPU and print the layout,
                             stage table and memory estimate, without starting any process group
    --force                  start even when the estimate says a rank does not fit the device

Every configuration mistake is one line on stderr naming the key, and exit code 2, before
any process group or tensor exists.

Data path: YAML -> Config (launcher/config/load.py) -> `auto` resolved and checked for the
world and device (launcher/training/launch.py) -> Plan: layout + stage boundaries
(launcher/planning/plan.py) -> DeepSpeed config (launcher/ds/config.py) and engine
(launcher/training/engine.py) -> the step loop (launcher/training/loop.py): batches
(launcher/data/batches.py) -> engine.train_step -> metrics (launcher/metrics/runlog.py).
"""

from __future__ import annotations

import argparse
import os
import sys

from launcher.cli import DEFAULT_CONFIG, ArgumentParser
from launcher.config.load import dump_config, load_config
from launcher.errors import CONFIG_ERROR_EXIT_CODE, ConfigError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m launcher.train", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the layout, start nothing")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks to plan for with --dry-run or --print-config (default: $WORLD_SIZE, else the "
                        "smallest fit)")
    parser.add_argument("--gpu", default="h100", help="with --dry-run or --print-config: the GPU to plan for (a100, "
                        "h100, h200; default h100); a launch uses the device it finds")
    parser.add_argument("--force", action="store_true",
                        help="start even when the planner estimates that a rank does not fit the device")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser.parse_intermixed_args(argv)  # overrides and options in any order


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:  # --help (0), or a usage error, already printed as one line (2)
        return exit_.code
    try:
        cfg = load_config(args.config, args.overrides)
        # lazy: torch, DeepSpeed and the planner are not needed for --help
        from launcher.training.launch import dry_run, dry_run_world_size, prepare_launch, resolved_config

        if args.print_config:  # what a dry run of the same arguments would check, spelled out
            world_size = dry_run_world_size(cfg, args.world_size, args.gpu)
            print(dump_config(resolved_config(cfg, world_size, args.gpu)), end="")
            return 0
        from launcher.training.loop import train

        if args.dry_run:
            world_size = dry_run_world_size(cfg, args.world_size, args.gpu)
            summary = dry_run(cfg, world_size, args.gpu, args.force)
            print(f"config     {args.config} (dry run for {world_size} ranks: nothing started)")
            print(summary)
            return 0
        launch = prepare_launch(cfg, args.force)
        if launch.penv.rank == 0 and launch.note:
            print(launch.note, flush=True)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    return train(launch.cfg, launch.plan, launch.ds_config, launch.penv, launch.device, launch.backend)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if "mpi4py.MPI" in sys.modules:  # started by mpirun: MPI must see a clean finalize
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    # Everything is written and closed by now. Skip the interpreter's teardown: a gloo or
    # DeepSpeed worker thread destroyed during finalization can abort ("terminate called
    # without an active exception") a process that finished cleanly, turning exit 0 into
    # SIGABRT (seen about once in a hundred ZeRO-2 runs on CPU).
    os._exit(code)
