
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import glob
import gzip
import json
import multiprocessing
import os
import queue
import socket
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from launcher.data.shards import (
    SHARDS,
    shard_paths,
    token_dtype,
)
from launcher.errors import ConfigError
from launcher.files import fsync_path, write_atomic
from launcher.formats.tokenizer import load_tokenizer

SUFFIXES = {".jsonl": ("jsonl", False), ".txt": ("txt", False), ".jsonl.gz": ("jsonl", True), ".txt.gz": ("txt", True)}
BATCH_DOCS = 1024  # documents per encode_batch call ...
BATCH_CHARS = 4 << 20  # ... or this much text, whichever comes first (bounds a worker's memory)
SHOW_BAD = 20  # bad lines printed; bad_lines.txt has them all
MB = 1 << 20


@dataclass(frozen=True)
class Source:
    path: str  # as the user named it (messages)
    abspath: str  # what the plan and the manifest record
    bytes: int
    kind: str  # "jsonl" or "txt"
    gz: bool


@dataclass(frozen=True)
class Task:
    """Shard `name`: bytes [start, end) of source `source` (a .gz or .txt: the whole file)."""

    name: str
    source: int
    start: int
    end: int


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


# --------------------------------------------------------------------------------------
# Inputs, plan and tasks (main process)
# --------------------------------------------------------------------------------------


def expand_inputs(patterns: list[str]) -> list[Source]:
    sources, seen = [], set()
    for pattern in patterns:
        is_glob = glob.has_magic(pattern)
        matches = sorted(glob.glob(pattern, recursive=True)) if is_glob else [pattern]
        if not matches or not os.path.exists(matches[0]):
            raise ConfigError("--input", f"no file matches {pattern}" if is_glob else f"not found: {pattern}")
        for path in matches:
            abspath = os.path.abspath(path)
            if abspath in seen:
                continue
            seen.add(abspath)
            suffix = next((s for s in SUFFIXES if path.endswith(s)), None)
            if os.path.isdir(path):
                raise ConfigError("--input", f"{path} is a directory; give files or a glob such as {path}/*.jsonl")
            if suffix is None:
                raise ConfigError("--input", f"{path}: expected .jsonl, .txt, .jsonl.gz or .txt.gz")
            sources.append(Source(path, abspath, os.path.getsize(path), *SUFFIXES[suffix]))
    return sources


def cut_tasks(sources: list[Source], chunk_bytes: int) -> list[Task]:
    ranges = [(i, start, end) for i, s in enumerate(sources)
              for start, end in (_line_ranges(s.path, s.bytes, chunk_bytes) if s.kind == "jsonl" and not s.gz
                                 else [(0, s.bytes)])]
    return [Task(f"{n:06d}", i, start, end) for n, (i, start, end) in enumerate(ranges)]


def _line_ranges(path: str, size: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) ranges of about `chunk` bytes, each ending just after a line break (or at
    the end of the file): a few small reads per range, never a scan of the file."""
    ranges, start = [], 0
    with open(path, "rb") as f:
        while start < size:
            pos = min(start + chunk, size) - 1  # the range takes the whole line holding this byte
            f.seek(pos)
            while (block := f.read(1 << 16)) and (i := block.find(b"\n")) < 0:
                pos += len(block)
            end = min(pos + i + 1, size) if block else size
            ranges.append((start, end))
            start = end
    return ranges or [(0, 0)]


# --------------------------------------------------------------------------------------
# One task: read documents, encode, write the shard (in a worker, or in-process)
# --------------------------------------------------------------------------------------


class BadLines:
    """A task's bad lines, streamed to a temporary file (a chunk of garbage may hold millions)."""

    def __init__(self, source: Source, task: Task, shards: Path):
        self.source, self.task, self.shards = source, task, shards
        self.count, self.head, self.file = 0, [], None
        self.base: Optional[int] = None  # lines before the task's range, counted on the first bad one

    def add(self, line_in_task: int, reason: str) -> None:
        if self.base is None:
            self.base = _count_newlines(self.source.path, self.task.start) if self.task.start else 0
        text = str(ConfigError(f"{self.source.path}:{self.base + line_in_task}", reason))  # escaped to one line
        if self.file is None:
            self.file = temporary_file(self.shards / f"{self.task.name}.bad")
        self.file.write(text.encode() + b"\n")
        self.count += 1
        if len(self.head) < SHOW_BAD:
            self.head.append(text)

    def publish(self) -> None:
        if self.file is not None:
            commit_file(self.file, self.shards / f"{self.task.name}.bad")

    def discard(self) -> None:
        if self.file is not None:
            _discard(self.file)


def _count_newlines(path: str, end: int) -> int:
    count, pos = 0, 0
    with open(path, "rb") as f:
        while pos < end and (block := f.read(min(16 * MB, end - pos))):
            count, pos = count + block.count(b"\n"), pos + len(block)
    return count


