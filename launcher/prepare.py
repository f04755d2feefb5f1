"""Text files -> the token shards training reads: `python -m launcher.prepare`.

    python -m launcher.prepare --input 'corpus/*.jsonl.gz' notes.txt --tokenizer path/to/tokenizer.json \\
        --out data/web [--text-field text] [--workers N] [--max-bad 0] [--eod-token TOK] [--chunk-mb 256]

Inputs are paths or globs (each expanded and sorted, in the order given, duplicates dropped):
    .jsonl, .jsonl.gz   one document per line: the string at --text-field; blank lines skipped
    .txt, .txt.gz       the WHOLE file is one document (for many documents, write jsonl)

Output: the layout of launcher/shards.py (shards/NNNNNN.bin/.idx/.json, tokenizer.json,
manifest.json written last), and beside it DIR/prepare-plan.json (what the directory is
being prepared from: inputs and sizes, tokenizer, text field, chunk size; written first, a
re-run with other inputs is refused), shards/NNNNNN.bad (a shard's bad lines, written
before its record) and DIR/bad_lines.txt (all of them, in input order).

Work split. The tasks depend on the inputs and --chunk-mb only, never on --workers: each
uncompressed .jsonl is cut into byte ranges of about --chunk-mb ending at a line break; a
.txt (one document) and a .gz (a gzip stream cannot be entered midway) are one task each.
Task i writes shard i, so the output is byte-identical for any worker count, and a re-run
skips every shard whose record exists and matches its task: a killed run continues where it
stopped and ends with the same bytes. Several processes preparing the same directory at once
(ranks preparing the embedded corpus) write identical files by atomic renames.

Why each worker writes its own shards: Megatron's preprocess_data.py sends every worker's
tokens back to one process that writes them all, and that writer caps the whole run. Here a
worker process owns a tokenizer (spawned, never forked: the Rust tokenizer's thread pool
does not survive a fork; one thread each, TOKENIZERS_PARALLELISM=false, so N workers use N
cores), encodes batches of documents with the tokenizer's encode_batch, appends the
end-of-document token to each and streams them to its shard's temporary file; only byte and
token counts travel back, for the progress bar.

Bad lines (not UTF-8, invalid JSON, the field missing or not a string) are reported as
file:line and skipped while there are at most --max-bad of them (counted in the records and
the manifest); one more fails the run with exit 2, naming the first.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import glob
import gzip
import io
import json
import math
import multiprocessing
import os
import queue
import socket
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from launcher.config import CONFIG_ERROR_EXIT_CODE, ConfigError
from launcher.files import fsync_path, write_atomic
from launcher.shards import FORMAT, MANIFEST, SHARDS, TOKENIZER_COPY, shard_paths, token_dtype, write_manifest
from launcher.tokenizer import BYTE, load_tokenizer

PLAN = "prepare-plan.json"
BAD_LINES = "bad_lines.txt"
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
            self.file = _temporary(self.shards / f"{self.task.name}.bad")
        self.file.write(text.encode() + b"\n")
        self.count += 1
        if len(self.head) < SHOW_BAD:
            self.head.append(text)

    def publish(self) -> None:
        if self.file is not None:
            _commit(self.file, self.shards / f"{self.task.name}.bad")

    def discard(self) -> None:
        if self.file is not None:
            _discard(self.file)


def _count_newlines(path: str, end: int) -> int:
    count, pos = 0, 0
    with open(path, "rb") as f:
        while pos < end and (block := f.read(min(16 * MB, end - pos))):
            count, pos = count + block.count(b"\n"), pos + len(block)
    return count


def _temporary(path: Path):
    """A private temporary file beside `path`; its name says which host and process own it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.tmp.{socket.gethostname()}.{os.getpid()}.")
    os.close(fd)
    return open(tmp, "wb")  # committed or discarded by the caller


