"""Figures of one or several runs from their metrics.jsonl: loss (train and validation), lr,
throughput and, when recorded, MFU and an MoE model's expert load (the busiest expert's
tokens over the mean, one line per MoE layer); each marks the steps where a run resumed
from a checkpoint.
`python -m launcher.report` writes them as PNG files.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from launcher.metrics.runlog import read_step_records  # noqa: E402

PANELS = [  # (file, y label, [(metric key, line label suffix)])
    ("loss.png", "loss", [("loss", "train"), ("val_loss", "val")]),
    ("lr.png", "learning rate", [("lr", "")]),
    ("throughput.png", "tokens/s", [("tokens_per_s", "")]),
    ("mfu.png", "MFU", [("mfu", "")]),
]


def load_run(run_dir: Path) -> tuple[list[dict], list[int]]:
    """(step records sorted by step, steps the run resumed from)."""
    records, starts = read_step_records(run_dir / "metrics.jsonl")
    return records, [step for step in starts if step > 0]  # an attempt from a checkpoint


EXPERT_LOAD = re.compile(r"^moe\.(\d+)\.load_max_over_mean$")


def _panels(runs: dict) -> list:
    """PANELS, and expert_load.png with a series per MoE layer when the runs recorded one."""
    layers = sorted({int(m.group(1)) for records, _ in runs.values() for r in records for k in r
                     for m in [EXPERT_LOAD.match(k)] if m})
    load = [("expert_load.png", "expert load (max / mean tokens)",
             [(f"moe.{i}.load_max_over_mean", f"layer {i}") for i in layers])] if layers else []
    return PANELS + load


def build_figures(run_dirs: list[Path]) -> dict[str, plt.Figure]:
    runs = {d: load_run(d) for d in run_dirs}
    figures = {}
    for filename, ylabel, series in _panels(runs):
        if not any(key in r for records, _ in runs.values() for r in records for key, _ in series):
            continue  # e.g. no MFU on CPU runs
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for run_dir, (records, resumes) in runs.items():
            name = run_dir.name if len(runs) > 1 else ""
            for key, suffix in series:
                points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
                if points:
                    label = " ".join(x for x in (name, suffix) if x) or key
                    ax.plot(*zip(*points), marker="." if key == "val_loss" else None, label=label)
            for i, step in enumerate(resumes):
                ax.axvline(step, color="grey", linestyle="--", linewidth=1,
                           label=f"resume{' ' + name if name else ''}" if i == 0 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        figures[filename] = fig
    return figures
