"""The project's file policy for writing: every file it writes appears whole or not at all.
(Reading weights has its own owner, :mod:`isda.weights`.)

Writing: :func:`atomic_open` writes to a hidden temporary beside the target, flushes and fsyncs it,
renames it over the target (``os.replace`` is atomic on POSIX) and fsyncs the directory, so a
``kill -9`` or a power loss leaves either the old or the new complete file, plus at worst a
temporary that :func:`stale_temporaries` finds.
"""

from __future__ import annotations

import contextlib
import glob
import os
from typing import IO, Iterator, List

__all__ = ["atomic_open", "stale_temporaries"]

_TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO]:
    """``open(path, mode)`` for writing, where ``path`` changes only when the block succeeds.

    Inside the block the file is a temporary beside ``path``. On success it is flushed, fsynced
    and renamed to ``path``; on any exception it is removed and ``path`` is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}{_TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    """Makes the rename itself durable (a power loss could otherwise undo it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stale_temporaries(directory: str) -> List[str]:
    """Temporaries of :func:`atomic_open` in ``directory``: left by a killed writer, incomplete by
    construction. Only call this when no other process is writing there."""
    return sorted(glob.glob(os.path.join(directory, f".*{_TMP_MARK}*")))
