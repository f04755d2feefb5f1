"""Fault-tolerant checkpoints: atomic publish, verified resume, retention.

On disk, under `checkpoint.dir` (default <run.dir>/checkpoints):

    step-00000020/              a complete checkpoint (published by one rename)
        global_step.../ or *.pt DeepSpeed's own files (model, optimizer/ZeRO shards, scheduler)
        rng/rank-00003.pt       python, numpy, torch (and cuda) RNG states of every rank
        compression/rank-00003.pt  PowerSGD state of every rank (error feedback, factors)
        launcher_state.json     step, tokens seen, sampler position, layout, config fingerprint
        manifest.json           every file above with its size and xxh3; written last
    latest                      the newest published tag (replaced atomically; for humans and tools)
    .partial/step-00000030/     a save in progress (or one that crashed): never loaded

Save: every rank writes into .partial/<tag>, hashing each file as it writes it
(launcher/ckpt_writer.py: no file is read back); local rank 0 of every node fsyncs every
file (each node flushes its own page cache); every rank leaves the sizes and checksums of
the files it wrote in .partial/<tag>/.parts/; rank 0 writes the manifest, renames the
directory into place, fsyncs, replaces `latest`, then applies `keep_last`. With
`checkpoint.async` the flush/publish half runs in a background thread per rank while
training continues (which never removes the newest complete checkpoint). A crash at any
point leaves the previous checkpoint as the newest complete one.

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
import pickle
import random
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import xxhash

from launcher.ckpt_writer import Written, recording
from launcher.files import fsync_path, write_atomic

MANIFEST = "manifest.json"
STATE = "launcher_state.json"
PARTIAL = ".partial"
TAG_RE = re.compile(r"^step-(\d{8})$")
# Test hook, "STEP:FILES": SIGKILL rank 0 in the save of step STEP once it has flushed and
# accounted for FILES of the files it wrote (everything is written, nothing is published yet).
FAULT_ENV = "LAUNCHER_FAULT_KILL_SAVE"


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


def _files(root: Path) -> list[Path]:
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
        return json.loads((ckpt / MANIFEST).read_text())["files"], None
    except FileNotFoundError:
        return None, f"{ckpt / MANIFEST}: missing (incomplete save)"
    except (ValueError, KeyError) as err:
        return None, f"{ckpt / MANIFEST}: unreadable ({err})"


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
    candidates = [explicit] if explicit is not None else published(root)
    for ckpt in candidates:
        problem = verify_in_parallel(ckpt, rank, world_size)
        verified.mark(ckpt, problem)
        if problem is None:
            return ckpt
        warn(f"checkpoint {ckpt.name} skipped: {problem}")
    return None


def nothing_to_resume(cfg, root: Path, verified: Verified):
    """The one-line error when a resume was expected (checkpoints exist, or `required`, or a
    path) and no checkpoint verifies: never a silent start from step 0 over a run's history."""
    from launcher.config import ConfigError

    mode = cfg.checkpoint.resume
    if not verified.bad:
        return ConfigError("checkpoint.resume", f"{mode}, but {root} holds no checkpoint")
    newest, problem = next(iter(verified.bad.items()))  # candidates are tried newest first
    return ConfigError("checkpoint.resume", f"{mode}, but no checkpoint verifies (newest {newest}: {problem}); "
                       "resume an older one with checkpoint.resume=PATH, or start over with "
                       "checkpoint.resume=none checkpoint.overwrite=true")


# --------------------------------------------------------------------------------------
# State that is ours (not DeepSpeed's)
# --------------------------------------------------------------------------------------


def checkpoint_root(cfg) -> Path:
    from launcher.metrics import run_dir

    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir(cfg) / "checkpoints"


def explicit_resume(cfg) -> Optional[Path]:
    return None if cfg.checkpoint.resume in ("auto", "required", "none") else Path(cfg.checkpoint.resume)


LAYOUT_KEYS = ("tp", "pp", "dp", "zero_stage", "dtype")


def layout_record(cfg, plan) -> dict:
    """How the run's state is cut: the degrees, ZeRO stage, dtype and the pipeline stage
    boundaries over the items (`parts`: which layers each stage's files hold)."""
    lay = plan.layout
    return {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "zero_stage": cfg.zero.stage, "dtype": plan.dtype,
            "parts": list(plan.parts)}


