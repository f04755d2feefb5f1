"""The shuffled, blended sample order: which tokens global sample g is.

Samples. A split's documents, laid end to end with the end-of-document token between them
(prepare appended it), are cut into windows of seq_len + 1 tokens (inputs and targets
shifted by one) starting every seq_len tokens. Window order is a seeded pseudo-random
permutation per epoch (`feistel_permutation`): sample j of a dataset is window
perm_e(j mod N) of epoch e = j // N, computed per sample with nothing of size N built.

Blending. With several `data.sources`, global sample g comes from source s at that source's
own position j_s (`Blend`). The schedule is fixed per block of BLEND_BLOCK samples: each
source's share of the block from its weight, the order inside the block shuffled. So the
stream depends only on (data, weights, seq_len, seed), never on the layout, and a position
is `consumed_samples` plus where each source stood when the weights last changed. A prepared
source is named by its manifest's id, not its path: moved elsewhere, it continues the same
stream.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np

from launcher.data.sources import TokenStream, n_windows

BLEND_BLOCK = 1 << 16  # samples per blending block; shares are exact per block (see Blend)


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
    """Global sample g -> its seq_len + 1 tokens (and document starts), over blended datasets.

    `names`: each source's identity (a prepared dataset's manifest id, the same wherever the
    directory is moved), which keys its permutation and its entry in a checkpoint's position;
    `paths`: the sources as configured, for messages and logged shares."""

    def __init__(self, streams: list[TokenStream], names: list[str], weights: list[float], seq_len: int, seed: int,
                 salt: str, paths: Optional[list[str]] = None):
        self.streams, self.names, self.seq_len, self.seed, self.salt = streams, names, seq_len, seed, salt
        self.paths = list(paths) if paths is not None else list(names)
        # The key of each source's permutation: its name, or what the checkpoint being
        # resumed recorded (one written before manifest ids keyed its sources by path).
        self.orders = list(names)
        self.windows = [n_windows(s, seq_len) for s in streams]
        self.blend = Blend(weights, seed, salt)

    def window_ids(self, source: int, positions: np.ndarray) -> np.ndarray:
        """Window of each position of one source: epoch by epoch, a fresh permutation."""
        n = self.windows[source]
        epochs, within = np.divmod(positions, n)
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            sel = epochs == e
            key = permutation_key(self.seed, self.salt, self.orders[source], int(e))
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
                "sources": {name: {"weight": float(w), "base": int(b), "consumed": int(c), "path": path,
                                   "order": order}
                            for name, path, order, w, b, c in zip(self.names, self.paths, self.orders,
                                                                  self.blend.weights, self.blend.base,
                                                                  self.blend.consumed(consumed_samples))}}

    def _saved_sources(self, saved: dict) -> dict:
        """A checkpoint's sources keyed by this run's names. One written before manifest ids
        named each source by its configured path: matched by path, its permutation (keyed by
        that path) goes on; a source since moved is then a new one."""
        by_path = dict(zip(self.paths, self.names))
        out = {}
        for key, entry in saved.items():
            name = key if key in self.names else by_path.get(key, key)
            out[name] = {**entry, "order": entry.get("order", key), "path": entry.get("path", key)}
        return out

    def load_state_dict(self, state: dict) -> Optional[str]:
        """Continue from `state`. The same sources and weights continue the very same stream;
        otherwise each source continues from its consumed count (a new source from 0) under
        the new weights, from this position on. Returns a notice in that case."""
        consumed = int(state["consumed_samples"])
        saved = state.get("sources")
        if saved is None:  # a single-source position only
            saved = {self.names[0]: {"weight": 1.0, "base": 0, "consumed": consumed}} if len(self.names) == 1 else {}
            state = {**state, "origin": 0}
        saved = self._saved_sources(saved)
        self.orders = [saved[n]["order"] if n in saved else n for n in self.names]
        same = list(saved) == self.names and np.allclose([saved[n]["weight"] for n in self.names], self.blend.weights,
                                                         rtol=0, atol=1e-12)
        if same:
            self.blend = Blend(self.blend.weights, self.seed, self.salt, origin=int(state["origin"]),
                               base=[saved[n]["base"] for n in self.names])
            return None
        base = [int(saved.get(n, {}).get("consumed", 0)) for n in self.names]
        self.blend = Blend(self.blend.weights, self.seed, self.salt, origin=consumed, base=base)
        was = ", ".join(f"{v['path']} {v['weight']:.3g}" for v in saved.values())
        now = ", ".join(f"{p} {w:.3g}" for p, w in zip(self.paths, self.blend.weights))
        return (f"data sources or weights changed ({was} -> {now}): each source continues from the samples it had "
                "given; dropped sources stop")
