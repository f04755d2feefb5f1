"""Data path: text -> byte tokens in a numpy memmap -> fixed-length windows -> batches.

Samples. The token stream is cut into windows of seq_len + 1 tokens (input and the target
shifted by one) starting every seq_len tokens. The run reads a single global stream of
samples: sample g of the run is window perm_e[g mod N] of epoch e = g // N, where perm_e is
a seeded permutation of the N windows. So no window repeats within an epoch, and the stream
depends only on (data, seq_len, seed), never on the layout.

Batches. Global step k consumes samples [k * global_batch, (k + 1) * global_batch).
Micro-batch m of data-parallel rank r takes the micro_batch samples starting at offset
(m * dp + r) * micro_batch. The samples of a step are the same for every dp and micro-batch
split, so layouts can be compared, and a job may resume on a different dp degree: the
position is just `consumed_samples`.

Who reads. Every tp rank of a group builds the same batch (same arithmetic, no broadcast
needed); in a pipeline only the first stage (inputs) and the last stage (targets) use it.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from launcher.config import DataConfig
from launcher.files import write_atomic

EMBEDDED_CORPUS = Path(__file__).resolve().parent / "corpus" / "python_docs.txt.gz"


def byte_tokenize(text: bytes) -> np.ndarray:
    """UTF-8 bytes are the tokens: vocabulary 256, nothing to download or train."""
    return np.frombuffer(text, dtype=np.uint8)


def byte_detokenize(tokens) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def _source_bytes(data: DataConfig) -> bytes:
    if data.path == "embedded":
        return gzip.decompress(EMBEDDED_CORPUS.read_bytes())
    return Path(data.path).read_bytes()


@dataclass(frozen=True)
class TokenSplits:
    train: np.ndarray  # read-only memmaps of uint8 tokens
    val: np.ndarray


def load_tokens(data: DataConfig, cache_dir: Path) -> TokenSplits:
    """Tokenize once into `cache_dir` (named by a hash of the source), then memmap."""
    raw = _source_bytes(data)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    path = Path(cache_dir) / f"tokens-byte-{digest}.bin"
    if not path.exists():
        write_atomic(path, byte_tokenize(raw).tobytes())  # ranks may race: atomic
    tokens = np.memmap(path, dtype=np.uint8, mode="r")
    split = train_tokens(len(tokens), data.val_fraction)
    return TokenSplits(train=tokens[:split], val=tokens[split:])


def train_tokens(n_tokens: int, val_fraction: float) -> int:
    """Where the held-out tail starts: tokens [0, this) train, the rest validate."""
    return int(n_tokens * (1 - val_fraction))


class SampleStream:
    """Sample g of the run -> window id, epoch by epoch, each epoch a seeded permutation."""

    def __init__(self, n_windows: int, seed: int):
        if n_windows < 1:
            raise ValueError("the corpus is shorter than one sequence")
        self.n_windows = n_windows
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.n_windows)
        return self._perms[epoch]

    def window_ids(self, start: int, count: int) -> np.ndarray:
        g = np.arange(start, start + count)
        return np.array([self._perm(int(i) // self.n_windows)[int(i) % self.n_windows] for i in g], dtype=np.int64)


def n_windows(tokens: np.ndarray, seq_len: int) -> int:
    return (len(tokens) - 1) // seq_len


def make_batch(tokens: np.ndarray, ids: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (len(ids), seq_len) int64."""
    rows = np.stack([np.asarray(tokens[i * seq_len: i * seq_len + seq_len + 1]) for i in ids])
    rows = torch.from_numpy(rows.astype(np.int64))
    return rows[:, :-1], rows[:, 1:]


class GlobalBatches:
    """This data-parallel rank's micro-batches, step after step; resumable by position."""

    def __init__(self, tokens: np.ndarray, seq_len: int, *, global_batch: int, micro_batch: int, dp: int,
                 dp_rank: int, seed: int, consumed_samples: int = 0):
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch, self.micro_batch, self.dp, self.dp_rank = global_batch, micro_batch, dp, dp_rank
        self.stream = SampleStream(n_windows(tokens, seq_len), seed)
        self.consumed_samples = consumed_samples

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    def micro_batches(self, step_start: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ids = self.stream.window_ids(step_start, self.global_batch)
        out = []
        for m in range(self.grad_accum):
            offset = (m * self.dp + self.dp_rank) * self.micro_batch
            out.append(make_batch(self.tokens, ids[offset:offset + self.micro_batch], self.seq_len))
        return out

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.micro_batches(self.consumed_samples)
        self.consumed_samples += self.global_batch
        return batches

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])
