"""Tokenizing inputs into a prepared dataset (`prepare`): check the options, claim the
output directory with its plan, skip the shards already finished, run the rest, gather the
bad lines and write the manifest last. The format: launcher/data/shards.py; the inputs, the
work split and resuming as a user sees them: the `prepare` verb (launcher/prepare.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from launcher.data.prepare_inputs import (
    MB,
    SHOW_BAD,
    Source,
    Task,
    cut_tasks,
    expand_inputs,
)
from launcher.data.prepare_tasks import Job, TaskResult, run_tasks
from launcher.data.shards import (
    FORMAT,
    MANIFEST,
    SHARDS,
    TOKENIZER_COPY,
    check_shards,
    commit_file,
    dataset_id,
    shard_paths,
    temporary_file,
    token_dtype,
    write_manifest,
)
from launcher.errors import ConfigError
from launcher.files import write_atomic
from launcher.formats.tokenizer import BYTE, load_tokenizer

PLAN = "prepare-plan.json"
BAD_LINES = "bad_lines.txt"


def dataset_identity(sources: list[Source], tokenizer, dtype: np.dtype, text_field: str) -> dict:
    """What makes two preparations the same data: the manifest fields it must match."""
    return {"format": FORMAT, "tokenizer": {"name": tokenizer.name, "sha256": tokenizer.sha256,
                                            "vocab_size": int(tokenizer.vocab_size), "eod_id": int(tokenizer.eod_id)},
            "dtype": dtype.name, "text_field": text_field,
            "sources": [{"path": s.abspath, "bytes": s.bytes} for s in sources]}


def same_data(manifest: dict, identity: dict) -> bool:
    return _data_key(manifest) == _data_key(identity)


def _data_key(d: dict) -> dict:
    # The tokenizer's name is where it was read from; its hash says what it does.
    tokenizer = d.get("tokenizer") if isinstance(d.get("tokenizer"), dict) else {}
    return {**{k: d.get(k) for k in ("format", "dtype", "text_field", "sources")},
            "tokenizer": {k: v for k, v in tokenizer.items() if k != "name"}}


def claim_output(out: Path, plan: dict) -> None:
    """Write DIR/prepare-plan.json, or check that the one there is this plan."""
    ours = (PLAN, MANIFEST, SHARDS, TOKENIZER_COPY, BAD_LINES)  # and their temporary files
    strangers = [p.name for p in out.iterdir() if not p.name.startswith(ours)] if out.is_dir() else []
    if strangers and not (out / PLAN).is_file():
        raise ConfigError("--out", f"{out} holds other files ({strangers[0]}, ...); give a new or empty directory")
    try:
        old = json.loads((out / PLAN).read_text())
    except FileNotFoundError:
        write_atomic(out / PLAN, (json.dumps(plan, indent=1) + "\n").encode())
        return
    except ValueError:
        old = {}
    if old != plan:
        names = {"sources": "inputs", "tokenizer": "tokenizer", "text_field": "--text-field", "chunk_bytes": "--chunk-mb"}
        what = next((name for k, name in names.items() if old.get(k) != plan[k]), "plan")
        raise ConfigError("--out", f"{out} holds an unfinished preparation with other {what} ({PLAN}); "
                          f"use a new --out (or delete {out} to start over)")


def finished(job: Job, task: Task) -> Optional[dict]:
    """The task's record if its shard is complete: the record matches the task and the
    files have the sizes it says (the plan already pinned the sources' paths and sizes)."""
    bin_path, idx_path, rec_path = shard_paths(job.out, task.name)
    try:
        record = json.loads(rec_path.read_bytes())
        ok = ({k: record[k] for k in ("name", "source", "start", "end")}
              == {"name": task.name, "source": task.source, "start": task.start, "end": task.end}
              and bin_path.stat().st_size == int(record["tokens"]) * job.dtype.itemsize
              and idx_path.stat().st_size == (int(record["documents"]) + 1) * 8
              and (int(record["bad_lines"]) == 0 or rec_path.with_suffix(".bad").is_file()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if ok else None


def remove_stale_temporaries(shards: Path) -> None:
    """Temporary shard files of dead processes on this host (a killed run); a live
    process's (another preparer) and other hosts' are left alone."""
    host = socket.gethostname()
    for path in shards.glob("*.tmp.*"):
        owner_host, _, rest = path.name.split(".tmp.", 1)[1].rpartition(".")[0].rpartition(".")
        if owner_host == host and rest.isdigit() and not _alive(int(rest)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


# --------------------------------------------------------------------------------------
# The whole preparation
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrepareOptions:
    """The `prepare` verb's options besides inputs, tokenizer and output (its --help)."""

    text_field: str = "text"
    workers: Optional[int] = None  # None: one per CPU this process may use
    max_bad: int = 0
    eod_token: Optional[str] = None
    chunk_mb: float = 256
    progress: bool = True  # False: print nothing but bad lines


def prepare(inputs: list[str], tokenizer: str, out: Path, options: PrepareOptions = PrepareOptions()) -> dict:
    """Tokenize `inputs` into `out` (the format: launcher/data/shards.py) and return the
    manifest. Any mistake in the inputs or options is a one-line ConfigError."""
    out = Path(out)
    workers = _check_options(inputs, options, out)
    tok = load_tokenizer(tokenizer, options.eod_token, key="--tokenizer")
    sources = expand_inputs(inputs)
    dtype = token_dtype(tok.vocab_size)
    identity = dataset_identity(sources, tok, dtype, options.text_field)
    manifest = _read_json(out / MANIFEST)
    if manifest is not None:
        return _already_prepared(out, manifest, identity, options.progress)
    chunk_bytes = max(1, int(options.chunk_mb * MB))
    claim_output(out, {"format": FORMAT, "sources": identity["sources"], "text_field": options.text_field,
                       "tokenizer": {"sha256": tok.sha256, "eod_id": int(tok.eod_id)}, "chunk_bytes": chunk_bytes})
    (out / SHARDS).mkdir(exist_ok=True)
    remove_stale_temporaries(out / SHARDS)

    tally = _Tally(options.progress)
    job = Job(out, sources, tok, dtype, options.text_field, options.max_bad, report=tally.report, stopped=lambda: False)
    tasks = cut_tasks(sources, chunk_bytes)
    records = {t.name: r for t in tasks if (r := finished(job, t)) is not None}
    todo = [t for t in tasks if t.name not in records]
    workers = min(workers, len(todo)) or 1
    if options.progress:
        print(f"prepare: {plural(len(sources), 'input file')}, {sum(s.bytes for s in sources) / MB:,.1f} MB -> "
              f"{plural(len(tasks), 'shard')} ({len(tasks) - len(todo)} already done), {plural(workers, 'worker')}, "
              f"tokenizer {tok.name} (vocabulary {tok.vocab_size:,}, {dtype.name})")
    failures: dict[str, TaskResult] = {}  # tasks that stopped: their bad lines, or an error

    def on_result(result: TaskResult) -> bool:
        """Keep the result; False stops the run (an error, or more bad lines than allowed)."""
        if result.record is not None:
            records[result.task.name] = result.record
        else:
            failures[result.task.name] = result
        return result.record is not None and sum(int(r["bad_lines"]) for r in records.values()) <= options.max_bad

    tally.start(sum(t.end - t.start for t in tasks), sum(t.end - t.start for t in todo))
    try:
        run_tasks(job, todo, workers, tokenizer, options.eod_token, on_result)
    finally:
        tally.close()
    n_bad = _check_bad_lines(out, tasks, records, failures, options.max_bad)
    manifest = _write_dataset(out, tok, identity, [records[t.name] for t in tasks], n_bad)
    if options.progress:
        done = [records[t.name] for t in todo]
        tally.summary(manifest, sum(t.end - t.start for t in todo), sum(int(r["tokens"]) for r in done),
                      len(tasks) - len(todo), out)
    return manifest


def _already_prepared(out: Path, manifest: dict, identity: dict, progress: bool) -> dict:
    """The manifest of a dataset already in `out`, if it is this one (else a ConfigError)."""
    if not same_data(manifest, identity):
        raise ConfigError("--out", f"{out} holds a dataset prepared from other inputs or with another tokenizer; "
                          f"use a new --out (or delete {out})")
    check_shards(out, "--out")  # "already prepared" only when it still is
    if progress:
        print(f"{out}: already prepared ({plural(manifest['documents'], 'document')}, "
              f"{plural(manifest['tokens'], 'token')}); nothing to do")
    return manifest


def _write_dataset(out: Path, tok, identity: dict, shards: list[dict], n_bad: int) -> dict:
    """The tokenizer's copy, then the manifest (last: the directory is a dataset)."""
    if tok.name != BYTE:
        # a tokenizer.json as given; a SentencePiece model as its conversion (tokenizer.py)
        copy = Path(tok.file).read_bytes() if Path(tok.file).suffix == ".json" else tok.tokenizer.to_str().encode()
        write_atomic(out / TOKENIZER_COPY, copy)
    manifest = {"format": FORMAT, "tokenizer": identity["tokenizer"], "dtype": identity["dtype"],
                "tokens": sum(int(r["tokens"]) for r in shards), "documents": sum(int(r["documents"]) for r in shards),
                "bad_lines": n_bad, "text_field": identity["text_field"], "sources": identity["sources"],
                "shards": shards}
    manifest["id"] = dataset_id(manifest)  # the run's name for this data, wherever it is moved
    write_manifest(out, manifest)
    return manifest


def _check_bad_lines(out: Path, tasks: list[Task], records: dict, failures: dict, max_bad: int) -> int:
    """Raise the first task's error, or the first bad line when there are more than
    `max_bad`; else print the first few (skipped) and return how many."""
    bad = _collect_bad_lines(out, tasks, records, failures)
    errors = [r.error for _, r in sorted(failures.items()) if r.error]
    if errors:
        raise ConfigError(*errors[0])
    n_bad = sum(int(r["bad_lines"]) for r in records.values()) + sum(r.bad for r in failures.values())
    if n_bad > max_bad:
        first, _, reason = bad[0].partition(": ")
        at_least = "at least " if len(records) < len(tasks) else ""  # the run stopped at the limit
        raise ConfigError(first, f"{reason} — {at_least}{plural(n_bad, 'bad line')}, more than --max-bad {max_bad} "
                          f"(listed in {out / BAD_LINES})")
    for line in bad:
        print(f"skipped bad line: {line}")
    if n_bad > len(bad):
        print(f"... and {n_bad - len(bad):,} more")
    if bad:
        print(f"{plural(n_bad, 'bad line')} skipped (--max-bad {max_bad}), all listed in {out / BAD_LINES}")
    return n_bad


def plural(count: int, thing: str) -> str:
    return f"{count:,} {thing}{'s' * (count != 1)}"


def _check_options(inputs: list[str], options: PrepareOptions, out: Path) -> int:
    """The worker count (the CPUs this process may use when not given); ConfigError for a bad option."""
    text_field, workers, max_bad, chunk_mb = options.text_field, options.workers, options.max_bad, options.chunk_mb
    if not inputs:
        raise ConfigError("--input", "give at least one file or glob")
    if not text_field:
        raise ConfigError("--text-field", "must not be empty")
    if workers is not None and workers < 1:
        raise ConfigError("--workers", f"must be at least 1, got {workers}")
    if max_bad < 0:
        raise ConfigError("--max-bad", f"must be 0 or more, got {max_bad}")
    if not (isinstance(chunk_mb, (int, float)) and math.isfinite(chunk_mb) and chunk_mb > 0):
        raise ConfigError("--chunk-mb", f"must be a positive number, got {chunk_mb}")
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} is a file; give a directory")
    if workers is None:  # the cores this process may run on (a Slurm or container limit), else all
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return workers


def _read_json(path: Path) -> Optional[dict]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _collect_bad_lines(out: Path, tasks: list[Task], records: dict, failures: dict) -> list[str]:
    """Write every bad line found, in input order, to DIR/bad_lines.txt (when there are
    any), streaming: there may be millions. Returns the first SHOW_BAD."""
    head: list[str] = []
    listing = None
    for task in tasks:
        if task.name in records and int(records[task.name]["bad_lines"]):
            lines = open(out / SHARDS / f"{task.name}.bad", "rb")
        elif task.name in failures and failures[task.name].head:  # a task that stopped: what it found
            lines = io.BytesIO("".join(line + "\n" for line in failures[task.name].head).encode())
        else:
            continue
        listing = listing or temporary_file(out / BAD_LINES)
        with lines:
            for line in lines:
                listing.write(line)
                if len(head) < SHOW_BAD:
                    head.append(line.decode().rstrip("\n"))
    if listing is not None:
        commit_file(listing, out / BAD_LINES)
    return head


class _Tally:
    """The progress bar over input bytes (on a terminal) and the rates of this run."""

    def __init__(self, show: bool):
        self.show, self.bar, self.bytes, self.tokens, self.t0, self.shown = show, None, 0, 0, time.perf_counter(), 0.0

    def start(self, total: int, todo: int) -> None:
        self.t0 = time.perf_counter()
        if self.show and todo and sys.stderr.isatty():
            # lazy: tqdm takes ~50 ms to import, and only a terminal shows a bar
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=total - todo, unit="B", unit_scale=True, unit_divisor=1024,
                            desc="prepare", dynamic_ncols=True)

    def report(self, nbytes: int, ntokens: int) -> None:
        self.bytes, self.tokens = self.bytes + nbytes, self.tokens + ntokens
        if self.bar is not None:
            self.bar.update(nbytes)
            now = time.perf_counter()
            if now - self.shown > 0.5:
                elapsed = max(now - self.t0, 1e-9)
                self.bar.set_postfix_str(f"{self.bytes / MB / elapsed:.1f} MB/s, {self.tokens / elapsed:,.0f} tokens/s")
                self.shown = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def summary(self, manifest: dict, nbytes: int, tokens: int, skipped: int, out: Path) -> None:
        """The dataset's totals, and the rates of the work this run did."""
        seconds = max(time.perf_counter() - self.t0, 1e-9)
        total = len(manifest["shards"])
        resumed = f"; {skipped} of {total} shards were already done" if skipped else ""
        print(f"prepared {out}: {plural(manifest['documents'], 'document')}, {plural(manifest['tokens'], 'token')}, "
              f"{sum(s['bytes'] for s in manifest['sources']) / MB:,.1f} MB in {plural(total, 'shard')}; this run "
              f"{nbytes / MB:,.1f} MB in {seconds:.1f} s: {nbytes / MB / seconds:,.2f} MB/s, "
              f"{tokens / seconds:,.0f} tokens/s; {plural(manifest['bad_lines'], 'bad line')}{resumed}")