def _commit(f, path: Path) -> None:
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
    tokens_f, bounds_f = _temporary(bin_path), _temporary(idx_path)
    try:
        tokens, documents = _encode(job, source, task, bad, tokens_f, bounds_f)
        _commit(tokens_f, bin_path)
        _commit(bounds_f, idx_path)
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


# --------------------------------------------------------------------------------------
# The whole preparation
# --------------------------------------------------------------------------------------


def prepare(inputs: list[str], tokenizer: str, out: Path, *, text_field: str = "text", workers: Optional[int] = None,
            max_bad: int = 0, eod_token: Optional[str] = None, chunk_mb: float = 256, progress: bool = True) -> dict:
    """Tokenize `inputs` into `out` (see the module docstring) and return the manifest.
    `workers` None: one per CPU this process may use. `progress` False: print nothing but
    bad lines. Any mistake in the inputs or options is a one-line ConfigError."""
    out = Path(out)
    workers = _check_options(inputs, text_field, workers, max_bad, chunk_mb, out)
    tok = load_tokenizer(tokenizer, eod_token, key="--tokenizer")
    sources = expand_inputs(inputs)
    dtype = token_dtype(tok.vocab_size)
    identity = dataset_identity(sources, tok, dtype, text_field)
    manifest = _read_json(out / MANIFEST)
    if manifest is not None:
        if not same_data(manifest, identity):
            raise ConfigError("--out", f"{out} holds a dataset prepared from other inputs or with another tokenizer; "
                              f"use a new --out (or delete {out})")
        if progress:
            print(f"{out}: already prepared ({_n(manifest['documents'], 'document')}, "
                  f"{_n(manifest['tokens'], 'token')}); nothing to do")
        return manifest
    chunk_bytes = max(1, int(chunk_mb * MB))
    claim_output(out, {"format": FORMAT, "sources": identity["sources"], "text_field": text_field,
                       "tokenizer": {"sha256": tok.sha256, "eod_id": int(tok.eod_id)}, "chunk_bytes": chunk_bytes})
    (out / SHARDS).mkdir(exist_ok=True)
    remove_stale_temporaries(out / SHARDS)

    tally = _Tally(progress)
    job = Job(out, sources, tok, dtype, text_field, max_bad, report=tally.report, stopped=lambda: False)
    tasks = cut_tasks(sources, chunk_bytes)
    records = {t.name: r for t in tasks if (r := finished(job, t)) is not None}
    todo = [t for t in tasks if t.name not in records]
    workers = min(workers, len(todo)) or 1
    if progress:
        print(f"prepare: {_n(len(sources), 'input file')}, {sum(s.bytes for s in sources) / MB:,.1f} MB -> "
              f"{_n(len(tasks), 'shard')} ({len(tasks) - len(todo)} already done), {_n(workers, 'worker')}, "
              f"tokenizer {tok.name} (vocabulary {tok.vocab_size:,}, {dtype.name})")
    failures: dict[str, TaskResult] = {}  # tasks that stopped: their bad lines, or an error

    def on_result(result: TaskResult) -> bool:
        """Keep the result; False stops the run (an error, or more bad lines than allowed)."""
        if result.record is not None:
            records[result.task.name] = result.record
        else:
            failures[result.task.name] = result
        return result.record is not None and sum(int(r["bad_lines"]) for r in records.values()) <= max_bad

    tally.start(sum(t.end - t.start for t in tasks), sum(t.end - t.start for t in todo))
    try:
        run_tasks(job, todo, workers, tokenizer, eod_token, on_result)
    finally:
        tally.close()
    n_bad = _check_bad_lines(out, tasks, records, failures, max_bad)
    if tok.name != BYTE:
        write_atomic(out / TOKENIZER_COPY, Path(tok.file).read_bytes())
    shards = [records[t.name] for t in tasks]
    manifest = {"format": FORMAT, "tokenizer": identity["tokenizer"], "dtype": dtype.name,
                "tokens": sum(int(r["tokens"]) for r in shards), "documents": sum(int(r["documents"]) for r in shards),
                "bad_lines": n_bad, "text_field": text_field, "sources": identity["sources"], "shards": shards}
    write_manifest(out, manifest)  # last: the directory is a dataset
    if progress:
        done = [records[t.name] for t in todo]
        tally.summary(manifest, sum(t.end - t.start for t in todo), sum(int(r["tokens"]) for r in done),
                      len(tasks) - len(todo), out)
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
        raise ConfigError(first, f"{reason} — {at_least}{_n(n_bad, 'bad line')}, more than --max-bad {max_bad} "
                          f"(listed in {out / BAD_LINES})")
    for line in bad:
        print(f"skipped bad line: {line}")
    if n_bad > len(bad):
        print(f"... and {n_bad - len(bad):,} more")
    if bad:
        print(f"{_n(n_bad, 'bad line')} skipped (--max-bad {max_bad}), all listed in {out / BAD_LINES}")
    return n_bad


