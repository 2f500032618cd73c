"""Reading source checkpoints and writing converted ones: reading through :mod:`isda.weights`
(no pickled code), writing atomically (:mod:`isda.file_io`), as ``.pth`` or ``.safetensors``."""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional

import torch

from ..file_io import atomic_open
from ..weights import read_checkpoint, save_safetensors
from .formats import source_formats
from .report import ConversionReport
from .rules import SourceFormat

__all__ = [
    "CheckpointFormatError",
    "detect_format",
    "extract_state_dict",
    "load_source",
    "save_converted",
]

logger = logging.getLogger(__name__)


class CheckpointFormatError(RuntimeError):
    """A source file is not in the expected layout."""


def load_source(path: str, allow_unsafe_pickle: Optional[bool] = None) -> dict:
    """The dict stored in ``path``, read by :func:`isda.weights.read_checkpoint`.

    Raises:
        isda.weights.UnsafePickleError: the file pickles objects and is not marked trusted (the
            original Deformable DETR release pickles its training ``args``).
        isda.weights.BadWeightsFileError: missing, empty, truncated or not a checkpoint.
        CheckpointFormatError: the file does not hold a dict.
    """
    obj = read_checkpoint(path, allow_unsafe_pickle=allow_unsafe_pickle)
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def _strip_module_prefix(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # Files saved from DistributedDataParallel prefix every key with "module.".
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def _candidate(obj: dict, fmt: SourceFormat):
    return obj.get(fmt.container_key, obj) if fmt.container_key else obj


def extract_state_dict(obj: dict, fmt: SourceFormat) -> Dict[str, torch.Tensor]:
    """The tensor dict of ``fmt`` inside a loaded file (bare dicts are accepted for any format)."""
    state = _candidate(obj, fmt)
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"'{fmt.container_key}' is not a dict in this file")
    state = _strip_module_prefix(state)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointFormatError(f"non-tensor entries in the state dict: {bad[:5]}")
    return state


def detect_format(obj: dict) -> SourceFormat:
    """The format whose signature key is in the file."""
    formats = source_formats()
    for fmt in formats.values():
        candidate = _candidate(obj, fmt)
        if isinstance(candidate, dict) and fmt.signature in _strip_module_prefix(candidate):
            return fmt
    raise CheckpointFormatError(
        "unknown checkpoint layout; expected one of: "
        + "; ".join(f"{f.name} ({f.description})" for f in formats.values())
    )


def save_converted(path: str, state: Dict[str, torch.Tensor], report: ConversionReport) -> None:
    """Writes a file that ``MODEL.WEIGHTS`` / DetectionCheckpointer loads by exact key names
    (``matching_heuristics`` False, so no name guessing happens at load time). A path ending in
    ``.safetensors`` is written in that format (tensors only; the report stays in the log)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        save_safetensors(state, path)
        logger.info("Wrote %d tensors to %s", len(state), path)
        return
    payload = {
        "model": state,
        "__author__": f"isda.conversion ({report.source_format})",
        "matching_heuristics": False,
    }
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)
    logger.info("Wrote %d tensors to %s", len(state), path)
