"""CUDA tests of the multi-scale deformable attention op. Marked `cuda`: skipped unless a GPU is
present and isda._C was compiled with CUDA. Inputs and tolerances mirror the CPU tests."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from isda.layers import MSDeformAttn, ms_deform_attn, ms_deform_attn_reference
from isda.layers import msda_dispatch as msda
from test_ms_deform_attn import (
    CHANNELS,
    F32_TOL,
    F64_TOL,
    SHAPES_MIXED,
    border_locations,
    grads_of,
    level_tensors,
    make_inputs,
)

HAS_CUDA_KERNEL = torch.cuda.is_available() and "cuda" in msda.available_impls("cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA_KERNEL, reason="needs a GPU and isda._C built with CUDA"),
]

# Half / bf16 against the fp32 kernel on the same (rounded) inputs. The kernel accumulates in
# fp32, so the error is the final rounding of the output plus the rounding of the inputs:
# relative ~2^-11 (half) / 2^-8 (bf16) per term over <= L*P*4 terms of O(1) values.
LOW_PRECISION_TOL = {
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv(msda.ENV_VAR, raising=False)


def to_cuda(args):
    return tuple(t.cuda() for t in args)


@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64_TOL), (torch.float32, F32_TOL)])
def test_forward_matches_reference_and_cpu(N, dtype, tol):
    args = make_inputs(N=N, dtype=dtype)
    cuda_args = to_cuda(args)
    out = ms_deform_attn(*cuda_args, impl="cuda")
    assert_close(out, ms_deform_attn(*cuda_args, impl="reference"), **tol)
    assert_close(out.cpu(), ms_deform_attn(*args, impl="cpu"), **tol)


def test_automatic_dispatch_picks_cuda_kernel():
    assert msda.resolve_impl(None, torch.device("cuda")) == "cuda"


@pytest.mark.parametrize("D", CHANNELS)
def test_channels_forward_backward_match_cpu(D):
    args = make_inputs(N=2, M=2, D=D, Lq=4)
    cuda_args = to_cuda(args)
    assert_close(ms_deform_attn(*cuda_args, impl="cuda").cpu(), ms_deform_attn(*args, impl="cpu"))
    grad_out = torch.randn(2, 4, 2 * D, dtype=torch.float64)
    for got, want in zip(
        grads_of(cuda_args, "cuda", grad_out.cuda()), grads_of(args, "cpu", grad_out)
    ):
        assert_close(got.cpu(), want, **F64_TOL)


@pytest.mark.parametrize("D", CHANNELS)
def test_gradcheck_cuda_kernel(D):
    value, shapes, starts, loc, weights = to_cuda(
        make_inputs(N=1, shapes=((3, 2), (1, 1), (2, 3)), M=1, D=D, Lq=2, P=2)
    )
    inputs = (
        value.requires_grad_(),
        shapes,
        starts,
        loc.requires_grad_(),
        weights.requires_grad_(),
    )
    fn = lambda v, s, i, l, w: ms_deform_attn(v, s, i, l, w, impl="cuda")  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_borders_single_pixel_levels_and_non_contiguous():
    shapes = ((4, 8), (2, 2), (1, 1), (1, 4))
    value, spatial_shapes, starts, _, _ = make_inputs(N=2, shapes=shapes, M=2, D=5)
    loc = border_locations(shapes, M=2, N=2)
    weights = torch.rand(loc.shape[:-1], dtype=torch.float64)
    args = to_cuda((value, spatial_shapes, starts, loc, weights))
    args_nc = (args[0].transpose(1, 2).contiguous().transpose(1, 2), *args[1:])
    want = ms_deform_attn(*args, impl="reference")
    assert_close(ms_deform_attn(*args_nc, impl="cuda"), want, **F64_TOL)
    grad_out = torch.randn_like(want)
    for got, ref in zip(grads_of(args_nc, "cuda", grad_out), grads_of(args, "reference", grad_out)):
        assert_close(got, ref, **F64_TOL)


def test_empty_query_set():
    value, shapes, starts, loc, weights = to_cuda(make_inputs(N=2, M=2, D=3, Lq=0))
    value.requires_grad_()
    out = ms_deform_attn(value, shapes, starts, loc, weights, impl="cuda")
    assert out.shape == (2, 0, 6)
    out.sum().backward()
    assert_close(value.grad, torch.zeros_like(value))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_matches_fp32(dtype):
    args = make_inputs(N=2, shapes=SHAPES_MIXED, M=4, D=32, Lq=16, dtype=torch.float32)
    low = tuple(t.to(dtype) if t.is_floating_point() else t for t in to_cuda(args))
    # fp32 on the same rounded inputs isolates the kernel's own error.
    rounded = tuple(t.float() if t.is_floating_point() else t for t in low)
    out = ms_deform_attn(*low, impl="cuda")
    assert out.dtype == dtype
    assert_close(out.float(), ms_deform_attn(*rounded, impl="cuda"), **LOW_PRECISION_TOL[dtype])
    grad_out = torch.randn(out.shape, device="cuda")
    got = grads_of(low, "cuda", grad_out.to(dtype))
    want = grads_of(rounded, "cuda", grad_out.to(dtype).float())
    for g, w in zip(got, want):
        assert g.dtype == dtype
        scale = w.abs().max().clamp_min(1.0)
        assert_close(g.float() / scale, w / scale, **LOW_PRECISION_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_value_with_fp32_locations(dtype):
    args = to_cuda(make_inputs(N=2, M=4, D=32, Lq=16, dtype=torch.float32))
    value = args[0].to(dtype)
    mixed = (value, *args[1:])
    out = ms_deform_attn(*mixed, impl="cuda")
    assert out.dtype == dtype
    want = ms_deform_attn(value.float(), *args[1:], impl="cuda")
    assert_close(out.float(), want, **LOW_PRECISION_TOL[dtype])
    grad_out = torch.randn(out.shape, device="cuda", dtype=dtype)
    g_value, g_loc, g_weights = grads_of(mixed, "cuda", grad_out)
    assert g_value.dtype == dtype and g_loc.dtype == torch.float32
    assert g_weights.dtype == torch.float32
    with pytest.raises(ValueError, match="`sampling_locations`"):
        ms_deform_attn(*mixed, impl="reference")  # only the CUDA kernel mixes dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_runs_native_low_precision(dtype):
    value, shapes, starts, loc, weights = to_cuda(make_inputs(dtype=torch.float32))
    with torch.autocast("cuda", dtype=dtype):
        out = ms_deform_attn(value, shapes, starts, loc, weights, impl="cuda")
        out_ref = ms_deform_attn(value, shapes, starts, loc, weights, impl="reference")
    assert out.dtype == dtype and out_ref.dtype == torch.float32
    assert_close(out.float(), out_ref, **LOW_PRECISION_TOL[dtype])


def test_module_same_output_on_reference_and_cuda():
    torch.manual_seed(0)
    shapes, starts, S = level_tensors(((8, 6), (4, 3), (2, 2), (1, 1)), device="cuda")
    module = MSDeformAttn(d_model=64, n_levels=4, n_heads=2, n_points=2).cuda().double()
    query = torch.randn(2, 7, 64, dtype=torch.float64, device="cuda")
    refs = torch.rand(2, 7, 4, 2, dtype=torch.float64, device="cuda")
    value = torch.randn(2, S, 64, dtype=torch.float64, device="cuda")
    outs = []
    for impl in ("reference", "cuda"):
        module.impl = impl
        outs.append(module(query, refs, value, shapes, starts))
    assert_close(outs[1], outs[0], **F64_TOL)


def test_mixed_devices_name_the_argument():
    value, shapes, starts, loc, weights = make_inputs()
    with pytest.raises(ValueError, match="`sampling_locations`"):
        ms_deform_attn(value.cuda(), shapes.cuda(), starts.cuda(), loc, weights.cuda(), impl="cuda")


def test_reference_ground_truth_is_device_independent():
    args = make_inputs()
    assert_close(ms_deform_attn_reference(*to_cuda(args)).cpu(), ms_deform_attn_reference(*args))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_operator_passes_pytorch_operator_checks(dtype):
    from test_ms_deform_attn_operator import operator_check, with_grad

    args = with_grad(to_cuda(make_inputs(N=2, M=2, D=5, Lq=3, P=2, dtype=dtype)))
    operator_check()(torch.ops.isda.ms_deform_attn.default, args)


def test_cuda_operator_with_fp32_locations_on_half_values_has_fake_shapes():
    from test_ms_deform_attn_operator import operator_check

    value, shapes, starts, loc, weights = to_cuda(make_inputs(N=2, M=2, D=8, Lq=3))
    args = (value.half(), shapes, starts, loc.float(), weights.float())
    operator_check()(
        torch.ops.isda.ms_deform_attn.default, args, test_utils=["test_schema", "test_faketensor"]
    )
