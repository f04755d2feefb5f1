"""Plots of a run: `python -m launcher.report runs/x [--compare runs/y ...] [--out DIR]`.

Reads metrics.jsonl (after a restart, the records of the attempt that came later count) and writes PNGs:
loss.png (train and validation), lr.png, throughput.png (tokens/s) and, when the run
recorded them, mfu.png and expert_load.png (an MoE model's busiest expert over the mean,
per MoE layer); each marks the steps where the run resumed from a checkpoint.
With --compare the runs are overlaid (default output: <first run>/report-compare).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.cli import ArgumentParser
from launcher.errors import CONFIG_ERROR_EXIT_CODE, ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m launcher.report", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory (holding metrics.jsonl)")
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="more run directories to overlay")
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:  # --help (0), or a usage error, already printed as one line (2)
        return exit_.code
    # lazy: matplotlib takes a second to import, not needed for --help or a usage error
    from launcher.metrics.plots import build_figures, load_run, plt

    run_dirs = [args.run_dir, *args.compare]
    try:
        for run_dir in run_dirs:
            if not (run_dir / "metrics.jsonl").is_file():
                raise ConfigError("run_dir", f"no metrics.jsonl in {run_dir}")
            if not load_run(run_dir)[0]:
                raise ConfigError("run_dir", f"{run_dir / 'metrics.jsonl'} holds no step record yet (the run logs "
                                  "one every train.log_every steps)")
        out = args.out or (args.run_dir / ("report-compare" if args.compare else "report"))
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a file where a directory must be, no permission
            raise ConfigError("--out", f"{out}: cannot be a directory: {err.strerror or err}") from None
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    for filename, fig in build_figures(run_dirs).items():
        fig.savefig(out / filename, dpi=100)
        plt.close(fig)
        print(out / filename)
    return 0


if __name__ == "__main__":
    sys.exit(main())
