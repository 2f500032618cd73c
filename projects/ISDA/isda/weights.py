"""The one owner of reading weights: every file the project loads as weights comes through here.

What is safe to load (docs/TRAINING.md "Weights"):

* ``.safetensors``: tensors only, by construction; the format for sharing weights.
* ``.pth`` (and any other name): ``torch.load(weights_only=True)``, which admits tensors, numbers
  and plain containers. On torch < 2.6 that is not a security boundary (CVE-2025-32434): a
  warning says so once per process.
* ``.pkl`` (Detectron2's model zoo): a restricted unpickler that admits what those files hold,
  numpy arrays, dicts, lists, strings and numbers, and nothing else.

A file that needs more is refused with :class:`UnsafePickleError`, unless the caller, the
``--unsafe-pickle`` flag or ``ISDA_UNSAFE_PICKLE=1`` says the file is trusted. A file that is
missing, empty, a directory, truncated or not a checkpoint raises :class:`BadWeightsFileError`;
weights that leave model tensors unloaded raise :class:`IncompleteWeightsError` where completeness
is required (:func:`check_complete`). All three are :class:`WeightsError`, whose message names the
file, so an app catches one type and a command line prints one line.

Importing :mod:`isda` routes Detectron2's own ``DetectionCheckpointer`` (which ``DefaultPredictor``
uses) through :func:`read_checkpoint` too (:func:`protect_detectron2_checkpointer`), so no path of
Detectron2 unpickles code from a weights file in a process that uses ISDA.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
import zipfile
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "BadWeightsFileError",
    "IncompleteWeightsError",
    "UNSAFE_PICKLE_ENV",
    "UnsafePickleError",
    "WeightsError",
    "check_complete",
    "check_weights_path",
    "protect_detectron2_checkpointer",
    "read_checkpoint",
    "save_safetensors",
    "unsafe_pickle_allowed",
]

logger = logging.getLogger(__name__)

UNSAFE_PICKLE_ENV = "ISDA_UNSAFE_PICKLE"
# How many tensor names an error about incomplete weights lists.
_NAMES_SHOWN = 5
# (module, name) of what Detectron2 model-zoo .pkl files pickle besides plain containers:
# numpy arrays and scalars (numpy 1 and 2 module names), and byte strings of protocol 2.
_ZOO_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
}


class WeightsError(RuntimeError):
    """A weights file cannot be used; the message names the file and what is wrong with it."""


class UnsafePickleError(WeightsError, pickle.UnpicklingError):
    """A file needs pickle beyond tensors and plain containers (which can run code), and the
    caller did not say it is trusted."""


class BadWeightsFileError(WeightsError):
    """Missing, empty, a directory, truncated, or not a checkpoint at all."""


class IncompleteWeightsError(WeightsError):
    """Loading left model parameters or buffers missing or of another shape."""


def unsafe_pickle_allowed(allow: Optional[bool] = None) -> bool:
    """``allow`` if given, else whether ``ISDA_UNSAFE_PICKLE=1`` is set in the environment."""
    if allow is None:
        return os.environ.get(UNSAFE_PICKLE_ENV, "") == "1"
    return bool(allow)


def _torch_release() -> Tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


_warned_old_torch = False


def _warn_if_weights_only_is_not_a_boundary() -> None:
    global _warned_old_torch
    if _torch_release() < (2, 6) and not _warned_old_torch:
        _warned_old_torch = True
        warnings.warn(
            f"torch {torch.__version__}: torch.load(weights_only=True) can be made to run code "
            "(CVE-2025-32434, fixed in torch 2.6). Load .pth files only from sources you trust, "
            "prefer .safetensors, or use the default stack (docs/INSTALL.md).",
            UserWarning,
            stacklevel=3,
        )


def _refused(path: str, detail: str) -> UnsafePickleError:
    return UnsafePickleError(
        f"{path}: refused, because it pickles Python objects besides tensors and plain "
        f"containers, and unpickling them can run code ({detail}). If you trust the file, pass "
        f"--unsafe-pickle or set {UNSAFE_PICKLE_ENV}=1; better, keep only its weights, once, on a "
        'machine you trust, as .safetensors (docs/TRAINING.md "Weights").'
    )


def check_weights_path(path: str) -> None:
    """Raises :class:`BadWeightsFileError` for a local path that cannot hold weights."""
    if not path:
        raise BadWeightsFileError("no weights file given (MODEL.WEIGHTS is empty)")
    if not os.path.exists(path):
        raise BadWeightsFileError(f"{path}: no such file")
    if os.path.isdir(path):
        raise BadWeightsFileError(f"{path}: is a directory, not a weights file")
    if os.path.getsize(path) == 0:
        raise BadWeightsFileError(f"{path}: is empty (0 bytes)")


class _ZooUnpickler(pickle.Unpickler):
    """Admits only :data:`_ZOO_PICKLE_GLOBALS`; numpy 1 module names resolve to numpy 2's."""

    def __init__(self, f, path: str):
        super().__init__(f, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _ZOO_PICKLE_GLOBALS:
            raise _refused(self._path, f"it needs {module}.{name}")
        if module.startswith("numpy.core") and np.lib.NumpyVersion(np.__version__) >= "2.0.0":
            module = "numpy._core" + module[len("numpy.core") :]  # numpy.core is deprecated in 2.x
        return super().find_class(module, name)


def _read_pkl(path: str, unsafe: bool):
    with open(path, "rb") as f:
        try:
            return pickle.load(f, encoding="latin1") if unsafe else _ZooUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError,) + _DAMAGE as e:
            raise BadWeightsFileError(
                f"{path}: not a readable .pkl checkpoint (truncated or another format; "
                f"{type(e).__name__}: {e})"
            ) from e


