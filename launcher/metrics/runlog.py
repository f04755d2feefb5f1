"""The run directory (`run.dir`, default runs/<name>): config.yaml, metrics.jsonl, console lines.

Only global rank 0 writes; every step record is what one process training on the whole
global batch would report (the loss is averaged over all micro-batches and data-parallel
ranks). Records with an `event` key (launch, resume, checkpoint, stop) mark what happened
between steps. The file is never truncated: each attempt (a restart, a resume, a fresh
start over) appends, beginning with a `launch` event at the step it starts from, and its
records supersede the earlier attempts' records of later steps (`read_step_records`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from launcher.config.load import dump_config
from launcher.config.schema import Config
from launcher.metrics.progress import StepBar, step_bar


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def read_step_records(path: Path) -> tuple[list[dict], list[int]]:
    """(the step records that count, sorted by step; the steps the attempts that count
    started from) of a metrics.jsonl. Every attempt appends and starts with a `launch` event
    at the step it starts from; it replaces the earlier attempts' records (and starts) of
    later steps."""
    by_step: dict[int, dict] = {}
    starts = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if record.get("event") == "launch":
            starts = [s for s in starts if s <= record["step"]] + [record["step"]]
            by_step = {s: r for s, r in by_step.items() if s <= record["step"]}
        elif "loss" in record and "event" not in record:
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)], starts


class RunLog:
    def __init__(self, path: Path, is_writer: bool):
        """metrics.jsonl is only ever appended to: an earlier attempt's records stay (see
        `read_step_records` for which count)."""
        self.path = path
        self.is_writer = is_writer
        self.started = time.time()
        self.tracker = None  # a Tracker (launcher/metrics/tracking.py), set by the caller
        self._first_logged: Optional[tuple[int, float]] = None  # (step, time) for the ETA
        self.bar: StepBar | None = None  # rank 0's step bar on a terminal (start_progress)
        if is_writer:
            path.mkdir(parents=True, exist_ok=True)
            (path / "metrics.jsonl").touch()

    def event(self, record: dict) -> None:
        """A non-step record (resume, checkpoint, stop) in metrics.jsonl, tagged by `event`."""
        if self.is_writer:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps({**record, "time": time.time()}) + "\n")
            if self.tracker:
                self.tracker.event(record)

    def close(self, summary: Optional[dict] = None) -> None:
        if self.bar:
            self.bar.close()
        if self.tracker:
            self.tracker.finish(summary or {})

    def start_progress(self, total_steps: int, done: int) -> None:
        """From here on, a step bar under the console lines (rank 0, on a terminal)."""
        self.bar = step_bar(total_steps, done, self.is_writer)

    def advance(self) -> None:
        if self.bar:
            self.bar.advance()

    def info(self, text: str) -> None:
        if self.is_writer:
            self._print(text)

    def _print(self, text: str) -> None:
        if self.bar:
            self.bar.print_above(text)
        else:
            print(text, flush=True)

    def write_config(self, cfg: Config) -> None:
        if self.is_writer:
            (self.path / "config.yaml").write_text(dump_config(cfg))

    def log(self, record: dict, total_steps: int) -> None:
        if not self.is_writer:
            return
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker:
            self.tracker.log(record)
        parts = [f"step {record['step']}/{total_steps}", f"loss {record['loss']:.4f}"]
        if "val_loss" in record:
            parts.append(f"val {record['val_loss']:.4f}")
        parts.append(f"lr {record['lr']:.2e}")
        if record.get("grad_norm") is not None:
            parts.append(f"gnorm {record['grad_norm']:.3f}")
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        parts.append(f"{record['step_time_s']:.3f} s/step")
        if "mfu" in record:
            parts.append(f"mfu {100 * record['mfu']:.1f}%")
        if "peak_mem_gb" in record:
            parts.append(f"mem {record['peak_mem_gb']:.1f} GB")
        if record.get("loss_scale"):
            parts.append(f"scale {record['loss_scale']:.0f}")
        now = time.time()
        if self._first_logged is None:
            self._first_logged = (record["step"], now)
        elif record["step"] > self._first_logged[0]:
            per_step = (now - self._first_logged[1]) / (record["step"] - self._first_logged[0])
            parts.append(f"eta {_duration(per_step * (total_steps - record['step']))}")
        self._print(" | ".join(parts))

    def summary(self, step: int, last: dict, tokens_seen: int) -> None:
        if not last:  # resumed from a checkpoint of the last step, or train.steps=0: nothing to train
            self.info(f"done: nothing to train (at step {step}), run dir {self.path}")
            return
        minutes = (time.time() - self.started) / 60
        val = f", val loss {last['val_loss']:.4f}" if "val_loss" in last else ""
        self.info(f"done: {step} steps, loss {last['loss']:.4f}{val}, {tokens_seen:,} tokens in "
                  f"{minutes:.1f} min, run dir {self.path}")
