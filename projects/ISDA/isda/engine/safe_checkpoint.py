"""Checkpoints that survive ``kill -9`` and load without running pickled code.

fvcore's ``Checkpointer`` writes the model straight to its final path and then overwrites
``last_checkpoint`` in place: a kill in between leaves a truncated ``model_XXXX.pth`` or a
``last_checkpoint`` that names one, and ``--resume`` then fails. fvcore does all its file access
through the checkpointer's ``path_manager``, so that is where this one plugs in: local files
opened for writing go through :func:`isda.file_io.atomic_open`; everything else (reads, remote
stores) goes to Detectron2's path manager unchanged.

``.pth`` files load with :func:`isda.file_io.load_weights` (``weights_only=True``). Detectron2
model-zoo ``.pkl`` files keep Detectron2's pickle loader, so they must come from a trusted source.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from detectron2.checkpoint import DetectionCheckpointer

from ..file_io import atomic_open, load_weights, stale_temporaries, unsafe_pickle_allowed

__all__ = ["SafeDetectionCheckpointer"]

logger = logging.getLogger(__name__)


class _AtomicLocalWrites:
    """A path manager that writes local files atomically and delegates everything else."""

    def __init__(self, base):
        self._base = base

    def open(self, path: str, mode: str = "r", **kwargs):
        if mode in ("w", "wb") and _is_local(path):
            return atomic_open(path, mode)
        return self._base.open(path, mode, **kwargs)

    def __getattr__(self, name):
        return getattr(self._base, name)


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves and ``weights_only`` loading of ``.pth`` files.

    Args:
        allow_unsafe_pickle: load ``.pth`` files that need pickle; None reads
            ``ISDA_UNSAFE_PICKLE`` (see :func:`isda.file_io.unsafe_pickle_allowed`).
    """

    def __init__(self, model, save_dir="", *, allow_unsafe_pickle: Optional[bool] = None, **kw):
        super().__init__(model, save_dir, **kw)
        self.path_manager = _AtomicLocalWrites(self.path_manager)
        self.allow_unsafe_pickle = unsafe_pickle_allowed(allow_unsafe_pickle)

    def resume_or_load(self, path: str, *, resume: bool = True):
        if resume and self.save_to_disk and self.save_dir and _is_local(self.save_dir):
            # Only the process that writes checkpoints removes what an interrupted write left.
            for tmp in stale_temporaries(self.save_dir):
                logger.info("Removing %s, left by an interrupted checkpoint write", tmp)
                os.remove(tmp)
        return super().resume_or_load(path, resume=resume)

    def _torch_load(self, f: str):
        # DetectionCheckpointer._load_file reads every non-.pkl file through this method
        # (tests/test_reliability_training.py pins that).
        return load_weights(f, allow_unsafe_pickle=self.allow_unsafe_pickle)


def _is_local(path: str) -> bool:
    return "://" not in path