def same_layout(saved: dict, current: dict) -> bool:
    """Every rank's files mean the same on both (RNG and PowerSGD state are per rank).
    A checkpoint written before `parts` was recorded counts as having this run's boundaries."""
    return all(saved.get(k) == current.get(k) for k in LAYOUT_KEYS) and saved.get("parts", current["parts"]) == \
        current["parts"]


def deepspeed_loads(saved: dict, current: dict) -> bool:
    """Whether DeepSpeed's own loader reads this checkpoint for this run: the same tp, pp,
    stage boundaries, ZeRO stage and dtype; the data degree may differ with fp32 and ZeRO
    0-2 (its elastic ZeRO format). Anything else is resharded (launcher.reshard)."""
    keep = ("tp", "pp", "zero_stage", "dtype")
    if any(saved.get(k) != current.get(k) for k in keep) or saved.get("parts", current["parts"]) != current["parts"]:
        return False
    return saved["dp"] == current["dp"] or (current["dtype"] == "fp32" and current["zero_stage"] <= 2)


def describe_layout(layout: dict) -> str:
    return (f"tensor {layout['tp']} x pipeline {layout['pp']} x data {layout['dp']}, ZeRO {layout['zero_stage']}, "
            f"{layout['dtype']}")


def resume_layout(cfg) -> Optional[dict]:
    """The layout record (tp, pp, dp, zero_stage, dtype) of the checkpoint this launch would
    resume from, when it can tell before starting; None for a fresh start. The planner keeps
    its tensor and pipeline degrees for `auto`."""
    if cfg.checkpoint.resume == "none":
        return None
    explicit = explicit_resume(cfg)
    try:
        candidates = [explicit] if explicit else published(checkpoint_root(cfg))
    except OSError:
        return None
    for candidate in candidates:
        try:
            return LauncherState.read(candidate).layout
        except (OSError, ValueError, TypeError):
            continue
    return None


def check_resume_config(cfg, plan) -> None:
    """Before any process starts: refuse what a resume cannot do, as one-line ConfigErrors."""
    from launcher.config import ConfigError

    root = checkpoint_root(cfg)
    existing = published(root)
    mode = cfg.checkpoint.resume
    if mode == "none":
        if existing and not cfg.checkpoint.overwrite:
            raise ConfigError("checkpoint.resume", f"none, but {root} holds checkpoints (newest {existing[0].name}); "
                              "set checkpoint.overwrite=true to delete them and start over, or resume: auto")
        return
    if mode == "required" and not existing:
        raise ConfigError("checkpoint.resume", f"required, but {root} holds no checkpoint")
    explicit = explicit_resume(cfg)
    current = layout_record(cfg, plan)
    for candidate in [explicit] if explicit else existing:
        try:
            saved = LauncherState.read(candidate)
        except (OSError, ValueError, TypeError):
            continue  # unreadable: the verification at start skips it with a warning
        changed = fingerprint_diff(saved.fingerprint, fingerprint(cfg))
        if changed:
            raise ConfigError(changed[0], f"differs from checkpoint {candidate} (changed: {', '.join(changed)}); "
                              "these must stay the same to resume: restore them, or start a new run "
                              "(run.name / checkpoint.dir)")
        if 3 in (saved.layout["zero_stage"], current["zero_stage"]) and not same_layout(saved.layout, current):
            raise ConfigError("zero.stage", f"checkpoint {candidate} was saved with {describe_layout(saved.layout)}, "
                              f"this run has {describe_layout(current)}: a ZeRO 3 checkpoint resumes on its own "
                              "layout, and a layout change resumes into ZeRO 0-2 only (docs/CHECKPOINTS.md)")


def fingerprint(cfg, weights_from: Optional[dict] = None) -> dict:
    """Config fields a resume must not change: they define the weights' shapes, the
    optimizer step's batch and the sample stream (changing them would silently train a
    different run). `weights_from` (launcher.hf_weights.weights_source: where the run's
    initial weights came from, model.init_from) is recorded, not compared: a resume loads
    the checkpoint's weights whatever model.init_from says."""
    from launcher.tokenizer import load_tokenizer

    model = dataclasses.asdict(cfg.model)
    model.pop("init_from")
    model.pop("compile")  # how the blocks run, not what they compute
    out = {"model": model, "global_batch": cfg.parallel.global_batch,
           "seed": cfg.train.seed, "data.tokenizer": load_tokenizer(cfg.data.tokenizer).sha256,
           "data.val_fraction": cfg.data.val_fraction}
    if weights_from is not None:
        out["weights_from"] = weights_from
    return out


