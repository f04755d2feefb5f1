"""What a run's data is (`RunData`: the train and validation batch streams over its
datasets) and the global batches each data-parallel rank takes from them.

Batches. Global step k consumes samples [k * global_batch, (k + 1) * global_batch).
Micro-batch m of data-parallel rank r takes the micro_batch samples starting at offset
(m * dp + r) * micro_batch. The samples of a step are the same for every dp and micro-batch
split, so layouts can be compared and a job may resume on another dp.

Documents. With `data.document_attention`, inputs are (ids, segments): the document index
of each position inside its window, from the prepared boundaries (never by looking for the
end token); with `data.eod_mask_loss`, targets are (targets, loss_mask), 0 where the input
is a document's last token. launcher/model/documents.py turns segments into positions and
masks.

Who reads. Every tp rank of a group builds the same batch (same arithmetic, no broadcast
needed); in a pipeline only the first stage (inputs) and the last stage (targets) use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from launcher.config.schema import DataConfig
from launcher.data.sampling import SampleSource
from launcher.data.sources import (
    Dataset,
    check_split_size,
    data_sources,
    dataset_dir,
    open_dataset,
    prepare_embedded,
    source_key,
)
from launcher.errors import ConfigError


def to_batch(tokens: np.ndarray, starts: np.ndarray, document_attention: bool, eod_mask_loss: bool):
    """Model inputs and targets from (k, T + 1) rows: ids or (ids, segments), and targets
    or (targets, loss_mask) (see launcher/model/documents.py)."""
    rows = torch.from_numpy(tokens)
    inputs, targets = rows[:, :-1], rows[:, 1:]
    if document_attention:
        segments = np.cumsum(starts[:, :-1], axis=1) - starts[:, :1]  # position 0 is segment 0
        inputs = (inputs, torch.from_numpy(segments.astype(np.int64)))
    if eod_mask_loss:  # the input is a document's last token when the next position starts one
        targets = (targets, torch.from_numpy((~starts[:, 1:]).astype(np.float32)))
    return inputs, targets


class GlobalBatches:
    """This data-parallel rank's micro-batches, step after step; resumable by position."""

    def __init__(self, source: SampleSource, *, global_batch: int, micro_batch: int, dp: int, dp_rank: int,
                 document_attention: bool = False, eod_mask_loss: bool = False, consumed_samples: int = 0):
        self.source = source
        self.global_batch, self.micro_batch, self.dp, self.dp_rank = global_batch, micro_batch, dp, dp_rank
        self.document_attention, self.eod_mask_loss = document_attention, eod_mask_loss
        self.consumed_samples = consumed_samples

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    def micro_batches(self, step_start: int) -> list:
        out = []
        for m in range(self.grad_accum):
            offset = step_start + (m * self.dp + self.dp_rank) * self.micro_batch
            tokens, starts = self.source.rows(offset, self.micro_batch)
            out.append(to_batch(tokens, starts, self.document_attention, self.eod_mask_loss))
        return out

    def next_step(self) -> list:
        batches = self.micro_batches(self.consumed_samples)
        self.consumed_samples += self.global_batch
        return batches

    def state_dict(self) -> dict:
        return self.source.state_dict(self.consumed_samples)

    def load_state_dict(self, state: dict) -> Optional[str]:
        note = self.source.load_state_dict(state)
        self.consumed_samples = int(state["consumed_samples"])
        return note


@dataclass
class RunData:
    """What training reads: its batches, the validation batches, and the realised blend."""

    train: GlobalBatches
    val: GlobalBatches
    datasets: list[Dataset]


def open_run_data(data: DataConfig, seq_len: int, seed: int, cache_dir: Path, **batch_args) -> RunData:
    """Open every source (memory maps and boundary indexes only), check each split holds a
    sequence, and build the train and validation batch streams."""
    sources = data_sources(data)
    val_fraction = None if data.val_path else data.val_fraction
    datasets = [open_dataset(s.path, dataset_dir(s.path, data.tokenizer, cache_dir), val_fraction,
                             source_key(i, data)) for i, s in enumerate(sources)]
    for i, ds in enumerate(datasets):
        check_split_size(ds.train, seq_len, source_key(i, data), f"the training part of {ds.path}")
        same = next((other for other in datasets[:i] if other.key == ds.key), None)
        if same is not None:
            raise ConfigError(source_key(i, data), f"{ds.path} is the same dataset as {same.path} (manifest id "
                              f"{ds.key}): list it once, with the weights added")
    keys, paths, weights = [ds.key for ds in datasets], [ds.path for ds in datasets], [s.weight for s in sources]
    if data.val_path:
        held = open_dataset(data.val_path, dataset_dir(data.val_path, data.tokenizer, cache_dir), None,
                            "data.val_path")
        val_streams, val_keys, val_paths, val_weights = [held.train], [held.key], [data.val_path], [1.0]
    else:
        val_streams, val_keys, val_paths, val_weights = [ds.val for ds in datasets], keys, paths, weights
    for stream, name in zip(val_streams, val_paths):
        check_split_size(stream, seq_len, "data.val_path" if data.val_path else "data.val_fraction",
                         f"{name}" if data.val_path else f"the held-out part of {name}")
    doc_args = dict(document_attention=data.document_attention, eod_mask_loss=data.eod_mask_loss)
    train = SampleSource([ds.train for ds in datasets], keys, weights, seq_len, seed, "train", paths)
    val = SampleSource(val_streams, val_keys, val_weights, seq_len, seed, "val", val_paths)
    return RunData(train=GlobalBatches(train, **batch_args, **doc_args),
                   val=GlobalBatches(val, **batch_args, **doc_args),  # a fixed set: always from position 0
                   datasets=datasets)


def training_batches(cfg, cache_dir: Path, *, global_batch: int, micro_batch: int, dp: int = 1,
                     dp_rank: int = 0) -> GlobalBatches:
    """The training stream of a config in one process (tests and benchmarks): what a run builds."""
    prepare_embedded(cfg.data, cache_dir)
    return open_run_data(cfg.data, cfg.model.seq_len, cfg.train.seed, cache_dir, global_batch=global_batch,
                         micro_batch=micro_batch, dp=dp, dp_rank=dp_rank).train


def realised_shares(state: dict) -> dict[str, float]:
    """Share of the samples so far that each source gave (logged beside the requested one)."""
    counts = {s.get("path", name): s["consumed"] for name, s in state["sources"].items()}
    total = sum(counts.values()) or 1
    return {name: c / total for name, c in counts.items()}


def describe_data(data: RunData) -> str:
    """The launch's data line: each source's size, requested share and epoch length."""
    parts = []
    for ds, stream, w, n in zip(data.datasets, data.train.source.streams, data.train.source.blend.weights,
                                data.train.source.windows):
        m = ds.manifest
        parts.append(f"{ds.path}: {m['documents']:,} docs, {len(stream):,} training tokens, {n:,} samples/epoch"
                     + (f", weight {w:.3f}" if len(data.datasets) > 1 else ""))
    return "data       " + "; ".join(parts)
