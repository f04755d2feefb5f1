"""The checkpoints of a run on disk: tags, manifest, verification, retention, choosing
the one to resume.

On disk, under `checkpoint.dir` (default <run.dir>/checkpoints):

    step-00000020/              a complete checkpoint (published by one rename)
        global_step.../ or *.pt DeepSpeed's own files (model, optimizer/ZeRO shards, scheduler)
        rng/rank-00003.pt       python, numpy, torch (and cuda) RNG states of every rank
        compression/rank-00003.pt  PowerSGD state of every rank (error feedback, factors)
        launcher_state.json     step, tokens seen, sampler position, layout, config fingerprint
        manifest.json           every file above with its size and xxh3; written last
    latest                      the newest published tag (replaced atomically; for humans and tools)
    .partial/step-00000030/     a save in progress (or one that crashed): never loaded

Which of DeepSpeed's files holds what: launcher/checkpoint/ds_files.py; what
launcher_state.json records: launcher/checkpoint/state.py.

Save (launcher/checkpoint/save.py): every rank writes into .partial/<tag>, hashing each
file as it writes it (launcher/checkpoint/writer.py: no file is read back); local rank 0
of every node fsyncs every file (each node flushes its own page cache); every rank leaves
the sizes and checksums of the files it wrote in .partial/<tag>/.parts/; rank 0 writes
the manifest, renames the directory into place, fsyncs, replaces `latest`, then applies
`keep_last`. With `checkpoint.async` the flush/publish half runs in a background thread
per rank while training continues (which never removes the newest complete checkpoint).
A crash at any point leaves the previous checkpoint as the newest complete one.

Resume: candidates are the published step-* directories, newest first; each is verified
against its manifest (files split over all ranks, so a 1 TB checkpoint is read in
parallel) and the first that verifies wins. A newer one that fails is skipped with one
line naming the file.

Why not DeepSpeed's `latest` + `load_checkpoint(tag=None)` alone: DeepSpeed writes files in
place and updates `latest` with no manifest, so a save killed halfway is taken for a good
one on the next start (the failure users report most for GPT-NeoX / Megatron-DeepSpeed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch.distributed as dist
import xxhash

from launcher.config.derived import run_dir
from launcher.config.schema import Config
from launcher.errors import ConfigError

MANIFEST = "manifest.json"
STATE = "launcher_state.json"
MOE_STATE = "moe_balance.pt"  # MoE balancing biases (launcher/model/moe.py): one file, any layout
PARTIAL = ".partial"
PARTS = ".parts"  # per-rank checksum shares while a save is being finished; never published
TAG_RE = re.compile(r"^step-(\d{8})$")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: Path) -> int:
    return int(TAG_RE.match(path.name).group(1))


# --------------------------------------------------------------------------------------
# Files: fsync, checksums, manifest
# --------------------------------------------------------------------------------------


def checksum_file(path: Path, chunk: int = 16 << 20) -> str:
    """xxh3-64 of the file: 10 GB/s on one core here (zlib's CRC-32: 2 GB/s), so checking a
    checkpoint costs little next to writing it."""
    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_files(root: Path) -> list[Path]:
    """Every file a manifest lists: all under `root` but the manifest and the ranks' shares."""
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and p.name != MANIFEST and PARTS not in p.relative_to(root).parts)


def verify_files(ckpt: Path, entries: list[dict], checksums: bool = True) -> Optional[str]:
    """None when every listed file matches (present, its size, its checksum unless
    checksums=False), else '<file>: <what is wrong>'."""
    for entry in entries:
        path = ckpt / entry["file"]
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{path}: size {size}, manifest says {entry['size']}"
        if checksums and checksum_file(path) != entry["xxh3"]:
            return f"{path}: checksum mismatch"
    return None