_FINGERPRINT_KEYS = {"global_batch": "parallel.global_batch", "seed": "train.seed"}  # as the config spells them
_RECORDED_ONLY = ("weights_from",)


def fingerprint_diff(saved: dict, current: dict) -> list[str]:
    """Config keys of the fields that differ, e.g. ['model.hidden', 'parallel.global_batch']."""
    out = []
    for key in sorted((set(saved) | set(current)) - set(_RECORDED_ONLY)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}" for k in fingerprint_diff(a, b)]
        elif a != b:
            out.append(_FINGERPRINT_KEYS.get(key, key))
    return out


@dataclass
class LauncherState:
    step: int
    tokens_seen: int
    consumed_samples: int
    layout: dict  # tp, pp, dp, zero_stage, dtype
    fingerprint: dict  # config fields that must not change across a resume
    data: Optional[dict] = None  # launcher.data.SampleSource.state_dict: the position in every source

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1)

    @classmethod
    def read(cls, ckpt: Path) -> "LauncherState":
        return cls(**json.loads((ckpt / STATE).read_text()))


def numpy_state_to_plain(state: dict) -> dict:
    """numpy's `get_state(legacy=False)` with its key array as a tensor: loadable by
    `torch.load(weights_only=True)`, which refuses numpy objects (they unpickle as code)."""
    return {**state, "state": {**state["state"], "key": torch.from_numpy(state["state"]["key"].astype(np.int64))}}


def plain_to_numpy_state(state: dict) -> dict:
    return {**state, "state": {**state["state"], "key": state["state"]["key"].numpy().astype(np.uint32)}}


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generators, as plain lists, numbers and tensors."""
    state = {"python": random.getstate(), "numpy": numpy_state_to_plain(np.random.get_state(legacy=False)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(plain_to_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------


PARTS = ".parts"  # per-rank checksum shares while a save is being finished; never published


class PendingSave:
    """The finishing half of a save (flush, checksum, publish), run now or in a thread.
    `shared` (background only): set once this rank's checksum share is written."""

    def __init__(self, work, background: bool, shared: Optional[threading.Event] = None):
        self.error: Optional[BaseException] = None
        self.seconds: Optional[float] = None  # how long the finishing half took, once done
        self._thread = None
        self._start = time.perf_counter()
        self._shared = shared
        if background:
            self._thread = threading.Thread(target=self._run, args=(work,), name="checkpoint-finish", daemon=True)
            self._thread.start()
        else:
            work()
            self.seconds = time.perf_counter() - self._start

    def _run(self, work) -> None:
        try:
            work()
        except BaseException as err:  # surfaced by wait() in the training thread
            self.error = err
        self.seconds = time.perf_counter() - self._start

    def wait(self) -> None:
        if self._thread is not None:
            if self._shared is not None:  # collective: every rank waits at the same step
                self._shared.wait()
                _shares_in_or_a_dead_peer()
            self._thread.join()
            self._thread = None
        if self.error is not None:
            raise RuntimeError(f"background checkpoint save failed: {self.error}") from self.error


def save(ds_engine, root: Path, state: LauncherState, rank: int, local_rank: int, world_size: int,
         keep_last: int, verified: Verified, background: bool = False, timeout_s: float = 1800.0,
         compressor=None) -> PendingSave:
    """Collective: write this step's checkpoint and publish it atomically.

    The first half (DeepSpeed's files, RNG states, our state) runs here on every rank; each
    file is hashed as it is written. The second half flushes and publishes; with
    background=True it runs in a thread per rank while training goes on (it waits on the
    disk, not on the CPU). The ranks of the second half meet through files (each rank's
    share of the manifest), not collectives, so it never shares a process group with
    training. The caller waits for the previous save before starting the next one."""
    tag = tag_for(state.step)
    partial_root = root / PARTIAL
    partial = partial_root / tag
    if rank == 0:
        if partial.exists():  # left over by a crash at this very step
            shutil.rmtree(partial)
        partial_root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    written = Written(partial)
    # torch.save computes a CRC-32 of every record by default; our manifest checksums each
    # whole file anyway, and skipping torch's makes serialisation 4x faster (1.1 -> 4.4 GB/s).
    torch_crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        with recording(ds_engine, written):
            ds_engine.save_checkpoint(str(partial_root), tag=tag, save_latest=False)
        (partial / "rng").mkdir(parents=True, exist_ok=True)
        written.torch_save(rng_state(), partial / "rng" / f"rank-{rank:05d}.pt")
        if compressor is not None:
            (partial / "compression").mkdir(exist_ok=True)
            written.torch_save(compressor.state_dict(), partial / "compression" / f"rank-{rank:05d}.pt")
    finally:
        torch.serialization.set_crc32_options(torch_crc)
    (partial / PARTS).mkdir(exist_ok=True)
    if rank == 0:
        written.write_bytes(partial / STATE, state.to_json().encode())
    dist.barrier()  # every rank's files are written (to the page cache at least)

    shared = threading.Event()

    def finish() -> None:
        try:
            _finish_share(partial, state.step, rank, local_rank, list(written.entries.values()))
        finally:
            shared.set()
        if not background:
            _shares_in_or_a_dead_peer()
        if rank == 0:
            _publish(root, partial, tag, world_size, keep_last, timeout_s, verified)

    pending = PendingSave(finish, background, shared if background else None)
    if not background:
        dist.barrier()  # nobody goes on before the checkpoint is published
    return pending


