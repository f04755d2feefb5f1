"""The worker side of `prepare`: run a task (read its documents, encode them in batches,
write its shard), in-process or in a pool of spawned worker processes. Why each worker
writes its own shards, and why spawned: the `prepare` verb's docstring (launcher/prepare.py).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import multiprocessing
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from launcher.data.prepare_inputs import BadLines, Source, Stop, Task, read_documents
from launcher.data.shards import (
    SHARDS,
    commit_file,
    discard_file,
    shard_paths,
    temporary_file,
    token_dtype,
)
from launcher.errors import ConfigError
from launcher.files import fsync_path, write_atomic
from launcher.formats.tokenizer import load_tokenizer

BATCH_DOCS = 1024  # documents per encode_batch call ...
BATCH_CHARS = 4 << 20  # ... or this much text, whichever comes first (bounds a worker's memory)


@dataclass
class TaskResult:
    task: Task
    record: Optional[dict]  # None when the task stopped (bad lines over --max-bad, an error)
    bad: int  # bad lines found
    head: list[str]  # the first SHOW_BAD of them, "file:line: reason"
    error: Optional[tuple[str, str]] = None  # (key, message) of a ConfigError (not picklable)


@dataclass
class Job:
    """What a worker needs to run tasks (built in each worker process, or in-process)."""

    out: Path
    sources: list[Source]
    tokenizer: Any
    dtype: np.dtype
    text_field: str
    max_bad: int
    report: Callable[[int, int], None]  # (input bytes, tokens) done since the last report
    stopped: Callable[[], bool]  # another task failed: give up this one


@dataclass(frozen=True)
class WorkerSetup:
    """What a pool worker builds its Job from (picklable: sent to each spawned process)."""

    parent: int  # the main process's pid: a worker exits when it is gone
    tokenizer: str  # the --tokenizer spec, loaded in each worker
    eod_token: Optional[str]
    out: Path
    sources: list[Source]
    text_field: str
    max_bad: int


# --------------------------------------------------------------------------------------
# One task: read documents, encode, write the shard (in a worker, or in-process)
# --------------------------------------------------------------------------------------


def run_task(job: Job, task: Task) -> TaskResult:
    source = job.sources[task.source]
    shards = job.out / SHARDS
    bin_path, idx_path, rec_path = shard_paths(job.out, task.name)
    bad = BadLines(source, task, shards)
    tokens_f, bounds_f = temporary_file(bin_path), temporary_file(idx_path)
    try:
        tokens, documents = _encode(job, source, task, bad, tokens_f, bounds_f)
        commit_file(tokens_f, bin_path)
        commit_file(bounds_f, idx_path)
        bad.publish()
        fsync_path(shards)
    except (Stop, ConfigError) as stop:
        for f in (tokens_f, bounds_f):
            discard_file(f)
        bad.discard()
        error = (stop.key, stop.message) if isinstance(stop, ConfigError) else None
        return TaskResult(task, None, bad.count, bad.head, error)
    except BaseException:
        for f in (tokens_f, bounds_f):
            discard_file(f)
        bad.discard()
        raise
    record = {"name": task.name, "source": task.source, "start": task.start, "end": task.end,
              "tokens": tokens, "documents": documents, "bad_lines": bad.count}
    write_atomic(rec_path, (json.dumps(record) + "\n").encode())  # last: the shard is finished
    return TaskResult(task, record, bad.count, bad.head)


def _encode(job: Job, source: Source, task: Task, bad: BadLines, tokens_f, bounds_f) -> tuple[int, int]:
    """Stream the task's documents through encode_batch into the two files."""
    bounds_f.write(np.zeros(1, "<i8").tobytes())
    tokens = documents = reported = 0
    batch: list[str] = []
    chars = 0
    for text, offset in read_documents(source, task, job.text_field, job.max_bad, bad):
        if text is not None:
            batch.append(text)
            chars += len(text)
        if batch and (text is None or len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS):
            n = _write_batch(job, batch, tokens, tokens_f, bounds_f)
            tokens, documents, batch, chars = tokens + n, documents + len(batch), [], 0
            job.report(offset - reported, n)
            reported = offset
            if job.stopped():
                raise Stop()
    job.report(task.end - task.start - reported, 0)
    return tokens, documents


def _write_batch(job: Job, texts: list[str], offset: int, tokens_f, bounds_f) -> int:
    """Encode `texts`, append the end-of-document token to each, write tokens and boundaries
    (`offset`: the shard's tokens so far). Returns the tokens written."""
    ids = job.tokenizer.encode_batch(texts)
    ends = np.cumsum(np.fromiter((len(a) + 1 for a in ids), dtype=np.int64, count=len(ids)))
    flat = np.empty(int(ends[-1]), dtype=job.dtype)
    for a, end in zip(ids, ends.tolist()):
        flat[end - 1 - len(a):end - 1] = a
    flat[ends - 1] = job.tokenizer.eod_id
    tokens_f.write(flat.data)
    bounds_f.write((offset + ends).astype("<i8").data)
    return int(ends[-1])


# --------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------

_JOB: Optional[Job] = None  # the worker process's job, set once by its initializer


def _init_worker(setup: WorkerSetup, progress, stop) -> None:
    global _JOB
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    threading.Thread(target=_exit_with, args=(setup.parent,), daemon=True).start()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: N workers, N cores
    tokenizer = load_tokenizer(setup.tokenizer, setup.eod_token, key="--tokenizer")
    _JOB = Job(setup.out, setup.sources, tokenizer, token_dtype(tokenizer.vocab_size), setup.text_field,
               setup.max_bad, report=lambda nbytes, ntokens: progress.put((nbytes, ntokens)), stopped=stop.is_set)


def _exit_with(parent: int) -> None:
    """A worker whose main process is gone (SIGKILL, out of memory) exits too, instead of
    waiting for work forever; the next run removes its temporary files."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _worker_task(task: Task) -> TaskResult:
    return run_task(_JOB, task)


@contextlib.contextmanager
def _single_threaded_tokenizer():
    """In-process encoding is one thread too (same speed per worker as the pool, and no
    tokenizer threads left running in a caller that may fork later)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def run_tasks(job: Job, tasks: list[Task], workers: int, spec: str, eod_token: Optional[str],
              on_result: Callable[[TaskResult], bool]) -> None:
    """Run `tasks`; `on_result` returns False to stop the rest (tasks running stop at
    their next batch and leave no files)."""
    if workers == 1:
        with _single_threaded_tokenizer():
            for task in tasks:
                if not on_result(run_task(job, task)):
                    return
        return
    ctx = multiprocessing.get_context("spawn")
    progress, stop = ctx.Queue(), ctx.Event()
    setup = WorkerSetup(os.getpid(), spec, eod_token, job.out, job.sources, job.text_field, job.max_bad)
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(setup, progress, stop)) as pool:
        pending = {pool.submit(_worker_task, task) for task in tasks}
        try:
            while pending:
                done, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                _drain(progress, job.report)
                go_on = [on_result(f.result()) for f in sorted(done, key=lambda f: f.result().task.name)]
                if not all(go_on):
                    break
        finally:
            stop.set()
            for f in pending:
                f.cancel()
    _drain(progress, job.report)


def _drain(progress, report: Callable[[int, int], None]) -> None:
    with contextlib.suppress(queue.Empty):
        while True:
            report(*progress.get_nowait())
