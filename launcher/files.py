"""Durable file writes: what checkpoints and the token cache need to survive a crash."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a private temporary file beside `path`, fsync it, rename it into
    place and fsync the directory: a reader sees the old file or the whole new one, never a
    part, even when several ranks race to write the same path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    os.fchmod(fd, shared_file_mode())  # mkstemp makes 0600; the published file follows the umask
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)  # reading the umask means setting it: set it back at once
    return umask


def shared_file_mode() -> int:
    """The mode `open()` gives a new file under this process's umask (0644 under umask 022),
    so a team can read each other's checkpoints as they read any other tool's output."""
    return 0o666 & ~current_umask()


def shared_dir_mode() -> int:
    """The mode `mkdir` gives a new directory under this process's umask (0755 under 022)."""
    return 0o777 & ~current_umask()