def _shares_in_or_a_dead_peer() -> None:
    """Collective, in the training thread, once this rank's share is written: every share is
    in, or gloo/NCCL reports the rank that died before writing its own. Rank 0's wait for the
    shares reads files only; without this, a rank killed mid-checksum left rank 0 polling for
    its share until timeout_s (30 min by default), deaf to the launcher's SIGTERM (StopSignal
    takes it), until torchrun's SIGKILL 30 s later (tests/test_faults.py)."""
    dist.barrier()


def _finish_share(partial: Path, step: int, rank: int, local_rank: int, share: list[dict]) -> None:
    """This rank's part: local rank 0 of each node fsyncs every file (its node's page cache);
    every rank leaves the entries of the files it wrote (size, xxh3) in .parts/."""
    if local_rank == 0:
        files = _files(partial)
        for path in files:
            fsync_path(path)
        for d in {p.parent for p in files} | {partial}:
            fsync_path(d)
    fault_step, _, fault_files = os.environ.get(FAULT_ENV, "").partition(":")
    if rank == 0 and fault_step and int(fault_step) == step and len(share) >= int(fault_files):
        os.kill(os.getpid(), signal.SIGKILL)  # fault injection for tests: die mid-save
    write_atomic(partial / PARTS / f"rank-{rank:05d}.json", json.dumps(share).encode())


def manifest_entries(partial: Path, shares: list[list[dict]]) -> list[dict]:
    """Every file under `partial` with its size and xxh3: the ranks' entries, computed while
    writing, for the files they wrote; read from disk for any other file (one DeepSpeed
    wrote by other means, such as its zero_to_fp32.py copy) and for any file whose size on
    disk is not the size written (two ranks wrote one path)."""
    recorded: dict[str, dict] = {}
    for entry in (e for share in shares for e in share):
        if recorded.setdefault(entry["file"], entry) != entry:
            recorded[entry["file"]] = None  # two ranks wrote it, differently: what is on disk counts
    entries = []
    for path in _files(partial):
        rel = str(path.relative_to(partial))
        entry = recorded.pop(rel, None)
        if entry is None or entry["size"] != path.stat().st_size:
            entry = {"file": rel, "size": path.stat().st_size, "xxh3": checksum_file(path)}
        entries.append(entry)
    if recorded:
        raise RuntimeError(f"checkpoint {partial.name}: written but gone before publishing: {', '.join(recorded)}")
    return sorted(entries, key=lambda e: e["file"])


def _publish(root: Path, partial: Path, tag: str, world_size: int, keep_last: int, timeout_s: float,
             verified: Verified) -> None:
    """Rank 0: once every share is in, write the manifest (last), rename into place, point
    `latest` at it, apply retention."""
    parts = [partial / PARTS / f"rank-{r:05d}.json" for r in range(world_size)]
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in parts):
        if time.monotonic() > deadline:
            raise TimeoutError(f"checkpoint {tag}: ranks did not finish their shares in {timeout_s:.0f} s")
        time.sleep(0.05)
    entries = manifest_entries(partial, [json.loads(p.read_text()) for p in parts])
    shutil.rmtree(partial / PARTS)
    write_atomic(partial / MANIFEST, json.dumps({"files": entries}, indent=1).encode())  # fsyncs `partial` too
    final = root / tag
    replaced = partial.parent / f"{tag}.replaced"
    if final.exists():  # a checkpoint of this step that failed verification and was skipped
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(partial, final)
    fsync_path(root)
    write_atomic(root / "latest", (tag + "\n").encode())
    shutil.rmtree(replaced, ignore_errors=True)
    verified.mark(final, None)  # its checksums were just computed from the bytes written
    set_aside_newer(root, step_of(final))
    apply_retention(root, keep_last, verified)


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


