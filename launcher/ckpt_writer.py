"""Checkpoint files written once: each file's size and xxh3 taken from the bytes on their way
to the file, so finishing a save is only fsync + publish.

Where a save's time went before (bench/checkpoint.py, 296 MiB, 2 shared cores): torch.save
of tensors DeepSpeed had first cloned (0.75-0.97 s), fsync (0.23 s), then reading every file
back to checksum it (0.5-0.7 s, the page cache read at ~600 MB/s here). Now:

- DeepSpeed's checkpoint engine is swapped, for the length of one `save_checkpoint`, for
  `RecordingEngine`, which writes through a file object that hashes what it writes.
  torch.save hands a file object each record as one memoryview of the tensor's memory (no
  copy), so the hash costs one pass over memory that is hot anyway (xxh3: ~10 GB/s a core).
- DeepSpeed clones every tensor before torch.save (`clone_tensors_for_torch_save`) so that a
  view into a large flat buffer does not drag the whole buffer into the file. `saveable`
  copies only those views (and moves device tensors to the CPU, as the clone does); a tensor
  that owns its storage is written as it is. The loaded values are the same; the file format
  and names are DeepSpeed's own.

Why by hand: none of DeepSpeed 0.19's engines (Torch, Fast/Decoupled writer, DataStates)
reports what it wrote or its checksum, and the fast writers need the async-io op built
(libaio), which CPU and most cluster images lack. Files DeepSpeed writes by other means
(its zero_to_fp32.py copy) are not recorded; `launcher.checkpoint` checksums those from disk.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import xxhash


class HashingFile:
    """A binary file opened for writing that keeps the xxh3-64 and the count of the bytes
    written. No `seek`: a writer that seeks (torch.save's skip_data mode) fails loudly
    instead of recording a hash of bytes that are not the file's."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")  # buffered: BufferedWriter.write never writes short
        self._digest = xxhash.xxh3_64()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data)
        self._digest.update(view)
        self._file.write(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def __enter__(self) -> "HashingFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Written:
    """The files one rank wrote into a checkpoint directory: relative path -> manifest entry
    ({"file", "size", "xxh3"}, as `checkpoint.checksum_file` computes them from disk)."""

    def __init__(self, root: Path):
        self.root = root
        self.entries: dict[str, dict] = {}

    def _record(self, path: Path, f: HashingFile) -> None:
        # Not checked against the disk here: should two ranks write one path, the manifest
        # (launcher.checkpoint.manifest_entries) sees two entries or a size that is not the
        # file's, and reads that file from disk instead.
        rel = str(Path(path).relative_to(self.root))
        self.entries[rel] = {"file": rel, "size": f.size, "xxh3": f.hexdigest()}

    def torch_save(self, obj, path, zipfile: bool = True) -> None:
        path = Path(path)
        with HashingFile(path) as f:
            torch.save(obj, f, _use_new_zipfile_serialization=zipfile)
        self._record(path, f)

    def write_bytes(self, path, data: bytes) -> None:
        path = Path(path)
        with HashingFile(path) as f:
            f.write(data)
        self._record(path, f)


def saveable(item):
    """What DeepSpeed's `clone_tensors_for_torch_save` returns, copying only what needs it: a
    tensor on another device (to the CPU), a view smaller than its storage (torch.save would
    write the whole storage). Containers are rebuilt as theirs does (list, tuple, dict type)."""
    if torch.is_tensor(item):
        item = item.detach()
        if item.device.type != "cpu":
            return item.to("cpu")
        if item.untyped_storage().nbytes() > item.numel() * item.element_size():
            return item.clone()
        return item
    if isinstance(item, list):
        return [saveable(v) for v in item]
    if isinstance(item, tuple):
        return tuple(saveable(v) for v in item)
    if isinstance(item, dict):
        return type(item)({k: saveable(v) for k, v in item.items()})
    return item


class RecordingEngine:
    """DeepSpeed's TorchCheckpointEngine with `save` through `Written`; everything else
    (create, commit, makedirs, load) is the wrapped engine's."""

    def __init__(self, inner, written: Written):
        self._inner = inner
        self._written = written

    def save(self, state_dict, path: str) -> None:
        self._written.torch_save(saveable(state_dict), path, zipfile=self._inner.zipfile_serialization)

    def preserves_storage_sharing(self) -> bool:
        return False  # DeepSpeed skips its clone: `saveable` above copies what must be copied

    def __getattr__(self, name):
        return getattr(self._inner, name)


@contextlib.contextmanager
def recording(ds_engine, written: Written):
    """For the length of the block, DeepSpeed's files go through `written`. Another engine
    than DeepSpeed's default (a configured fast or decoupled writer) is left alone: its files
    are then checksummed from disk when the save is finished."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    inner = ds_engine.checkpoint_engine
    if type(inner) is not TorchCheckpointEngine:
        yield
        return
    ds_engine.checkpoint_engine = RecordingEngine(inner, written)
    try:
        yield
    finally:
        ds_engine.checkpoint_engine = inner
