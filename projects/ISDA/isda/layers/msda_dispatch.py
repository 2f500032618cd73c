"""Multi-scale deformable attention: the functional op and its implementations.

Tensor contract (shared by every implementation)::

    value               (N, S, M, D)           float; S = sum_l H_l * W_l
    spatial_shapes      (L, 2)   int64          (H_l, W_l) of each level
    level_start_index   (L,)     int64          offset of level l in S
    sampling_locations  (N, Lq, M, L, P, 2)    normalised (x, y); [0, 1] covers the map
    attention_weights   (N, Lq, M, L, P)       float
    -> output           (N, Lq, M * D)

Each sample is bilinear with zero padding outside the map and ``align_corners=False`` semantics
(identical to ``torch.nn.functional.grid_sample``): location (x, y) reads pixel coordinate
(x * W_l - 0.5, y * H_l - 0.5). All tensors live on one device; the float tensors share one dtype.

Implementations (``impl``):

* ``"reference"``: pure PyTorch (``grid_sample``), any device and float dtype; the ground truth.
* ``"cpu"``: the native operator ``torch.ops.isda.ms_deform_attn`` (library ``isda._C``) on CPU
  tensors (float32 / float64).
* ``"cuda"``: the same operator on CUDA tensors (float32 / float64 / float16 /
  bfloat16, accumulating in fp32), present only when ``isda._C`` was compiled with CUDA.

The native operator has its own autograd, fake (Meta) kernel and TorchScript schema, so it can be
traced, compiled and saved; :func:`~isda.layers.msda_native.op_library_path` gives the library a
process without ``isda`` loads with ``torch.ops.load_library``.

``impl=None`` (and ``ISDA_MSDA_IMPL`` unset) picks ``"cuda"`` for CUDA tensors and ``"cpu"`` for
CPU tensors when that kernel was compiled, else ``"reference"``. The ``impl`` argument, or else the
environment variable ``ISDA_MSDA_IMPL``, forces one path; forcing a path that is not available
raises an error (there is no silent fallback).

Autocast: under ``torch.autocast`` for the tensors' device, the ``"cuda"`` kernel runs natively in
the autocast dtype (value in half / bfloat16, sampling locations and attention weights in fp32,
fp32 accumulation) and returns the autocast dtype. Every other path casts the float inputs to
float32, computes with autocast disabled, and returns **float32**.

dtypes: the float tensors share value's dtype, except that the ``"cuda"`` kernel also accepts fp32
sampling locations and attention weights with a half / bfloat16 value (their gradients are fp32).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from . import msda_native
from .msda_checks import check_inputs
from .msda_reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "IMPLS", "ENV_VAR", "available_impls", "resolve_impl"]

IMPLS = ("reference", "cpu", "cuda")
ENV_VAR = "ISDA_MSDA_IMPL"


def available_impls(device: torch.device | str) -> Tuple[str, ...]:
    """The implementations that can run on ``device`` in this build, preferred first."""
    device_type = torch.device(device).type
    native = (device_type,) if device_type in IMPLS and msda_native.has_kernel(device_type) else ()
    return native + ("reference",)


# torch.compile runs this once while tracing and keeps its answer as a constant of the graph (it
# reads the environment and the library, which the compiler cannot trace).
@torch.compiler.assume_constant_result
def resolve_impl(impl: Optional[str], device: torch.device) -> str:
    """The implementation to run for tensors on ``device``: ``impl``, else ``$ISDA_MSDA_IMPL``, else
    automatic. Raises when the choice is unknown or unavailable (never falls back silently)."""
    source = "argument `impl`"
    choice = impl
    if choice is None:
        choice = os.environ.get(ENV_VAR, "").strip() or None
        source = f"environment variable {ENV_VAR}"
    if choice is None:
        return available_impls(device)[0]
    if choice not in IMPLS:
        raise ValueError(f"ms_deform_attn: {source}={choice!r} is not one of {IMPLS}")
    if choice == "reference":
        return choice
    if msda_native.load_extension() is None:
        raise RuntimeError(
            f"ms_deform_attn: impl={choice!r} (from {source}) needs {msda_native.EXTENSION}, but "
            f"{msda_native.EXTENSION} was not built; {msda_native.BUILD_HINT}, or use "
            "impl='reference'"
        )
    if not msda_native.has_kernel(choice):
        raise RuntimeError(
            f"ms_deform_attn: impl={choice!r} (from {source}) but {msda_native.EXTENSION} was not "
            f"compiled with {choice.upper()} support; rebuild with a CUDA toolkit matching "
            "torch.version.cuda (or FORCE_CUDA=1), or use impl='reference'"
        )
    if device.type != choice:
        raise ValueError(
            f"ms_deform_attn: impl={choice!r} (from {source}) runs on {choice.upper()} tensors, "
            f"but `value` is on {device}"
        )
    return choice


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type``, or None when autocast is off there."""
    if device_type not in ("cpu", "cuda"):
        return None
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def _autocast_inputs(choice, amp_dtype, value, sampling_locations, attention_weights):
    """The float inputs cast for autocast: on the CUDA kernel, value in the autocast dtype (native
    half / bf16) with fp32 locations and weights (bf16 would round a location by up to ~0.3 pixel
    on a 152-pixel-wide level); on every other path, everything in fp32."""
    value_dtype = amp_dtype if choice == "cuda" else torch.float32
    return (
        value.to(value_dtype),
        sampling_locations.to(torch.float32),
        attention_weights.to(torch.float32),
    )


def _run(choice, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    check_inputs(*args, impl=choice)
    if choice == "reference":
        return ms_deform_attn_reference(*args)
    return torch.ops.isda.ms_deform_attn(*args)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    impl: Optional[str] = None,
) -> torch.Tensor:
    """Multi-scale deformable attention (Zhu et al., Deformable DETR, Eq. 3).

    Args:
        value: (N, S, M, D) float.
        spatial_shapes: (L, 2) int64 (H, W) per level.
        level_start_index: (L,) int64 offset of each level in S.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y), value's dtype.
        attention_weights: (N, Lq, M, L, P), value's dtype.
        impl: None (automatic / $ISDA_MSDA_IMPL), "reference", "cpu" or "cuda".
    Returns:
        (N, Lq, M * D); float32 under autocast except on the CUDA kernel (see module docstring).
    """
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"ms_deform_attn: `value` must be a torch.Tensor, got {type(value)}")
    choice = resolve_impl(impl, value.device)
    amp_dtype = _autocast_dtype(value.device.type)
    if amp_dtype is None:
        return _run(
            choice, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    value, sampling_locations, attention_weights = _autocast_inputs(
        choice, amp_dtype, value, sampling_locations, attention_weights
    )
    with torch.autocast(device_type=value.device.type, enabled=False):
        return _run(
            choice, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
