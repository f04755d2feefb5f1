"""Data path: prepared token shards (memory-mapped) -> packed windows -> blended, shuffled
global batches, resumable from a position.

Datasets. Training reads directories written by `python -m launcher.prepare`
(launcher/shards.py): token shards and document boundaries, memory-mapped, never read or
hashed up front. `data.path: embedded` prepares the shipped corpus into the run's `data/`
cache on first use. Opening a dataset costs O(shards), whatever its size.

Splits. Each shard's last whole documents are held out for validation, `data.val_fraction`
of its tokens, the rounding carried from shard to shard so that the whole dataset holds out
that share even when shards have one document each (or all of `data.val_path` validates).

Samples. A split's documents, laid end to end with the end-of-document token between them
(prepare appended it), are cut into windows of seq_len + 1 tokens (inputs and targets
shifted by one) starting every seq_len tokens. Window order is a seeded pseudo-random
permutation per epoch (`feistel_permutation`): sample j of a dataset is window
perm_e(j mod N) of epoch e = j // N, computed per sample with nothing of size N built.

Blending. With several `data.sources`, global sample g comes from source s at that source's
own position j_s (`Blend`). The schedule is fixed per block of BLEND_BLOCK samples: each
source's share of the block from its weight, the order inside the block shuffled. So the
stream depends only on (data, weights, seq_len, seed), never on the layout, and a position
is `consumed_samples` plus where each source stood when the weights last changed.

Batches. Global step k consumes samples [k * global_batch, (k + 1) * global_batch).
Micro-batch m of data-parallel rank r takes the micro_batch samples starting at offset
(m * dp + r) * micro_batch. The samples of a step are the same for every dp and micro-batch
split, so layouts can be compared and a job may resume on another dp.

Documents. With `data.document_attention`, inputs are (ids, segments): the document index
of each position inside its window, from the prepared boundaries (never by looking for the
end token); with `data.eod_mask_loss`, targets are (targets, loss_mask), 0 where the input
is a document's last token. launcher/model.py turns segments into positions and masks.

Who reads. Every tp rank of a group builds the same batch (same arithmetic, no broadcast
needed); in a pipeline only the first stage (inputs) and the last stage (targets) use it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from launcher.config import ConfigError, DataConfig, DataSource
from launcher.shards import Shard, is_prepared, open_shard, read_manifest

EMBEDDED = "embedded"
EMBEDDED_CORPUS = Path(__file__).resolve().parent / "corpus" / "python_docs.jsonl.gz"
BLEND_BLOCK = 1 << 16  # samples per blending block; shares are exact per block (see Blend)


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
    from launcher.prepare import prepare
    from launcher.tokenizer import load_tokenizer

    out = Path(cache_dir) / f"embedded-{load_tokenizer(tokenizer).sha256[:16]}"
    if not is_prepared(out):
        prepare([str(EMBEDDED_CORPUS)], tokenizer, out, workers=1, progress=False)
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

    path: str  # as configured: names the source in logs and checkpoints
    train: TokenStream
    val: TokenStream
    manifest: dict


def open_dataset(path: str, root: Path, val_fraction: Optional[float], key: str) -> Dataset:
    """Memory-map a prepared dataset; hold out `val_fraction` of its documents (None: none)."""
    manifest = read_manifest(root, key)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    train, val = split_documents([open_shard(root, record, dtype) for record in manifest["shards"]], val_fraction)
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


# --------------------------------------------------------------------------------------
# Order: a seeded permutation evaluated per index
# --------------------------------------------------------------------------------------

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixing hash of 64-bit words."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def permutation_key(*parts) -> np.ndarray:
    """Four 64-bit round keys from anything printable (seed, source, epoch)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return np.frombuffer(digest, dtype="<u8").copy()