def temporary_file(path: Path):
    """A private temporary file beside `path`; its name says which host and process own it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.tmp.{socket.gethostname()}.{os.getpid()}.")
    os.close(fd)
    return open(tmp, "wb")  # committed or discarded by the caller


def commit_file(f, path: Path) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(f.name, path)


def _discard(f) -> None:
    f.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f.name)


class _Stop(Exception):
    """A task gives up: its own bad lines exceed --max-bad, or another task failed."""


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
    except (_Stop, ConfigError) as stop:
        for f in (tokens_f, bounds_f):
            _discard(f)
        bad.discard()
        error = (stop.key, stop.message) if isinstance(stop, ConfigError) else None
        return TaskResult(task, None, bad.count, bad.head, error)
    except BaseException:
        for f in (tokens_f, bounds_f):
            _discard(f)
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
    for text, offset in _documents(job, source, task, bad):
        if text is not None:
            batch.append(text)
            chars += len(text)
        if batch and (text is None or len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS):
            n = _write_batch(job, batch, tokens, tokens_f, bounds_f)
            tokens, documents, batch, chars = tokens + n, documents + len(batch), [], 0
            job.report(offset - reported, n)
            reported = offset
            if job.stopped():
                raise _Stop()
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


def _documents(job: Job, source: Source, task: Task, bad: BadLines) -> Iterator[tuple[Optional[str], int]]:
    """(document, input bytes read so far) for the task; (None, bytes) ends the input. Errors
    reading the input (not the output) become one-line ConfigErrors naming the file."""
    try:
        with open(source.path, "rb") as raw:
            if os.fstat(raw.fileno()).st_size != source.bytes:
                raise ConfigError(source.path, "changed since this preparation began; use a new --out")
            if source.kind == "txt":
                yield _whole_document(raw.read() if not source.gz else gzip.GzipFile(fileobj=raw).read(), bad), 0
                yield None, task.end - task.start
                return
            raw.seek(task.start)
            lines = gzip.GzipFile(fileobj=raw) if source.gz else raw
            pos = task.start
            for number, line in enumerate(lines, 1):
                pos += len(line)
                if number == 1 and task.start == 0 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]  # a UTF-8 byte-order mark (Windows editors write one)
                text = _parse(line, job.text_field, number, bad)
                if text is not None:
                    yield text, (raw.tell() if source.gz else pos) - task.start
                if bad.count > job.max_bad:  # the run fails anyway: stop reading
                    raise _Stop()
                if not source.gz and pos >= task.end:
                    break
            yield None, task.end - task.start
    except (OSError, EOFError, zlib.error) as err:
        what = "not a readable gzip file" if source.gz else "cannot read it"
        raise ConfigError(source.path, f"{what} ({getattr(err, 'strerror', None) or err})") from None


def _whole_document(data: bytes, bad: BadLines) -> Optional[str]:
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad.add(data.count(b"\n", 0, err.start) + 1, f"not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})")
        return None


def _parse(line: bytes, field: str, number: int, bad: BadLines) -> Optional[str]:
    """The document on a jsonl line; None for a blank line or a bad one (recorded)."""
    if not line.strip():
        return None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        bad.add(number, f"not UTF-8 (byte 0x{line[err.start]:02x} at column {err.start + 1})")
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        bad.add(number, f"invalid JSON ({err.msg})")
        return None
    except (ValueError, RecursionError) as err:  # an integer over 4300 digits; nesting too deep
        bad.add(number, f"invalid JSON ({type(err).__name__}: {str(err)[:80] or 'nested too deeply'})")
        return None
    if not isinstance(value, dict):
        bad.add(number, f"a JSON {_json_type(value)}, not an object with a {field!r} field")
        return None
    doc = value.get(field)
    if not isinstance(doc, str):
        if field not in value:
            keys = ", ".join(repr(k)[:40] for k in list(value)[:5]) or "none"
            bad.add(number, f"no {field!r} field (fields: {keys}); name the text field with --text-field")
        else:
            bad.add(number, f"field {field!r} is a JSON {_json_type(doc)}, not a string")
        return None
    if "\\u" in text:  # only an escape can make a lone surrogate, which no tokenizer accepts
        try:
            doc.encode("utf-8")
        except UnicodeEncodeError:
            bad.add(number, f"field {field!r} holds an unpaired surrogate escape (\\ud800-\\udfff), not text")
            return None
    return doc


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


# --------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------

_JOB: Optional[Job] = None  # the worker process's job, set once by its initializer


def _init_worker(parent: int, spec: str, eod_token: Optional[str], out: Path, sources: list[Source],
                 text_field: str, max_bad: int, progress, stop) -> None:
    global _JOB
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: N workers, N cores
    tokenizer = load_tokenizer(spec, eod_token, key="--tokenizer")
    _JOB = Job(out, sources, tokenizer, token_dtype(tokenizer.vocab_size), text_field, max_bad,
               report=lambda nbytes, ntokens: progress.put((nbytes, ntokens)), stopped=stop.is_set)


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
    args = (os.getpid(), spec, eod_token, job.out, job.sources, job.text_field, job.max_bad, progress, stop)
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=args) as pool:
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
