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
* ``"cpu"``: the native kernel of ``isda._C`` for CPU tensors (float32 / float64).
* ``"cuda"``: the native kernel of ``isda._C`` for CUDA tensors (float32 / float64 / float16 /
  bfloat16, accumulating in fp32), present only when ``isda._C`` was compiled with CUDA.

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

import importlib
import logging
import os
from types import ModuleType
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "IMPLS",
    "ENV_VAR",
    "available_impls",
    "resolve_impl",
]

IMPLS = ("reference", "cpu", "cuda")
LOW_PRECISION = (torch.float16, torch.bfloat16)
ENV_VAR = "ISDA_MSDA_IMPL"
EXTENSION = "isda._C"
BUILD_HINT = (
    "build it with `bash scripts/setup_env.sh` (or `pip install -e . --no-build-isolation`)"
)

logger = logging.getLogger(__name__)

_UNSET = object()
_extension = _UNSET  # the imported isda._C, None when it is missing, _UNSET before the first try


def _load_extension() -> Optional[ModuleType]:
    """Imports ``isda._C`` on first use; returns None (after one warning) when it was not built."""
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


def _has_cuda_kernel(ext: Optional[ModuleType]) -> bool:
    return ext is not None and bool(ext.compiled_with_cuda())


def available_impls(device: torch.device | str) -> Tuple[str, ...]:
    """The implementations that can run on ``device`` in this build, preferred first."""
    device_type = torch.device(device).type
    ext = _load_extension()
    impls = []
    if device_type == "cuda" and _has_cuda_kernel(ext):
        impls.append("cuda")
    if device_type == "cpu" and ext is not None:
        impls.append("cpu")
    impls.append("reference")
    return tuple(impls)


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Pure-PyTorch implementation through ``grid_sample`` (the ground truth for every kernel)."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample wants coordinates in [-1, 1].
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = value_per_level[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # (N*M, D, Lq, P)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (N*M, D, Lq)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()


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
    ext = _load_extension()
    if ext is None:
        raise RuntimeError(
            f"ms_deform_attn: impl={choice!r} (from {source}) needs {EXTENSION}, but {EXTENSION} "
            f"was not built; {BUILD_HINT}, or use impl='reference'"
        )
    if choice == "cuda" and not _has_cuda_kernel(ext):
        raise RuntimeError(
            f"ms_deform_attn: impl='cuda' (from {source}) but {EXTENSION} was not compiled with "
            "CUDA support; rebuild with a CUDA toolkit matching torch.version.cuda (or "
            "FORCE_CUDA=1), or use impl='reference'"
        )
    if device.type != choice:
        raise ValueError(
            f"ms_deform_attn: impl={choice!r} (from {source}) runs on {choice.upper()} tensors, "
            f"but `value` is on {device}"
        )
    return choice


def _fail(argument: str, message: str) -> None:
    raise ValueError(f"ms_deform_attn: `{argument}` {message}")


def _check_ranks(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    expected = (
        ("value", value, 4, "(N, S, M, D)"),
        ("spatial_shapes", spatial_shapes, 2, "(L, 2)"),
        ("level_start_index", level_start_index, 1, "(L,)"),
        ("sampling_locations", sampling_locations, 6, "(N, Lq, M, L, P, 2)"),
        ("attention_weights", attention_weights, 5, "(N, Lq, M, L, P)"),
    )
    for name, tensor, rank, layout in expected:
        if not isinstance(tensor, torch.Tensor):
            _fail(name, f"must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != rank:
            _fail(name, f"must have rank {rank} {layout}, got shape {tuple(tensor.shape)}")
    if spatial_shapes.shape[1] != 2:
        _fail("spatial_shapes", f"must be (L, 2) as (H, W), got {tuple(spatial_shapes.shape)}")
    if sampling_locations.shape[-1] != 2:
        _fail(
            "sampling_locations",
            f"last dim must be 2 (x, y), got {tuple(sampling_locations.shape)}",
        )


def _check_sizes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    N, _, M, _ = value.shape
    L = spatial_shapes.shape[0]
    loc_n, Lq, loc_m, loc_l, P, _ = sampling_locations.shape
    named = {"N": (loc_n, N), "M": (loc_m, M), "L": (loc_l, L)}
    for dim_name, (got, want) in named.items():
        if got != want:
            _fail(
                "sampling_locations",
                f"has {dim_name}={got} but expected {want} (shape {tuple(sampling_locations.shape)},"
                f" value {tuple(value.shape)}, spatial_shapes {tuple(spatial_shapes.shape)})",
            )
    if level_start_index.shape[0] != L:
        _fail("level_start_index", f"has {level_start_index.shape[0]} entries for L={L} levels")
    if tuple(attention_weights.shape) != (N, Lq, M, L, P):
        _fail(
            "attention_weights",
            f"must be (N, Lq, M, L, P) = {(N, Lq, M, L, P)}, got {tuple(attention_weights.shape)}",
        )


def _check_dtypes_devices(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, impl
):
    if not value.is_floating_point():
        _fail("value", f"must be a floating-point tensor, got {value.dtype}")
    for name, tensor in (
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
    ):
        if tensor.dtype != torch.int64:
            _fail(name, f"must be int64, got {tensor.dtype}")
    allowed = {value.dtype}
    if impl == "cuda" and value.dtype in LOW_PRECISION:
        allowed.add(torch.float32)  # the CUDA kernel reads fp32 locations with 16-bit values
    for name, tensor in (
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if tensor.dtype not in allowed:
            _fail(name, f"has dtype {tensor.dtype} but `value` has {value.dtype}; they must match")
    if attention_weights.dtype != sampling_locations.dtype:
        _fail("attention_weights", "must have the dtype of `sampling_locations`")
    for name, tensor in (
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if tensor.device != value.device:
            _fail(name, f"is on {tensor.device} but `value` is on {value.device}")


def _check_levels(value, spatial_shapes, level_start_index) -> None:
    """H*W of the levels must add up to S and level_start_index must be their running offsets.
    Reads the two small index tensors (one device-to-host copy for CUDA inputs)."""
    L = spatial_shapes.shape[0]
    numbers: List[int] = torch.cat([spatial_shapes.flatten(), level_start_index]).tolist()
    shapes, starts = numbers[: 2 * L], numbers[2 * L :]
    areas = [shapes[2 * i] * shapes[2 * i + 1] for i in range(L)]
    if any(size < 0 for size in shapes):
        _fail("spatial_shapes", f"has a negative size: {spatial_shapes.tolist()}")
    if sum(areas) != value.shape[1]:
        _fail(
            "spatial_shapes",
            f"covers sum(H*W)={sum(areas)} tokens but `value` has S={value.shape[1]}",
        )
    expected_starts = [sum(areas[:i]) for i in range(L)]
    if starts != expected_starts:
        _fail(
            "level_start_index",
            f"is {starts} but spatial_shapes {shapes[0::2]}x{shapes[1::2]} implies {expected_starts}",
        )


def check_inputs(
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    impl: str = "reference",
):
    """Validates the tensor contract for implementation ``impl``; raises ValueError naming the
    offending argument."""
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    _check_ranks(*args)
    _check_sizes(*args)
    _check_dtypes_devices(*args, impl)
    _check_levels(value, spatial_shapes, level_start_index)


class _MSDeformAttnFunction(torch.autograd.Function):
    """Autograd over the native kernels of ``isda._C`` (CPU or CUDA, chosen by the device)."""

    @staticmethod
    def forward(
        ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    ):
        ext = _load_extension()
        output = ext.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        ctx.save_for_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        ext = _load_extension()
        grad_value, grad_locations, grad_weights = ext.ms_deform_attn_backward(
            *ctx.saved_tensors, grad_output.contiguous()
        )
        return grad_value, None, None, grad_locations, grad_weights


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
    return _MSDeformAttnFunction.apply(*args)


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
        _fail("value", f"must be a torch.Tensor, got {type(value).__name__}")
    choice = resolve_impl(impl, value.device)
    amp_dtype = _autocast_dtype(value.device.type)
    if amp_dtype is not None:
        value, sampling_locations, attention_weights = _autocast_inputs(
            choice, amp_dtype, value, sampling_locations, attention_weights
        )
        with torch.autocast(device_type=value.device.type, enabled=False):
            return _run(
                choice,
                value,
                spatial_shapes,
                level_start_index,
                sampling_locations,
                attention_weights,
            )
    return _run(
        choice, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
