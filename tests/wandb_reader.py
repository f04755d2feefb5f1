"""Read the history of an offline wandb run from its run-<id>.wandb file.

wandb 0.31 moved its Python reader of these files into its Go core; the file is still
wandb's record log (LevelDB-style 32 KiB blocks of chunked records after a 7-byte header)
of protobuf `Record`s, decoded here with wandb's own generated protobuf classes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7  # file header: ":W&B", magic 0xBEE1, version; record header: crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a wandb run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # too little room left in this block: skip to the next
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def history(run_dir: Path) -> list[dict]:
    """Every logged history row of the (single) offline run under run_dir/wandb."""
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows = []
    for record in records(run_file):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def run_ids(run_dir: Path) -> set[str]:
    ids = set()
    for run_file in run_dir.glob("wandb/offline-run-*/run-*.wandb"):
        for record in records(run_file):
            if record.WhichOneof("record_type") == "run":
                ids.add(record.run.run_id)
    return ids
