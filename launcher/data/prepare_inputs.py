"""The input side of `prepare`: which files (`Source`), how they are cut into tasks (`Task`:
byte ranges ending at a line break), and a task's documents read from them, its bad lines
recorded (`BadLines`). What each kind of input holds: the `prepare` verb's docstring
(launcher/prepare.py); running the tasks: launcher/data/prepare_tasks.py.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from launcher.data.shards import commit_file, discard_file, temporary_file
from launcher.errors import ConfigError

SUFFIXES = {".jsonl": ("jsonl", False), ".txt": ("txt", False), ".jsonl.gz": ("jsonl", True), ".txt.gz": ("txt", True)}
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


class Stop(Exception):
    """A task gives up: its own bad lines exceed --max-bad, or another task failed."""


# --------------------------------------------------------------------------------------
# Inputs and tasks (main process)
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
# A task's documents and bad lines (in a worker, or in-process)
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
            discard_file(self.file)


def _count_newlines(path: str, end: int) -> int:
    count, pos = 0, 0
    with open(path, "rb") as f:
        while pos < end and (block := f.read(min(16 * MB, end - pos))):
            count, pos = count + block.count(b"\n"), pos + len(block)
    return count


def read_documents(source: Source, task: Task, text_field: str, max_bad: int,
                   bad: BadLines) -> Iterator[tuple[Optional[str], int]]:
    """(document, input bytes read so far) for the task; (None, bytes) ends the input. More
    than `max_bad` bad lines raise Stop. Errors reading the input (not the output) become
    one-line ConfigErrors naming the file."""
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
                text = _parse(line, text_field, number, bad)
                if text is not None:
                    yield text, (raw.tell() if source.gz else pos) - task.start
                if bad.count > max_bad:  # the run fails anyway: stop reading
                    raise Stop()
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

