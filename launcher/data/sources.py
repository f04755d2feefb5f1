"""The datasets a run trains on: `data.sources` (or `data.path`) opened as prepared
directories and split into train and validation token streams; `embedded`, the shipped
corpus, prepared into the run's cache on first use.

Datasets. Training reads directories written by `python -m launcher.prepare`
(the format: launcher/data/shards.py): token shards and document boundaries, memory-mapped,
never read or hashed up front. `data.path: embedded` prepares the shipped corpus into the
run's `data/` cache on first use. Opening a dataset costs O(shards), whatever its size.

Splits. Each shard's last whole documents are held out for validation, `data.val_fraction`
of its tokens, the rounding carried from shard to shard so that the whole dataset holds out
that share even when shards have one document each (or all of `data.val_path` validates).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from launcher.config.schema import DataConfig, DataSource
from launcher.data.prepare import PrepareOptions, prepare
from launcher.data.shards import Shard, dataset_id, is_prepared, open_shard, read_manifest
from launcher.errors import ConfigError
from launcher.formats.tokenizer import load_tokenizer

EMBEDDED = "embedded"
EMBEDDED_CORPUS = Path(__file__).resolve().parent / "corpus" / "python_docs.jsonl.gz"


def data_sources(data: DataConfig) -> list[DataSource]:
    """The datasets to train on: `data.sources`, else `data.path` with weight 1."""
    return list(data.sources) if data.sources else [DataSource(path=data.path or EMBEDDED, weight=1.0)]


def source_key(index: int, data: DataConfig) -> str:
    return f"data.sources[{index}].path" if data.sources else "data.path"


def dataset_dir(path: str, tokenizer: str, cache_dir: Path) -> Path:
    """A prepared directory: `path` itself, or for `embedded` the shipped corpus prepared
    into `cache_dir` with this tokenizer (once; concurrent callers write identical files
    atomically)."""
    if path != EMBEDDED:
        return Path(path)
    out = Path(cache_dir) / f"embedded-{load_tokenizer(tokenizer).sha256[:16]}"
    if not is_prepared(out):
        prepare([str(EMBEDDED_CORPUS)], tokenizer, out, PrepareOptions(workers=1, progress=False))
    return out


def prepare_embedded(data: DataConfig, cache_dir: Path) -> None:
    """Prepare the embedded corpus into `cache_dir` if the run uses it (one caller per node
    before the others open it)."""
    if any(s.path == EMBEDDED for s in data_sources(data)) or data.val_path == EMBEDDED:
        dataset_dir(EMBEDDED, data.tokenizer, cache_dir)


# --------------------------------------------------------------------------------------
# One dataset: shards -> train / validation token streams
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenStream:
    """Document-aligned ranges of shards laid end to end: (shard, first token, end token)."""

    pieces: list[tuple[Shard, int, int]]
    starts: np.ndarray = field(repr=False)  # (len(pieces) + 1,) int64: stream offset of each piece

    @classmethod
    def of(cls, pieces: list[tuple[Shard, int, int]]) -> "TokenStream":
        pieces = [p for p in pieces if p[2] > p[1]]
        return cls(pieces, np.cumsum([0] + [b - a for _, a, b in pieces], dtype=np.int64))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, offset: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [offset, offset + length) as int64, and a bool mask of the positions where
        a document starts (from the shards' boundary index)."""
        tokens = np.empty(length, dtype=np.int64)
        starts = np.zeros(length, dtype=bool)
        done, i = 0, int(np.searchsorted(self.starts, offset, side="right")) - 1
        while done < length:
            shard, a, b = self.pieces[i]
            x = a + offset + done - int(self.starts[i])
            y = min(b, x + length - done)
            tokens[done:done + y - x] = shard.tokens[x:y]
            lo, hi = np.searchsorted(shard.bounds, [x, y], side="left")
            starts[np.asarray(shard.bounds[lo:hi]) - x + done] = True
            done, i = done + y - x, i + 1
        return tokens, starts


@dataclass(frozen=True)
class Dataset:
    """A prepared directory's train and validation streams, and what its manifest says."""

    path: str  # as configured: names the source in logs and messages
    train: TokenStream
    val: TokenStream
    manifest: dict

    @property
    def key(self) -> str:
        """What names the source in the sample order and a checkpoint's data position: the
        manifest's id (launcher/data/shards.py), so that a moved dataset continues the same
        stream; `embedded` for the shipped corpus (prepared anew into each run's cache)."""
        return EMBEDDED if self.path == EMBEDDED else dataset_id(self.manifest)


def open_dataset(path: str, root: Path, val_fraction: Optional[float], key: str) -> Dataset:
    """Memory-map a prepared dataset; hold out `val_fraction` of its documents (None: none)."""
    manifest = read_manifest(root, key)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    train, val = split_documents([open_shard(root, record, dtype, key) for record in manifest["shards"]],
                                 val_fraction)
    return Dataset(path=path, train=train, val=val, manifest=manifest)


def split_documents(shards: list[Shard], val_fraction: Optional[float]) -> tuple[TokenStream, TokenStream]:
    """(train, validation): each shard's last whole documents validate, about `val_fraction`
    of its tokens, with the rounding carried to the next shard (error diffusion) so that
    shards of one large document each still hold out their share overall. Reads a few
    boundary entries per shard (a binary search)."""
    train, val, carry = [], [], 0.0
    for shard in shards:
        end = int(shard.bounds[-1])
        cut = end
        if val_fraction:
            carry += end * val_fraction  # tokens this shard should hold out, with what earlier ones owed
            target = end - carry  # cut at the document boundary nearest to it
            i = int(np.searchsorted(shard.bounds, target, side="left"))
            if i == len(shard.bounds) or (i > 0 and target - shard.bounds[i - 1] < shard.bounds[i] - target):
                i -= 1
            cut = int(shard.bounds[i])
            carry -= end - cut
        train.append((shard, 0, cut))
        val.append((shard, cut, end))
    return TokenStream.of(train), TokenStream.of(val)


def embedded_byte_streams(val_fraction: float) -> tuple[TokenStream, TokenStream]:
    """The embedded corpus's split sizes under the byte tokenizer, without preparing it
    (for the launch checks: one token per UTF-8 byte plus the end-of-document token)."""
    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
        sizes = [len(json.loads(line)["text"].encode()) + 1 for line in f]
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return split_documents([Shard(tokens=np.zeros(0, np.uint8), bounds=bounds)], val_fraction)


def n_windows(stream: TokenStream, seq_len: int) -> int:
    return max(0, (len(stream) - 1) // seq_len)


def check_split_size(stream: TokenStream, seq_len: int, key: str, what: str) -> None:
    """`what` ("the training part of data/web") holds at least one sequence."""
    need = seq_len + 1
    if len(stream) < need:
        raise ConfigError(key, f"{what} has {len(stream):,} tokens, less than one sequence ({need:,} = "
                          "model.seq_len + 1): use more data or lower seq_len")
