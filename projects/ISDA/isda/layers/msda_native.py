"""The native operators ``torch.ops.isda.*`` of the compiled library ``isda._C``: loading it on first
use, what it was built with, and the path of the library file for processes without ``isda``."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from types import ModuleType
from typing import Optional

import torch

EXTENSION = "isda._C"
OPERATOR = "isda::ms_deform_attn"
BUILD_HINT = (
    "build it with `bash scripts/setup_env.sh` (or `pip install -e . --no-build-isolation`)"
)

logger = logging.getLogger(__name__)

_UNSET = object()
_extension = _UNSET  # the imported isda._C, None when it is missing, _UNSET before the first try


def load_extension() -> Optional[ModuleType]:
    """Imports ``isda._C`` (which registers ``torch.ops.isda.*``) on first use; returns None, after
    one warning, when it was not built."""
    global _extension
    if _extension is _UNSET:
        try:
            _extension = importlib.import_module(EXTENSION)
        except ImportError as err:
            _extension = None
            logger.warning(
                "%s is not available (%s): ms_deform_attn uses the pure-PyTorch reference path "
                "(slower, more memory). To get the native kernels, %s.",
                EXTENSION,
                err,
                BUILD_HINT,
            )
    return _extension


def has_kernel(device_type: str) -> bool:
    """Whether the library is built and registers a kernel of the op for ``device_type``
    ("cpu" / "cuda")."""
    if load_extension() is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(OPERATOR, key)


def op_library_path() -> str:
    """Path of the compiled operator library. A process that imports only torch gets
    ``torch.ops.isda.*`` (e.g. to run a saved TorchScript model) with
    ``torch.ops.load_library(path)``."""
    spec = importlib.util.find_spec(EXTENSION)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{EXTENSION} was not built; {BUILD_HINT}")
    return spec.origin


def cpu_kernel_build() -> dict:
    """How the CPU kernels were built and which build this CPU runs, e.g.
    ``{"isa": "avx2_fma", "parallel": "threads"}``. ``parallel`` is ``"serial"`` when the library
    was compiled without OpenMP, so that its kernels ignore ``torch.set_num_threads``."""
    if load_extension() is None:
        raise RuntimeError(f"{EXTENSION} was not built; {BUILD_HINT}")
    return dict(item.split("=", 1) for item in torch.ops.isda._cpu_kernel_build().split())