def feistel_permutation(index: np.ndarray, n: int, key: np.ndarray) -> np.ndarray:
    """perm(index) for a pseudo-random permutation of [0, n) chosen by `key`, evaluated
    elementwise in O(1) memory: a 4-round Feistel network on the smallest even number of
    bits covering n (a permutation of [0, 4^k)), with cycle-walking until the value falls
    in [0, n) (fewer than 4 rounds on average). Hand-written because numpy and torch only
    offer materialised permutations (`rng.permutation(n)`: O(n) memory and time at start,
    the cost Megatron users report as minutes of index building)."""
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    out = np.asarray(index, dtype=np.uint64).copy()
    todo = np.ones(out.shape, dtype=bool)
    with np.errstate(over="ignore"):
        while todo.any():
            x = out[todo]
            left, right = x >> shift, x & mask
            for k in key:
                left, right = right, left ^ (_mix(right ^ k) & mask)
            out[todo] = (left << shift) | right
            todo[todo] = out[todo] >= np.uint64(n)
    return out.astype(np.int64)


# --------------------------------------------------------------------------------------
# Blending: global sample -> (source, position in that source)
# --------------------------------------------------------------------------------------


class Blend:
    """Which source, and which of its samples, global sample g is.

    Block b = samples [origin + b*B, origin + (b+1)*B): source s gets C_s((b+1)B) - C_s(bB)
    of them, where C_s(n) = floor(w_s n) for all sources but the heaviest, which takes the
    rest; C is non-decreasing in n (B/S >= S), so every quota is >= 0 and the shares are
    exact at block ends. The block's labels are shuffled by a seeded permutation, and a
    sample's position in its source is where the source stood at `origin` (`base`) plus
    C_s(bB) plus how many of the block's earlier samples it already gave."""

    def __init__(self, weights: list[float], seed: int, salt: str, origin: int = 0, base: Optional[list[int]] = None):
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.seed, self.salt, self.origin = seed, salt, origin
        self.base = np.asarray(base if base is not None else [0] * len(w), dtype=np.int64)
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _counts(self, n: int) -> np.ndarray:
        counts = np.floor(self.weights * n).astype(np.int64)
        heaviest = int(np.argmax(self.weights))
        counts[heaviest] = n - (counts.sum() - counts[heaviest])
        return counts

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each sample of block b, its rank among the block's samples of that source)."""
        if b not in self._blocks:
            if len(self._blocks) > 2:
                self._blocks.clear()
            quota = self._counts((b + 1) * BLEND_BLOCK) - self._counts(b * BLEND_BLOCK)
            labels = np.repeat(np.arange(len(quota)), quota)
            labels = labels[feistel_permutation(np.arange(BLEND_BLOCK), BLEND_BLOCK,
                                                permutation_key(self.seed, self.salt, "blend", b))]
            order = np.argsort(labels, kind="stable")
            rank = np.empty(BLEND_BLOCK, dtype=np.int64)
            rank[order] = np.arange(BLEND_BLOCK) - np.repeat(np.cumsum(quota) - quota, quota)
            self._blocks[b] = (labels, rank)
        return self._blocks[b]

    def locate(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, position in source) of global samples [start, start + count)."""
        h = np.arange(start - self.origin, start - self.origin + count, dtype=np.int64)
        if len(self.weights) == 1:
            return np.zeros(count, dtype=np.int64), self.base[0] + h
        sources, positions = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.int64)
        for b in np.unique(h // BLEND_BLOCK):
            sel = h // BLEND_BLOCK == b
            labels, rank = self._block(int(b))
            r = h[sel] % BLEND_BLOCK
            sources[sel] = labels[r]
            positions[sel] = self.base[labels[r]] + self._counts(int(b) * BLEND_BLOCK)[labels[r]] + rank[r]
        return sources, positions

    def consumed(self, consumed_samples: int) -> np.ndarray:
        """Samples each source has given once `consumed_samples` global samples are read."""
        h = consumed_samples - self.origin
        b, r = divmod(h, BLEND_BLOCK)
        counts = self.base + self._counts(b * BLEND_BLOCK)
        if r:
            labels, _ = self._block(b)
            counts += np.bincount(labels[:r], minlength=len(self.weights))
        return counts


# --------------------------------------------------------------------------------------
# Samples and batches
# --------------------------------------------------------------------------------------


class SampleSource:
    """Global sample g -> its seq_len + 1 tokens (and document starts), over blended datasets."""

    def __init__(self, streams: list[TokenStream], names: list[str], weights: list[float], seq_len: int, seed: int,
                 salt: str):
        self.streams, self.names, self.seq_len, self.seed, self.salt = streams, names, seq_len, seed, salt
        self.windows = [n_windows(s, seq_len) for s in streams]
        self.blend = Blend(weights, seed, salt)

    def window_ids(self, source: int, positions: np.ndarray) -> np.ndarray:
        """Window of each position of one source: epoch by epoch, a fresh permutation."""
        n = self.windows[source]
        epochs, within = np.divmod(positions, n)
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            sel = epochs == e
            key = permutation_key(self.seed, self.salt, self.names[source], int(e))
            out[sel] = feistel_permutation(within[sel], n, key)
        return out

    def rows(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, document starts), each (count, seq_len + 1), of samples [start, start + count)."""
        T = self.seq_len
        sources, positions = self.blend.locate(start, count)
        tokens = np.empty((count, T + 1), dtype=np.int64)
        starts = np.empty((count, T + 1), dtype=bool)
        for s in np.unique(sources):
            sel = np.flatnonzero(sources == s)
            for i, w in zip(sel, self.window_ids(int(s), positions[sel])):
                tokens[i], starts[i] = self.streams[s].read(int(w) * T, T + 1)
        return tokens, starts

    def state_dict(self, consumed_samples: int) -> dict:
        """Where the stream stands: enough to continue it exactly, or to continue every source
        from its own count under new weights."""
        return {"consumed_samples": consumed_samples, "origin": self.blend.origin,
                "sources": {name: {"weight": float(w), "base": int(b), "consumed": int(c)} for name, w, b, c in
                            zip(self.names, self.blend.weights, self.blend.base, self.blend.consumed(consumed_samples))}}

    def load_state_dict(self, state: dict) -> Optional[str]:
        """Continue from `state`. The same sources and weights continue the very same stream;
        otherwise each source continues from its consumed count (a new source from 0) under
        the new weights, from this position on. Returns a notice in that case."""
        consumed = int(state["consumed_samples"])
        saved = state.get("sources")
        if saved is None:  # a single-source position only
            saved = {self.names[0]: {"weight": 1.0, "base": 0, "consumed": consumed}} if len(self.names) == 1 else {}
            state = {**state, "origin": 0}
        same = list(saved) == self.names and np.allclose([saved[n]["weight"] for n in self.names], self.blend.weights,
                                                         rtol=0, atol=1e-12)
        if same:
            self.blend = Blend(self.blend.weights, self.seed, self.salt, origin=int(state["origin"]),
                               base=[saved[n]["base"] for n in self.names])
            return None
        base = [int(saved.get(n, {}).get("consumed", 0)) for n in self.names]
        self.blend = Blend(self.blend.weights, self.seed, self.salt, origin=consumed, base=base)
        was = ", ".join(f"{n} {v['weight']:.3g}" for n, v in saved.items())
        now = ", ".join(f"{n} {w:.3g}" for n, w in zip(self.names, self.blend.weights))
        return (f"data sources or weights changed ({was} -> {now}): each source continues from the samples it had "
                "given; dropped sources stop")


def to_batch(tokens: np.ndarray, starts: np.ndarray, document_attention: bool, eod_mask_loss: bool):
    """Model inputs and targets from (k, T + 1) rows: ids or (ids, segments), and targets
    or (targets, loss_mask) (see launcher/model.py)."""
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
    names, weights = [ds.path for ds in datasets], [s.weight for s in sources]
    if data.val_path:
        held = open_dataset(data.val_path, dataset_dir(data.val_path, data.tokenizer, cache_dir), None,
                            "data.val_path")
        val_streams, val_names, val_weights = [held.train], [data.val_path], [1.0]
    else:
        val_streams, val_names, val_weights = [ds.val for ds in datasets], names, weights
    for stream, name in zip(val_streams, val_names):
        check_split_size(stream, seq_len, "data.val_path" if data.val_path else "data.val_fraction",
                         f"{name}" if data.val_path else f"the held-out part of {name}")
    doc_args = dict(document_attention=data.document_attention, eod_mask_loss=data.eod_mask_loss)
    train = SampleSource([ds.train for ds in datasets], names, weights, seq_len, seed, "train")
    val = SampleSource(val_streams, val_names, val_weights, seq_len, seed, "val")
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
    counts = {name: s["consumed"] for name, s in state["sources"].items()}
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
