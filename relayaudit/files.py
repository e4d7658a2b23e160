"""Files relayaudit creates are never wider than their mode, whatever the umask: evidence and secrets stay private."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import TextIO

__all__ = [
    "PRIVATE",
    "SHARED",
    "create_private",
    "open_append",
    "open_text_append",
    "write_text",
]

PRIVATE = 0o600  # the state store and its -wal and -shm files: evidence, outbox, ticket refs
SHARED = 0o640  # logs, findings, reports: the owner's group may read them (a log shipper)


def create_private(path: Path) -> None:
    """Create `path` empty with mode PRIVATE if it does not exist (SQLite then gives its -wal
    and -shm files the same mode, as it copies the database file's permissions to them)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE))


def open_append(path: Path, mode: int = SHARED) -> int:
    """A descriptor appending to `path`, created with `mode` (an existing file keeps its own)."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, mode)


def open_text_append(path: Path, mode: int = SHARED) -> TextIO:
    """`path` opened for appending text, line-buffered, created with `mode`."""
    return os.fdopen(open_append(path, mode), "a", encoding="utf-8", buffering=1)


def write_text(path: Path, text: str, mode: int = SHARED) -> None:
    """Replace `path` with `text` atomically, as a new file of exactly `mode`.

    A path that exists and is not a regular file (`/dev/stdout`, a pipe) is written in place.
    """
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(os.stat(path).st_mode):
            with path.open("w", encoding="utf-8") as out:
                out.write(text)
            return
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # mkstemp makes 0600; the report's readers may be the group
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