def _read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise BadWeightsFileError(f"{path}: not a readable .safetensors file ({e})") from e


# What torch.load raises on bytes that are not a whole checkpoint (its unpicklers read garbage
# as opcodes, so the error depends on the bytes).
_DAMAGE = (
    RuntimeError,
    EOFError,
    KeyError,
    ValueError,
    IndexError,
    TypeError,
    AttributeError,
    MemoryError,
    OverflowError,
    zipfile.BadZipFile,
    OSError,
)


# How torch's weights_only unpickler names a pickled class or function it refuses: "Unsupported
# global: GLOBAL mod.name" or, for blocked modules such as os, "unsupported GLOBAL mod.name"
# (torch 2.14); "Unsupported class mod.name" (torch 2.3).
_REFUSED_GLOBAL = re.compile(r"(?:[Uu]nsupported (?:global: )?GLOBAL|Unsupported class) ([\w.]+)")


def _refused_global(error: Exception) -> Optional[str]:
    """The class or function that torch's weights_only refusal names (code, not damage), or
    None when the refusal is about something else."""
    match = _REFUSED_GLOBAL.search(str(error))
    return match.group(1) if match else None


def _read_torch(path: str, unsafe: bool):
    if not unsafe:
        _warn_if_weights_only_is_not_a_boundary()
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe)
    except pickle.UnpicklingError as e:
        refused = None if unsafe else _refused_global(e)
        if refused:
            raise _refused(path, f"it needs {refused}") from e
        raise _damaged(path, e) from e
    except _DAMAGE as e:
        raise _damaged(path, e) from e


def _damaged(path: str, error: Exception) -> BadWeightsFileError:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return BadWeightsFileError(
        f"{path}: not a readable torch checkpoint (truncated, damaged, or not a .pth at all; "
        f"{type(error).__name__}: {first[:200]})"
    )


def read_checkpoint(path: str, allow_unsafe_pickle: Optional[bool] = None):
    """The object stored in the local weights file ``path``, read by its extension as the module
    docstring says. ``.safetensors`` files come back as ``{"model": tensors}``.

    Raises:
        UnsafePickleError, BadWeightsFileError (both :class:`WeightsError`).
    """
    check_weights_path(path)
    unsafe = unsafe_pickle_allowed(allow_unsafe_pickle)
    if path.endswith(".safetensors"):
        return {"model": _read_safetensors(path), "__author__": "safetensors"}
    if path.endswith(".pkl"):
        return _read_pkl(path, unsafe)
    return _read_torch(path, unsafe)


def save_safetensors(state: Dict[str, torch.Tensor], path: str) -> None:
    """Writes ``state`` (name -> tensor) as ``.safetensors``, whole or not at all."""
    from safetensors.torch import save

    from .file_io import atomic_open

    # safetensors stores each tensor's own bytes: shared or strided storage is copied out.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    with atomic_open(path, "wb") as f:
        f.write(save(tensors, metadata={"format": "pt"}))


