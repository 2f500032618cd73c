"""Validation of the tensor contract of :func:`isda.layers.ms_deform_attn`, done once at the Python
boundary. Every error is a ValueError naming the offending argument.

The checks read only tensor metadata, except the level check, which reads ``spatial_shapes`` and
``level_start_index`` and therefore runs only when they are CPU tensors (no device sync) and
outside tracing / compiling (where the values are not known). The native kernels never read
outside ``value`` whatever these two tensors hold: a level that does not fit is rejected (CPU) or
contributes nothing (CUDA)."""

from __future__ import annotations

from typing import List

import torch

from .recording import recording_graph

LOW_PRECISION = (torch.float16, torch.bfloat16)


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


def _values_readable(spatial_shapes: torch.Tensor) -> bool:
    """Whether the level check can read the index tensors for free: CPU tensors, in eager mode
    (a recorded graph would freeze or guard on their values)."""
    return spatial_shapes.device.type == "cpu" and not recording_graph()


def _check_levels(value, spatial_shapes, level_start_index) -> None:
    """H*W of the levels must add up to S and level_start_index must be their running offsets."""
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
) -> None:
    """Validates the tensor contract for implementation ``impl``; raises ValueError naming the
    offending argument."""
    if not isinstance(value, torch.Tensor):
        _fail("value", f"must be a torch.Tensor, got {type(value).__name__}")
    if torch.jit.is_tracing():
        # The example inputs were checked when they were made; a trace records only the operator,
        # whose kernels guard their own memory accesses.
        return
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    _check_ranks(*args)
    _check_sizes(*args)
    _check_dtypes_devices(*args, impl)
    if _values_readable(spatial_shapes):
        _check_levels(value, spatial_shapes, level_start_index)
