"""A step bar on rank 0's terminal (tqdm), kept under the console lines, so that a run shows
it is moving between its log steps. Only where stderr is a terminal: a log file or a batch
job's output gets the log lines alone.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm


class StepBar:
    """steps done / train.steps, with tqdm's rate and remaining time."""

    def __init__(self, total: int, done: int, stream: TextIO):
        self.bar = tqdm(total=total, initial=done, desc="train", unit="step", file=stream, leave=False,
                        mininterval=0.5)

    def advance(self) -> None:
        self.bar.update(1)

    def print_above(self, text: str) -> None:
        """A console line (stdout) printed above the bar, which is redrawn under it."""
        with tqdm.external_write_mode(file=self.bar.fp):
            print(text, flush=True)

    def close(self) -> None:
        self.bar.close()


def step_bar(total: int, done: int, is_writer: bool, stream: TextIO | None = None) -> StepBar | None:
    """A bar on `stream` (stderr) for the writer (rank 0) when it is a terminal, else None."""
    stream = stream or sys.stderr
    return StepBar(total, done, stream) if is_writer and stream.isatty() else None
