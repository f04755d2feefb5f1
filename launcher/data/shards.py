"""The on-disk format of a prepared dataset: what `python -m launcher.prepare`
(launcher/data/prepare.py) writes and training reads (launcher/data/sources.py).

    DIR/manifest.json        written last, atomically: DIR is a complete dataset iff it exists
    DIR/tokenizer.json       a copy of the Hugging Face tokenizer, a SentencePiece model's conversion
                             (absent for `byte`)
    DIR/shards/NNNNNN.bin    tokens, little-endian uint16 (vocabulary <= 65536) or uint32
    DIR/shards/NNNNNN.idx    int64 little-endian, documents + 1 entries: document boundaries
                             as token offsets in the shard, from 0 to its token count
    DIR/shards/NNNNNN.json   the shard's record (below), written after its .bin and .idx: a
                             shard is finished iff its record exists and matches its task
    DIR/shards/NNNNNN.bad    the shard's bad lines (file:line: reason), before its record
    DIR/bad_lines.txt        all of them, in input order
    DIR/prepare-plan.json    what DIR is being prepared from (written first; launcher/data/prepare.py)
    DIR/[shards/]NAME.tmp.HOST.PID.*  being written by process PID on HOST, renamed to NAME
                             when complete (`temporary_file`, `commit_file`)

Every document in a shard ends with the tokenizer's end-of-document token, so the shards laid
end to end are the documents packed back to back with that token between them. Offsets and
counts are 64-bit everywhere (a shard may exceed 4G tokens).

manifest.json:
    {"format": FORMAT, "tokenizer": {"name", "sha256", "vocab_size", "eod_id"}, "dtype",
     "tokens", "documents", "bad_lines", "text_field",
     "sources": [{"path", "bytes"}], "shards": [shard record, ...], "id"}
    "id" (`dataset_id`): a digest of everything else in the manifest, the dataset's name in a
    run's sample order and checkpoints wherever the directory is moved (older manifests
    without it get the same digest when read)
shard record:
    {"name": "000000", "source": <index into sources>, "start": <byte>, "end": <byte>,
     "tokens": n, "documents": d, "bad_lines": b}

Why not Megatron's .bin/.idx: its index packs int32 document sizes (documents over 2G tokens
overflow) behind a binary header, and its builder funnels all tokens through one writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launcher.errors import ConfigError, show_value
from launcher.files import shared_file_mode, write_atomic

FORMAT = "llm-launcher-tokens/1"
MANIFEST = "manifest.json"
TOKENIZER_COPY = "tokenizer.json"
SHARDS = "shards"
DAMAGED = "the dataset is damaged: delete it and prepare it again"


def dataset_id(manifest: dict) -> str:
    """The manifest's "id", else the digest a manifest written today would record: sha256 of
    its other fields as canonical JSON (the inputs' paths and sizes, the tokenizer's hash,
    every shard's counts), 16 hex digits. It names the data, not where it lies."""
    if isinstance(manifest.get("id"), str):
        return manifest["id"]
    content = json.dumps({k: v for k, v in manifest.items() if k != "id"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_paths(root: Path, name: str) -> tuple[Path, Path, Path]:
    """(tokens .bin, index .idx, record .json) of shard `name`."""
    base = Path(root) / SHARDS / name
    return base.with_suffix(".bin"), base.with_suffix(".idx"), base.with_suffix(".json")


def temporary_file(path: Path):
    """A private temporary file beside `path`; its name says which host and process own it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.tmp.{socket.gethostname()}.{os.getpid()}.")
    os.fchmod(fd, shared_file_mode())  # mkstemp makes 0600; the committed file follows the umask
    os.close(fd)
    return open(tmp, "wb")  # committed or discarded by the caller


def commit_file(f, path: Path) -> None:
    """Make the temporary file `f` durable and rename it to `path` (atomic)."""
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(f.name, path)


def discard_file(f) -> None:
    f.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f.name)


def write_manifest(root: Path, manifest: dict) -> None:
    write_atomic(Path(root) / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path, key: str) -> dict:
    """The manifest of a prepared directory; one-line ConfigError naming `key` otherwise."""
    root = Path(path)
    if root.is_file():
        raise ConfigError(key, f"{root} is a file; training reads prepared token shards: python -m launcher.prepare "
                          f"--input {root} --out DIR, then set {key} to DIR")
    if not root.is_dir():
        raise ConfigError(key, f"not found: {root}")
    if not (root / MANIFEST).is_file():
        raise ConfigError(key, f"{root} is not a prepared dataset (no {MANIFEST}; an interrupted "
                          "`python -m launcher.prepare` finishes when run again)")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        ok = (manifest.get("format") == FORMAT and isinstance(manifest.get("shards"), list)
              and all(isinstance(record, dict) for record in manifest["shards"])
              and isinstance(manifest.get("tokenizer"), dict) and manifest.get("dtype") in ("uint16", "uint32"))
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(key, f"{root / MANIFEST}: unreadable ({err})") from None
    if not ok:
        raise ConfigError(key, f"{root / MANIFEST}: not a {FORMAT} manifest")
    return manifest


@dataclass(frozen=True)
class Shard:
    """One shard, memory-mapped: tokens and document boundaries (nothing read up front)."""

    tokens: np.ndarray  # (n,) uint16/uint32 memmap
    bounds: np.ndarray  # (documents + 1,) int64 memmap: 0, end of doc 0, ..., n


def open_shard(root: Path, record: dict, dtype: np.dtype, key: str = "data.path") -> Shard:
    """A shard with files missing, of other sizes than its record says (truncated, swapped)
    or boundaries that do not run from 0 to its token count is one line naming the file, here
    (two stats and two reads), not a crash in the middle of training."""
    name, n, docs = record.get("name"), record.get("tokens"), record.get("documents")
    if not (isinstance(name, str) and name.isalnum() and all(type(v) is int and v >= 0 for v in (n, docs))):
        raise ConfigError(key, f"{Path(root) / MANIFEST}: a shard record is not one: {show_value(record)}")
    bin_path, idx_path, _ = shard_paths(root, name)
    for path, size in ((bin_path, n * dtype.itemsize), (idx_path, (docs + 1) * 8)):
        try:
            found = path.stat().st_size
        except OSError as err:
            raise ConfigError(key, f"{path}: {err.strerror or err}: {DAMAGED}") from None
        if found != size:
            raise ConfigError(key, f"{path}: {found} bytes, its record in {MANIFEST} says {size}: {DAMAGED}")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
    bounds = np.memmap(idx_path, dtype="<i8", mode="r", shape=(docs + 1,))
    if bounds[0] != 0 or bounds[-1] != n:
        raise ConfigError(key, f"{idx_path}: document boundaries from {bounds[0]} to {bounds[-1]}, its record says 0 "
                          f"to {n} tokens: {DAMAGED}")
    return Shard(tokens=tokens, bounds=bounds)


def check_shards(root: Path, key: str) -> None:
    """Every shard of a prepared directory opens (present, of its size, its boundaries whole)."""
    manifest = read_manifest(root, key)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    for record in manifest["shards"]:
        open_shard(root, record, dtype, key)
