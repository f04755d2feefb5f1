"""Loading a verified checkpoint into this rank's engine (collective).

DeepSpeed's own loader when it reads the saved layout for this run's (launcher/ds/seams.py
`deepspeed_load_checkpoint`), else resharding (launcher/checkpoint/reshard.py); then the
learning rate, and on the same layout this rank's RNG and compression state.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Optional

import torch

from launcher.checkpoint.reshard import load_resharded
from launcher.checkpoint.state import (
    LauncherState,
    SavedLayout,
    deepspeed_loads,
    same_layout,
    set_rng_state,
)
from launcher.checkpoint.store import MOE_STATE
from launcher.ds.seams import deepspeed_load_checkpoint, load_weights_only
from launcher.errors import ConfigError


def load(ds_engine, ckpt: Path, saved: LauncherState, current: SavedLayout, rank: int, shard_ranks: tuple[int, int],
         compressor=None, device: Optional[torch.device] = None) -> tuple[Optional[str], list[str]]:
    """Collective: DeepSpeed state (model, optimizer incl. ZeRO shards, scheduler) and, on
    the same layout, this rank's RNG and compression state. `saved`: the checkpoint's
    launcher_state.json; `current`: this run's layout; `shard_ranks`: this rank's tp rank and
    expert rank (parallel/layout.py). Returns (how the checkpoint was
    resharded, or None when DeepSpeed read it as saved; notices of state started afresh).

    Another layout DeepSpeed cannot read (tensor or pipeline degree, stage boundaries, ZeRO
    stage, dtype, or dp under its bf16 optimizer) is resharded (launcher/checkpoint/reshard.py):
    every rank reads its own slices of the saved state.

    Compression state (PowerSGD's error feedback) is per rank and has no meaning on another
    layout: there, and when the checkpoint has none, compression starts afresh.

    A different data-parallel degree: ZeRO 0 state does not depend on dp; ZeRO 1/2 state
    is saved in DeepSpeed's elastic format (zero_optimization.elastic_checkpoint), which its
    optimizer merges and re-partitions on load. DeepSpeed 0.19's engine still refuses any
    dp change up front (one `seq_dp_world_size` comparison), so for the length of the load
    it is shown the saved dp, which is exactly what its elastic path expects."""
    resharded = None
    if deepspeed_loads(saved.layout, current):
        deepspeed_load_checkpoint(ds_engine, ckpt, saved.layout.dp, current.dp)
    else:
        start = time.perf_counter()
        tp_rank, expert_rank = shard_ranks
        load_resharded(ds_engine, ckpt, saved.layout, saved.fingerprint["model"], (tp_rank, current.tp),
                       (expert_rank, current.model_ranks))
        resharded = (f"checkpoint {ckpt.name} was saved with {saved.layout.describe()}: resharded to "
                     f"{current.describe()} at load ({time.perf_counter() - start:.1f} s on rank {rank}; "
                     "each rank read its own slices; RNG states start from the seed)")
    # The scheduler's load_state_dict restores its counter, not the optimizer's lr; ZeRO's
    # elastic optimizer state has no param_groups to bring it back. Without this the first
    # step after a resume would run at step 1's warm-up lr.
    if ds_engine.lr_scheduler is not None:
        for group, lr in zip(ds_engine.optimizer.param_groups, ds_engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    return resharded, _load_rank_state(ckpt, same_layout(saved.layout, current), rank, compressor, device)


def load_moe_state(ckpt: Path, moe_state, device: Optional[torch.device] = None) -> None:
    """The MoE balancing biases (launcher/model/moe.py MoEState): one file for every layout."""
    path = ckpt / MOE_STATE
    if not path.is_file():
        raise ConfigError("checkpoint.resume", f"{ckpt}: no {MOE_STATE} (the MoE balancing state); saved by a "
                          "model without model.moe?")
    try:
        moe_state.load_state_dict(load_weights_only(path, map_location=device))
    except (ValueError, KeyError, pickle.UnpicklingError) as err:
        raise ConfigError("checkpoint.resume", f"{path}: {err}") from None


def _load_rank_state(ckpt: Path, same: bool, rank: int, compressor, device: Optional[torch.device]) -> list[str]:
    """This rank's RNG and compression state, on the same layout only; notices, if any."""
    notes = []
    rng_file = ckpt / "rng" / f"rank-{rank:05d}.pt"
    if same and rng_file.exists():
        try:
            set_rng_state(load_weights_only(rng_file))
        except pickle.UnpicklingError:  # written before RNG states were plain data (numpy objects)
            notes.append(f"{rng_file}: not plain data (an older checkpoint), refused unread; RNG states start "
                         "from the seed, so this resume is not bit-exact")
    if compressor is not None:
        compression_file = ckpt / "compression" / f"rank-{rank:05d}.pt"
        try:
            saved = load_weights_only(compression_file, map_location=device) if same else None
        except (FileNotFoundError, pickle.UnpicklingError):
            saved = None
        note = compressor.load_state_dict(saved) if saved is not None else (
            f"compression: no PowerSGD state for this layout in {ckpt.name}; error feedback and factors start afresh")
        if note:
            notes.append(note)
    return notes