def _likely_cause(model_keys: Sequence[str], unloaded: set) -> str:
    """One sentence on why a load left the tensors ``unloaded`` of a model with ``model_keys``."""
    if unloaded >= set(model_keys):
        return "the file holds none of this model's tensors: it is not an ISDA checkpoint"
    if all("class_branches" in k for k in unloaded):
        return "only the classifier is unloaded: the file was trained with another NUM_CLASSES"
    if unloaded == {k for k in model_keys if not k.startswith("backbone.")}:
        return "only the backbone loaded: this is a backbone-only (ImageNet) initialisation"
    return "the file was trained with another config (depth, width, levels or layers differ)"


def check_complete(
    path: str, model_keys: Sequence[str], missing: Sequence[str], mismatched: Sequence[str] = ()
) -> None:
    """Raises :class:`IncompleteWeightsError` naming ``path``, the counts, the first names and the
    likely cause, when any of the model's tensors (``model_keys``) is ``missing`` from the file or
    ``mismatched`` in shape."""
    if not missing and not mismatched:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({', '.join(list(missing)[:_NAMES_SHOWN])}, ...)")
    if mismatched:
        shown = ", ".join(list(mismatched)[:_NAMES_SHOWN])
        parts.append(f"{len(mismatched)} of another shape ({shown}, ...)")
    cause = _likely_cause(model_keys, set(missing) | set(mismatched))
    raise IncompleteWeightsError(
        f"{path}: these weights leave {len(set(missing) | set(mismatched))} of the model's "
        f"{len(model_keys)} tensors unloaded: {'; '.join(parts)}. Likely cause: {cause}. "
        "Inference refuses incomplete weights; training from them is normal. To run anyway "
        "(tests of random weights), set MODEL.ISDA.ALLOW_INCOMPLETE_WEIGHTS True."
    )


def _zoo_checkpoint(data) -> dict:
    """A Detectron2 ``.pkl`` as DetectionCheckpointer expects it: model-zoo files as they are;
    Caffe2/Detectron1 files as name-matched ``model`` blobs without optimizer momenta."""
    if not isinstance(data, dict):
        raise TypeError(f"expected a dict, got {type(data).__name__}")
    if "model" in data and "__author__" in data:
        return data
    blobs = data.get("blobs", data)
    blobs = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
    return {"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}


def protect_detectron2_checkpointer() -> None:
    """Makes Detectron2's ``DetectionCheckpointer`` read local files with :func:`read_checkpoint`.

    Detectron2 reads ``.pkl`` with plain ``pickle`` and ``.pth`` with a bare ``torch.load``
    (which runs pickled code on torch < 2.6). Its ``_load_file`` is the one place both happen;
    the replacement keeps what Detectron2 does with the loaded data (model-zoo and Caffe2
    layouts, ``?matching_heuristics=True`` URLs) and adds ``.safetensors``. Idempotent.
    """
    from detectron2.checkpoint import DetectionCheckpointer

    original = DetectionCheckpointer._load_file
    if getattr(original, "_isda_safe", False):
        return

    def _load_file(self, filename):
        allow = getattr(self, "allow_unsafe_pickle", None)
        if filename.endswith(".pkl"):
            data = read_checkpoint(filename, allow)
            try:
                return _zoo_checkpoint(data)
            except (TypeError, AttributeError) as e:
                raise BadWeightsFileError(f"{filename}: not a Detectron2 .pkl checkpoint ({e})")
        if filename.endswith(".pyth"):
            raise BadWeightsFileError(f"{filename}: pycls .pyth files are not supported")
        return original(self, filename)  # calls _torch_load below, then Detectron2's URL rules

    def _torch_load(self, filename):
        loaded = read_checkpoint(filename, getattr(self, "allow_unsafe_pickle", None))
        if not isinstance(loaded, dict):
            raise BadWeightsFileError(
                f"{filename}: holds a {type(loaded).__name__}, not a checkpoint dict"
            )
        return loaded

    _load_file._isda_safe = True
    DetectionCheckpointer._load_file = _load_file
    DetectionCheckpointer._torch_load = _torch_load