# --------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------


def deepspeed_state_classes() -> list:
    """The DeepSpeed classes its own checkpoints pickle (loss scalers, the ZeRO stage enum,
    the bf16 optimizer's fragment addresses): plain data holders, allowed by name so that
    every file is read with `torch.load(weights_only=True)`, which runs no code from the
    file. Found by loading checkpoints of every engine path (ZeRO 0-3, fp32/bf16/fp16,
    pipeline) with weights_only=True; tests/test_checkpoint.py loads each path this way."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path, map_location=None):
    """torch.load that cannot execute code from the file (DeepSpeed's engine loads with
    weights_only=False)."""
    with torch.serialization.safe_globals(deepspeed_state_classes()):
        return torch.load(path, map_location=map_location, weights_only=True)


class _ClampedList(list):
    """A list whose out-of-range integer indices give its last element (see `load`)."""

    def __getitem__(self, index):
        if isinstance(index, int) and index >= len(self):
            index = len(self) - 1
        return super().__getitem__(index)


def _deepspeed_load(ds_engine, ckpt: Path, saved_dp: int, current_dp: int) -> None:
    """DeepSpeed's own loader, for a checkpoint of this layout (the data degree may differ)."""
    ds_engine.checkpoint_engine.load = load_weights_only
    real_dp, real_reader = ds_engine.seq_dp_world_size, ds_engine._get_all_zero_checkpoints
    if saved_dp != current_dp:
        ds_engine.seq_dp_world_size = saved_dp
        if current_dp > saved_dp:
            # Growing dp: DeepSpeed also reads the shard list at index `new dp rank` (only for
            # the global fields every shard holds alike) before merging the whole list.
            ds_engine._get_all_zero_checkpoints = lambda *a: _ClampedList(real_reader(*a) or [])
    try:
        path, _ = ds_engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
    finally:
        ds_engine.seq_dp_world_size = real_dp
        ds_engine._get_all_zero_checkpoints = real_reader
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt}")


def load(ds_engine, ckpt: Path, saved_layout: dict, current_layout: dict, rank: int, tp_rank: int,
         model: dict, compressor=None, device: Optional[torch.device] = None) -> Optional[str]:
    """Collective: DeepSpeed state (model, optimizer incl. ZeRO shards, scheduler) and, on
    the same layout, this rank's RNG and compression state. Returns a notice line, if any.

    Another layout DeepSpeed cannot read (tensor or pipeline degree, stage boundaries, ZeRO
    stage, dtype, or dp under its bf16 optimizer) is resharded by launcher.reshard: every
    rank reads its own slices of the saved state.

    Compression state (PowerSGD's error feedback) is per rank and has no meaning on another
    layout: there, and when the checkpoint has none, compression starts afresh.

    A different data-parallel degree: ZeRO 0 state does not depend on dp; ZeRO 1/2 state
    is saved in DeepSpeed's elastic format (zero_optimization.elastic_checkpoint), which its
    optimizer merges and re-partitions on load. DeepSpeed 0.19's engine still refuses any
    dp change up front (one `seq_dp_world_size` comparison), so for the length of the load
    it is shown the saved dp, which is exactly what its elastic path expects."""
    notes = []
    if deepspeed_loads(saved_layout, current_layout):
        _deepspeed_load(ds_engine, ckpt, saved_layout["dp"], current_layout["dp"])
    else:
        from launcher.reshard import load_resharded

        start = time.perf_counter()
        load_resharded(ds_engine, ckpt, saved_layout, model, tp_rank, current_layout["tp"])
        notes.append(f"checkpoint {ckpt.name} was saved with {describe_layout(saved_layout)}: resharded to "
                     f"{describe_layout(current_layout)} at load ({time.perf_counter() - start:.1f} s on rank {rank}; "
                     "each rank read its own slices; RNG states start from the seed)")
    # The scheduler's load_state_dict restores its counter, not the optimizer's lr; ZeRO's
    # elastic optimizer state has no param_groups to bring it back. Without this the first
    # step after a resume would run at step 1's warm-up lr.
    if ds_engine.lr_scheduler is not None:
        for group, lr in zip(ds_engine.optimizer.param_groups, ds_engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    same = same_layout(saved_layout, current_layout)
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
    return "; ".join(notes) or None

