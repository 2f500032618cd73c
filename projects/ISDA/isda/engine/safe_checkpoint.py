"""Checkpoints that survive ``kill -9`` and load without running pickled code.

fvcore's ``Checkpointer.save`` writes the model straight to its final path and then overwrites
``last_checkpoint`` in place: a kill in between leaves a truncated ``model_XXXX.pth`` or a
``last_checkpoint`` that names one, and ``--resume`` then fails. Here every file is written to a
temporary name in the same directory, flushed to disk and renamed over the target (``os.replace``
is atomic on POSIX), so either the old or the new complete file is visible, never a partial one.

Loading uses ``torch.load(weights_only=True)``: Detectron2 training checkpoints and the converters'
outputs are plain tensors and numbers, so nothing needs pickle. Files that do need it are refused
unless the user opts in (``allow_unsafe_pickle``; README "Security"). Detectron2 model-zoo ``.pkl``
files keep Detectron2's pickle loader, which is why they must come from a trusted source.
"""

from __future__ import annotations

import glob
import logging
import os
import pickle
from typing import IO, cast

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["SafeDetectionCheckpointer", "atomic_write"]

logger = logging.getLogger(__name__)
TMP_MARK = ".tmp-"
UNSAFE_PICKLE_ENV = "ISDA_UNSAFE_PICKLE"


def atomic_write(path: str, write, mode: str = "wb") -> None:
    """Calls ``write(f)`` on a temporary file beside ``path``, fsyncs it, then renames it to ``path``.

    A crash at any point leaves ``path`` as it was (or absent) plus, at worst, a hidden temporary.
    """
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
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


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves and ``weights_only`` loading of ``.pth`` files."""

    def __init__(self, model, save_dir="", *, allow_unsafe_pickle=None, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        if allow_unsafe_pickle is None:
            allow_unsafe_pickle = os.environ.get(UNSAFE_PICKLE_ENV, "") == "1"
        self.allow_unsafe_pickle = allow_unsafe_pickle

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if not _is_local(self.save_dir):  # remote stores (PathManager URLs) keep fvcore's writer
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_write(save_file, lambda f: torch.save(data, cast(IO[bytes], f)))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not _is_local(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename),
            mode="w",
        )

    def resume_or_load(self, path: str, *, resume: bool = True):
        if resume and self.save_to_disk and _is_local(self.save_dir):
            self._remove_stale_temporaries()
        return super().resume_or_load(path, resume=resume)

    def _remove_stale_temporaries(self) -> None:
        """Temporaries left by a process killed mid-write are incomplete by construction."""
        for tmp in glob.glob(os.path.join(self.save_dir, f".*{TMP_MARK}*")):
            logger.info("Removing %s, left by an interrupted checkpoint write", tmp)
            os.remove(tmp)

    def _torch_load(self, f: str):
        try:
            return torch.load(f, map_location="cpu", weights_only=not self.allow_unsafe_pickle)
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(
                f"{f}: torch.load(weights_only=True) refused it because it pickles Python objects, "
                "which can run code. Only if you trust the file, load it with "
                f"{UNSAFE_PICKLE_ENV}=1 (train_net.py --unsafe-pickle), or re-save just its "
                "tensors. See README 'Security'."
            ) from e


def _is_local(directory: str) -> bool:
    return "://" not in directory
