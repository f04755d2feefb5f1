"""Values computed from a validated config, so the config itself stores only what the user wrote."""

from __future__ import annotations

from pathlib import Path

from launcher.config.schema import Config, ModelConfig, ParallelConfig
from parallel.layout import resolve_sequence_parallel


def sequence_parallel_on(parallel: ParallelConfig, model: ModelConfig, tp: int) -> bool:
    """parallel.sequence_parallel resolved for tensor degree tp: `auto` (left unresolved, as the
    planner sees it) is on when tp > 1 and the sequence splits evenly, the GPU default; a launch
    first decides it for its device (launcher/planning/effective.py). True with an uneven
    split is refused when the config loads."""
    context = parallel.context if isinstance(parallel.context, int) else 1
    return resolve_sequence_parallel(parallel.sequence_parallel, model.seq_len, tp, context)


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.dir) if cfg.run.dir else Path("runs") / cfg.run.name