def _n(count: int, thing: str) -> str:
    return f"{count:,} {thing}{'s' * (count != 1)}"


def _check_options(inputs, text_field, workers, max_bad, chunk_mb, out: Path) -> int:
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
        listing = listing or _temporary(out / BAD_LINES)
        with lines:
            for line in lines:
                listing.write(line)
                if len(head) < SHOW_BAD:
                    head.append(line.decode().rstrip("\n"))
    if listing is not None:
        _commit(listing, out / BAD_LINES)
    return head


class _Tally:
    """The progress bar over input bytes (on a terminal) and the rates of this run."""

    def __init__(self, show: bool):
        self.show, self.bar, self.bytes, self.tokens, self.t0, self.shown = show, None, 0, 0, time.perf_counter(), 0.0

    def start(self, total: int, todo: int) -> None:
        self.t0 = time.perf_counter()
        if self.show and todo and sys.stderr.isatty():
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
        print(f"prepared {out}: {_n(manifest['documents'], 'document')}, {_n(manifest['tokens'], 'token')}, "
              f"{sum(s['bytes'] for s in manifest['sources']) / MB:,.1f} MB in {_n(total, 'shard')}; this run "
              f"{nbytes / MB:,.1f} MB in {seconds:.1f} s: {nbytes / MB / seconds:,.2f} MB/s, "
              f"{tokens / seconds:,.0f} tokens/s; {_n(manifest['bad_lines'], 'bad line')}{resumed}")


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    from launcher.train import _ArgumentParser

    parser = _ArgumentParser(prog="python -m launcher.prepare", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                        help=".jsonl / .jsonl.gz (a document per line) or .txt / .txt.gz (the whole file is ONE "
                             "document); quote globs")
    parser.add_argument("--tokenizer", required=True, help="`byte`, a tokenizer.json, or a directory holding one")
    parser.add_argument("--out", required=True, help="the output directory (a new one per dataset)")
    parser.add_argument("--text-field", default="text", help="the jsonl field holding the text (default: text)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: the CPU count)")
    parser.add_argument("--max-bad", type=int, default=0, help="bad lines skipped before the run fails (default: 0)")
    parser.add_argument("--eod-token", default=None, help="the end-of-document token (default: the tokenizer's)")
    parser.add_argument("--chunk-mb", type=float, default=256, help="MB of jsonl per shard (default: 256)")
    try:
        args, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as done:  # --help, or a usage error already printed as one line
        return int(done.code or 0)
    try:
        if unknown:  # _ArgumentParser's own hint names launcher.train
            raise ConfigError(unknown[0], "unknown option (python -m launcher.prepare --help)")
        prepare(args.input, args.tokenizer, Path(args.out), text_field=args.text_field, workers=args.workers,
                max_bad=args.max_bad, eod_token=args.eod_token, chunk_mb=args.chunk_mb)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; the same command continues", file=sys.stderr)
        return 130
    except BrokenProcessPool:
        print("error: a worker process died (out of memory?); finished shards are kept; the same command "
              "continues", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
