"""The project's file policy: every file it writes appears whole or not at all, and every ``.pth``
it reads is loaded as data, never as code.

Writing: :func:`atomic_open` writes to a hidden temporary beside the target, flushes and fsyncs it,
renames it over the target (``os.replace`` is atomic on POSIX) and fsyncs the directory, so a
``kill -9`` or a power loss leaves either the old or the new complete file, plus at worst a
temporary that :func:`stale_temporaries` finds.

Reading: :func:`load_weights` is ``torch.load(weights_only=True)``. Checkpoints of this project,
Detectron2 training checkpoints and the converters' outputs hold only tensors, numbers and plain
containers. A file that pickles anything else is refused with one message, unless the caller or
``ISDA_UNSAFE_PICKLE=1`` says the file is trusted (README "Security").
"""

from __future__ import annotations

import contextlib
import glob
import os
import pickle
from typing import IO, Iterator, List, Optional

import torch

__all__ = [
    "UNSAFE_PICKLE_ENV",
    "UnsafePickleError",
    "atomic_open",
    "load_weights",
    "stale_temporaries",
    "unsafe_pickle_allowed",
]

UNSAFE_PICKLE_ENV = "ISDA_UNSAFE_PICKLE"
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


class UnsafePickleError(pickle.UnpicklingError):
    """A file needs pickle (which can run code) and the caller did not say it is trusted."""


def unsafe_pickle_allowed(allow: Optional[bool] = None) -> bool:
    """``allow`` if given, else whether ``ISDA_UNSAFE_PICKLE=1`` is set in the environment."""
    if allow is None:
        return os.environ.get(UNSAFE_PICKLE_ENV, "") == "1"
    return bool(allow)


def load_weights(path: str, allow_unsafe_pickle: Optional[bool] = None):
    """``torch.load(path)`` on CPU with ``weights_only=True`` unless :func:`unsafe_pickle_allowed`.

    Raises:
        UnsafePickleError: the file pickles objects other than tensors and plain containers.
    """
    unsafe = unsafe_pickle_allowed(allow_unsafe_pickle)
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe)
    except pickle.UnpicklingError as e:
        if unsafe:
            raise
        raise UnsafePickleError(
            f"{path}: torch.load(weights_only=True) refused this file because it pickles Python "
            "objects besides tensors, and unpickling can run code. If you trust the file, pass "
            f"--unsafe-pickle (train_net.py, tools/convert_*.py) or set {UNSAFE_PICKLE_ENV}=1. "
            "Or keep only its weights, once, on a machine you trust:\n"
            "  python -c \"import torch; c = torch.load('IN.pth', map_location='cpu', "
            "weights_only=False); torch.save({'model': c['model']}, 'OUT.pth')\"\n"
            "See README 'Security'. torch said: " + _first_line(e)
        ) from e


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
