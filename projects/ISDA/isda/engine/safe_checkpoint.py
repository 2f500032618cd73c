"""Checkpoints that survive ``kill -9``, load without running pickled code, and, for inference,
load completely or not at all.

fvcore's ``Checkpointer`` writes the model straight to its final path and then overwrites
``last_checkpoint`` in place: a kill in between leaves a truncated ``model_XXXX.pth`` or a
``last_checkpoint`` that names one, and ``--resume`` then fails. fvcore does all its file access
through the checkpointer's ``path_manager``, so that is where this one plugs in: local files
opened for writing go through :func:`isda.file_io.atomic_open`; everything else (reads, remote
stores) goes to Detectron2's path manager unchanged.

Files are read by :func:`isda.weights.read_checkpoint` (through Detectron2's checkpointer, which
importing isda routes there). With ``require_complete`` a load that leaves any model tensor
missing or of another shape raises :class:`isda.weights.IncompleteWeightsError`, naming the file:
evaluation, the demo, export and prediction use that; training does not.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional

from detectron2.checkpoint import DetectionCheckpointer

from ..file_io import atomic_open, stale_temporaries
from ..weights import check_complete, check_weights_path, unsafe_pickle_allowed

__all__ = ["SafeDetectionCheckpointer", "inference_weights_given", "load_inference_weights"]

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
    """DetectionCheckpointer with atomic saves, safe reading, and optionally complete loading.

    Args:
        allow_unsafe_pickle: load files that need pickle; None reads ``ISDA_UNSAFE_PICKLE``
            (see :func:`isda.weights.unsafe_pickle_allowed`).
        require_complete: refuse (:class:`isda.weights.IncompleteWeightsError`) a file that
            leaves any model parameter or buffer missing or mismatched in shape.
    """

    def __init__(
        self,
        model,
        save_dir="",
        *,
        allow_unsafe_pickle: Optional[bool] = None,
        require_complete: bool = False,
        **kw,
    ):
        super().__init__(model, save_dir, **kw)
        self.path_manager = _AtomicLocalWrites(self.path_manager)
        self.allow_unsafe_pickle = unsafe_pickle_allowed(allow_unsafe_pickle)
        self.require_complete = require_complete
        self._loading = ""

    def resume_or_load(self, path: str, *, resume: bool = True):
        if resume and self.save_to_disk and self.save_dir and _is_local(self.save_dir):
            # Only the process that writes checkpoints removes what an interrupted write left.
            for tmp in stale_temporaries(self.save_dir):
                logger.info("Removing %s, left by an interrupted checkpoint write", tmp)
                os.remove(tmp)
        return super().resume_or_load(path, resume=resume)

    def load(self, path: str, *args, **kwargs):
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = ""

    def _load_model(self, checkpoint):
        # The model's own eval-mode check (ISDA.load_state_dict) sees shape mismatches only as
        # missing keys; this check knows the file and both lists, so it speaks instead.
        with _model_check_deferred(self.model):
            incompatible = super()._load_model(checkpoint)
        if self.require_complete:
            # fvcore drops mismatched tensors before loading, so they are among the missing too.
            mismatched = [name for name, *_ in incompatible.incorrect_shapes]
            shape_errors = set(mismatched)
            missing = [k for k in incompatible.missing_keys if k not in shape_errors]
            check_complete(self._loading, list(self.model.state_dict()), missing, mismatched)
        return incompatible


@contextlib.contextmanager
def _model_check_deferred(model):
    """Within the block, a model with an ``allow_incomplete_weights`` switch (ISDA) allows them."""
    previous = getattr(model, "allow_incomplete_weights", None)
    if previous is not None:
        model.allow_incomplete_weights = True
    try:
        yield
    finally:
        if previous is not None:
            model.allow_incomplete_weights = previous


def load_inference_weights(model, cfg, path: Optional[str] = None) -> None:
    """Loads ``path`` (default ``cfg.MODEL.WEIGHTS``) into ``model`` for evaluation, prediction or
    export: the file is read safely and must provide every tensor, unless
    ``MODEL.ISDA.ALLOW_INCOMPLETE_WEIGHTS``, which also admits an empty path (random weights).

    Raises:
        isda.weights.WeightsError: the file is missing, unreadable, refused or incomplete.
    """
    path = cfg.MODEL.WEIGHTS if path is None else path
    if inference_weights_given(cfg, path):
        require = not cfg.MODEL.ISDA.ALLOW_INCOMPLETE_WEIGHTS
        SafeDetectionCheckpointer(model, require_complete=require).load(path)


def inference_weights_given(cfg, path: str) -> bool:
    """Whether inference has a weights file to load: False for an empty ``path`` that
    ``MODEL.ISDA.ALLOW_INCOMPLETE_WEIGHTS`` admits (random weights, with a warning). Raises
    :class:`isda.weights.BadWeightsFileError` for an empty path otherwise, and for a local path
    that cannot hold weights, before any file is read."""
    if not path and cfg.MODEL.ISDA.ALLOW_INCOMPLETE_WEIGHTS:
        logger.warning("MODEL.WEIGHTS is empty: inference runs on random weights")
        return False
    if _is_local(path):
        check_weights_path(path)
    return True


def _is_local(path: str) -> bool:
    return "://" not in path