def read_manifest(ckpt: Path) -> tuple[Optional[list[dict]], Optional[str]]:
    try:
        entries = json.loads((ckpt / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return None, f"{ckpt / MANIFEST}: missing (incomplete save)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"{ckpt / MANIFEST}: unreadable ({type(err).__name__}: {str(err)[:160]})"
    if not isinstance(entries, list) or not all(_is_entry(e) for e in entries):
        return None, f"{ckpt / MANIFEST}: unreadable (not a list of files with their size and xxh3)"
    return entries, None


def _is_entry(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("xxh3"), str)
            and type(entry.get("size")) is int and not Path(entry["file"]).is_absolute()
            and ".." not in Path(entry["file"]).parts and "\x00" not in entry["file"])


# --------------------------------------------------------------------------------------
# Listing and choosing
# --------------------------------------------------------------------------------------


def published(root: Path) -> list[Path]:
    """Published checkpoint directories, newest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)), key=step_of, reverse=True)


def verify_in_parallel(ckpt: Path, rank: int, world_size: int) -> Optional[str]:
    """Collective: every rank checks its share of the manifest; returns the first problem."""
    entries, problem = read_manifest(ckpt)
    if entries is not None:
        problem = verify_files(ckpt, entries[rank::world_size])
    problems = [None] * world_size
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p), None)


@dataclass
class Verified:
    """What this run knows of the checkpoints on disk: those it verified or wrote itself
    (good) and those that failed verification (bad, with the first problem). Retention
    counts only good ones. A checkpoint the resume scan did not reach (older than the one
    resumed from) gets the quick check once: manifest, every file present at its size, which
    an abandoned or truncated save fails; its checksums are the resume scan's business
    (all ranks in parallel), not rank 0's alone in the middle of training."""

    good: set = dataclasses.field(default_factory=set)
    bad: dict = dataclasses.field(default_factory=dict)  # path -> problem

    def mark(self, ckpt: Path, problem: Optional[str]) -> None:
        self.bad.pop(ckpt, None)
        self.good.discard(ckpt)
        if problem is None:
            self.good.add(ckpt)
        else:
            self.bad[ckpt] = problem

    def is_good(self, ckpt: Path) -> bool:
        if ckpt not in self.good and ckpt not in self.bad:
            entries, problem = read_manifest(ckpt)
            self.mark(ckpt, problem if entries is None else verify_files(ckpt, entries, checksums=False))
        return ckpt in self.good


def choose_resume(root: Path, explicit: Optional[Path], rank: int, world_size: int, warn,
                  verified: Verified) -> Optional[Path]:
    """Collective: the checkpoint to resume from (None: none verifies, or there is none;
    `verified.bad` then says which failed and why). An explicit path must verify;
    otherwise the newest published checkpoint that verifies."""
    for ckpt in resume_candidates(root, explicit):
        problem = verify_in_parallel(ckpt, rank, world_size)
        verified.mark(ckpt, problem)
        if problem is None:
            return ckpt
        warn(f"checkpoint {ckpt.name} skipped: {problem}")
    return None


def nothing_to_resume(cfg: Config, root: Path, verified: Verified) -> ConfigError:
    """The one-line error when a resume was expected (checkpoints exist, or `required`, or a
    path) and no checkpoint verifies: never a silent start from step 0 over a run's history."""
    mode = cfg.checkpoint.resume
    if not verified.bad:
        return ConfigError("checkpoint.resume", f"{mode}, but {root} holds no checkpoint")
    newest, problem = next(iter(verified.bad.items()))  # candidates are tried newest first
    return ConfigError("checkpoint.resume", f"{mode}, but no checkpoint verifies (newest {newest}: {problem}); "
                       "resume an older one with checkpoint.resume=PATH, or start over with "
                       "checkpoint.resume=none checkpoint.overwrite=true")


# --------------------------------------------------------------------------------------
# Where a run's checkpoints are; what survives of older timelines
# --------------------------------------------------------------------------------------


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir(cfg) / "checkpoints"


def explicit_resume(cfg: Config) -> Optional[Path]:
    return None if cfg.checkpoint.resume in ("auto", "required", "none") else Path(cfg.checkpoint.resume)


def resume_candidates(root: Path, explicit: Optional[Path]) -> list[Path]:
    """The checkpoints a resume tries, newest first: the run's own (under `root`), or what
    `checkpoint.resume: PATH` names: one checkpoint, or a run directory (or a checkpoint
    root), whose published checkpoints are tried as the run's own would be."""
    if explicit is None:
        return published(root)
    if (explicit / STATE).is_file() or (explicit / MANIFEST).is_file():
        return [explicit]
    return published(explicit / "checkpoints") or published(explicit)


ABANDONED = ".abandoned"


def set_aside_newer(root: Path, step: int) -> None:
    """Checkpoints newer than the one just published belong to a timeline this run left (a
    resume from an older checkpoint by path, or newer ones that failed verification): move
    them to <root>/.abandoned/, so `resume: auto` follows the run that is going on and
    retention never counts them, without deleting anything."""
    for newer in [p for p in published(root) if step_of(p) > step]:
        target = root / ABANDONED / newer.name
        target.parent.mkdir(exist_ok=True)
        n = 0
        while target.exists():
            n += 1
            target = root / ABANDONED / f"{newer.name}.{n}"
        os.rename(newer, target)


def apply_retention(root: Path, keep_last: int, verified: Verified) -> None:
    """Keep the newest keep_last checkpoints that verify (the newest good one always); delete
    older ones, good or not, and bad ones older than the newest good one (nothing would
    resume from them). Also drops abandoned partial saves older than the newest good one."""
    good: list[Path] = []
    for ckpt in published(root):  # newest first
        if len(good) >= max(1, keep_last):
            shutil.rmtree(ckpt, ignore_errors=True)  # past the kept ones: not even looked at
        elif verified.is_good(ckpt):
            good.append(ckpt)
        elif good:
            shutil.rmtree(ckpt, ignore_errors=True)  # bad, and a good one is newer
    if good and (root / PARTIAL).is_dir():
        newest = step_of(good[0])
        for leftover in (root / PARTIAL).iterdir():
            match = re.match(r"step-(\d{8})", leftover.name)
            if match and int(match.group(1)) <= newest:
                shutil.rmtree(leftover, ignore_errors=True)
