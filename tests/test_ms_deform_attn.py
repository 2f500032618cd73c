"""Tests of the multi-scale deformable attention op (isda.layers.ms_deform_attn) on the CPU:
the native kernel of isda._C against the pure-PyTorch reference, gradients, dispatch and input
validation. CUDA tests live in test_ms_deform_attn_cuda.py."""

from __future__ import annotations

import logging
from typing import Sequence, Tuple

import pytest
import torch
from torch.testing import assert_close

from isda.layers import MSDeformAttn, ms_deform_attn, ms_deform_attn_reference
from isda.layers import msda_dispatch as msda
from isda.layers import msda_native
from isda.layers.msda_module import sampling_locations

# Small multi-level maps that include the awkward cases: a 1x1 level and a 1xN level.
SHAPES_MIXED = ((6, 4), (3, 5), (1, 1), (1, 7))


def level_tensors(shapes: Sequence[Tuple[int, int]], device="cpu"):
    """(spatial_shapes (L, 2) int64, level_start_index (L,) int64, S)."""
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index, int(areas.sum())


def make_inputs(
    N=2,
    shapes=SHAPES_MIXED,
    M=2,
    D=8,
    Lq=5,
    P=3,
    dtype=torch.float64,
    device="cpu",
    seed=0,
    loc_low=-0.2,
    loc_high=1.2,
):
    """Random inputs of the op: (value, spatial_shapes, level_start_index, locations, weights).

    Locations are uniform in [loc_low, loc_high] so some fall outside the map (zero padding)."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index, S = level_tensors(shapes, device)
    L = len(shapes)
    value = torch.randn(N, S, M, D, generator=gen, dtype=torch.float64)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=gen, dtype=torch.float64)
    loc = loc * (loc_high - loc_low) + loc_low
    weights = torch.rand(N, Lq, M, L, P, generator=gen, dtype=torch.float64) + 0.1
    weights = weights / weights.sum((-1, -2), keepdim=True)
    floats = [t.to(device=device, dtype=dtype) for t in (value, loc, weights)]
    return floats[0], spatial_shapes, level_start_index, floats[1], floats[2]


def border_locations(shapes: Sequence[Tuple[int, int]], M=1, N=1, dtype=torch.float64):
    """Locations exactly on map borders, pixel edges and pixel centres, plus a few outside.

    Returns (N, Lq, M, L, P=1, 2) where every level gets the same list of pixel coordinates
    converted to its own normalised coordinates."""
    per_level = []
    for h, w in shapes:
        xs = [0.0, 1.0, 0.5 / w, 1.0 - 0.5 / w, 1.0 / w, -0.5 / w, 1.0 + 0.5 / w, -0.25, 1.5]
        ys = [0.0, 1.0, 0.5 / h, 1.0 - 0.5 / h, 1.0 / h, -0.5 / h, 1.0 + 0.5 / h, -0.25, 1.5]
        grid = [(x, y) for x in xs for y in ys]
        per_level.append(torch.tensor(grid, dtype=dtype))  # (Lq, 2)
    loc = torch.stack(per_level, 1)  # (Lq, L, 2)
    Lq, L = loc.shape[:2]
    return loc.view(1, Lq, 1, L, 1, 2).expand(N, Lq, M, L, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
needs_ext = pytest.mark.skipif(
    "cpu" not in msda.available_impls("cpu"), reason="isda._C was not built"
)

F64_TOL = dict(rtol=1e-10, atol=1e-12)
F32_TOL = dict(rtol=1e-5, atol=1e-5)
CHANNELS = (1, 30, 32, 64, 71, 256)  # hit the D = 32 specialisation and the generic loops


def run_both(args, **kw):
    """(reference output, cpu-kernel output) of the same inputs."""
    return (
        ms_deform_attn(*args, impl="reference", **kw),
        ms_deform_attn(*args, impl="cpu", **kw),
    )


def grads_of(args, impl, grad_out):
    """Gradients wrt (value, sampling_locations, attention_weights) via `impl`."""
    value, shapes, starts, loc, weights = (
        t.detach().clone().requires_grad_(t.is_floating_point()) for t in args
    )
    out = ms_deform_attn(value, shapes, starts, loc, weights, impl=impl)
    out.backward(grad_out)
    return value.grad, loc.grad, weights.grad


def assert_cpu_matches_reference(args, tol):
    """The CPU kernel's output and its three input gradients equal the reference's."""
    ref, cpu = run_both(args)
    assert_close(cpu, ref, **tol)
    grad_out = torch.randn_like(ref)
    for got, want in zip(grads_of(args, "cpu", grad_out), grads_of(args, "reference", grad_out)):
        assert_close(got, want, **tol)


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv(msda.ENV_VAR, raising=False)


# --------------------------------------------------------------------------------------------
# Forward equality with the reference
# --------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64_TOL), (torch.float32, F32_TOL)])
def test_forward_matches_reference(N, dtype, tol):
    args = make_inputs(N=N, dtype=dtype)
    ref, cpu = run_both(args)
    assert cpu.shape == (N, 5, 2 * 8) and cpu.dtype == dtype
    assert_close(cpu, ref, **tol)


@needs_ext
@pytest.mark.parametrize("shapes", [((1, 1),), ((1, 9),), ((9, 1),), ((1, 1), (1, 6), (4, 4))])
def test_single_pixel_and_single_row_levels(shapes):
    args = make_inputs(shapes=shapes, loc_low=-0.6, loc_high=1.6)
    ref, cpu = run_both(args)
    assert_close(cpu, ref, **F64_TOL)


@needs_ext
def test_locations_on_borders_centres_and_outside():
    # Power-of-two sizes make every border coordinate exact in binary, so the reference (which
    # goes through 2x-1 and back) lands on exactly the same pixel coordinates as the kernel.
    shapes = ((4, 8), (2, 2), (1, 1), (1, 4))
    value, spatial_shapes, starts, _, _ = make_inputs(N=2, shapes=shapes, M=2, D=5)
    loc = border_locations(shapes, M=2, N=2)
    weights = torch.rand(loc.shape[:-1], dtype=torch.float64)
    assert_cpu_matches_reference((value, spatial_shapes, starts, loc, weights), F64_TOL)


@needs_ext
def test_far_outside_and_nan_locations_contribute_nothing():
    value, shapes, starts, loc, weights = make_inputs(N=1, Lq=4)
    loc = torch.full_like(loc, 1e30)
    loc[:, 1] = -1e30
    loc[:, 2] = float("nan")
    loc[:, 3] = float("inf")
    out = ms_deform_attn(value, shapes, starts, loc, weights, impl="cpu")
    assert_close(out, torch.zeros_like(out))


@needs_ext
def test_non_contiguous_inputs():
    value, shapes, starts, loc, weights = make_inputs(N=2, M=3, D=6)
    # Same values, different strides: transposed storage and strided slices.
    value_nc = value.transpose(1, 2).contiguous().transpose(1, 2)
    loc_nc = torch.stack([loc, loc], dim=-1)[..., 0]
    weights_nc = weights.transpose(0, 1).contiguous().transpose(0, 1)
    starts_nc = torch.stack([starts, starts], 1)[:, 0]
    assert not (value_nc.is_contiguous() or loc_nc.is_contiguous() or weights_nc.is_contiguous())
    assert not starts_nc.is_contiguous()
    args_nc = (value_nc, shapes, starts_nc, loc_nc, weights_nc)
    ref, cpu = run_both(args_nc)
    assert_close(cpu, ms_deform_attn_reference(value, shapes, starts, loc, weights), **F64_TOL)
    assert_close(cpu, ref, **F64_TOL)
    grad_out = torch.randn_like(ref).transpose(0, 1).contiguous().transpose(0, 1)
    for got, want in zip(
        grads_of(args_nc, "cpu", grad_out), grads_of(args_nc, "reference", grad_out)
    ):
        assert_close(got, want, **F64_TOL)


@pytest.mark.parametrize("impl", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_empty_query_set(impl):
    value, shapes, starts, loc, weights = make_inputs(N=2, M=2, D=3, Lq=0)
    value.requires_grad_()
    out = ms_deform_attn(value, shapes, starts, loc, weights, impl=impl)
    assert out.shape == (2, 0, 6)
    out.sum().backward()
    assert_close(value.grad, torch.zeros_like(value))


@needs_ext
@pytest.mark.parametrize("D", CHANNELS)
def test_channels_forward_and_backward_match_reference(D):
    assert_cpu_matches_reference(make_inputs(N=2, M=2, D=D, Lq=4), F64_TOL)


@needs_ext
def test_result_does_not_depend_on_thread_count():
    args = make_inputs(N=2, M=4, D=32, Lq=64, dtype=torch.float32)
    grad_out = torch.randn(2, 64, 4 * 32)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append((ms_deform_attn(*args, impl="cpu"), *grads_of(args, "cpu", grad_out)))
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results):
        assert torch.equal(one, two)


# --------------------------------------------------------------------------------------------
# gradcheck (float64) of the CPU kernel
# --------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("D", CHANNELS)
def test_gradcheck_cpu_kernel(D):
    # Tiny sizes: gradcheck perturbs every input element. Locations stay away from the map's
    # outer border where the op is not differentiable.
    value, shapes, starts, loc, weights = make_inputs(
        N=1, shapes=((3, 2), (1, 1), (2, 3)), M=1, D=D, Lq=2, P=2, loc_low=-0.1, loc_high=1.1
    )
    inputs = (
        value.requires_grad_(),
        shapes,
        starts,
        loc.requires_grad_(),
        weights.requires_grad_(),
    )
    fn = lambda v, s, i, l, w: ms_deform_attn(v, s, i, l, w, impl="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Dispatch: automatic choice, forcing through `impl` / ISDA_MSDA_IMPL, unavailable paths
# --------------------------------------------------------------------------------------------
def _backend_of(impl=None):
    """Which implementation produced the output (the native one has its own grad_fn)."""
    value, shapes, starts, loc, weights = make_inputs(N=1, Lq=2)
    out = ms_deform_attn(value.requires_grad_(), shapes, starts, loc, weights, impl=impl)
    return "native" if "MSDeformAttnFunction" in out.grad_fn.name() else "reference"


@needs_ext
def test_automatic_dispatch_picks_cpu_kernel_for_cpu_tensors():
    assert msda.resolve_impl(None, torch.device("cpu")) == "cpu"
    assert _backend_of(None) == "native"


@needs_ext
def test_env_var_forces_path(monkeypatch):
    monkeypatch.setenv(msda.ENV_VAR, "reference")
    assert msda.resolve_impl(None, torch.device("cpu")) == "reference"
    assert _backend_of(None) == "reference"
    assert _backend_of("cpu") == "native", "the impl argument wins over the environment"
    monkeypatch.setenv(msda.ENV_VAR, "cpu")
    assert _backend_of(None) == "native"


def test_env_var_unknown_value_is_an_error(monkeypatch):
    monkeypatch.setenv(msda.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=msda.ENV_VAR):
        _backend_of(None)
    with pytest.raises(ValueError, match="argument `impl`"):
        _backend_of("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_forcing_cuda_without_a_cuda_path_raises(monkeypatch):
    with pytest.raises((RuntimeError, ValueError), match="CUDA|cuda"):
        _backend_of("cuda")
    monkeypatch.setenv(msda.ENV_VAR, "cuda")
    with pytest.raises((RuntimeError, ValueError), match=msda.ENV_VAR):
        _backend_of(None)


@needs_ext
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only build")
def test_cpu_only_build_says_not_compiled_with_cuda():
    with pytest.raises(RuntimeError, match="not compiled with CUDA"):
        msda.resolve_impl("cuda", torch.device("cpu"))


def test_missing_extension_uses_reference_and_warns_once(monkeypatch, caplog):
    def no_extension(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(msda_native, "_extension", msda_native._UNSET)
    monkeypatch.setattr(msda_native.importlib, "import_module", no_extension)
    with caplog.at_level(logging.WARNING, logger=msda_native.logger.name):
        assert _backend_of(None) == "reference"
        assert _backend_of(None) == "reference"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "reference" in warnings[0].getMessage() and "setup_env.sh" in warnings[0].getMessage()
    with pytest.raises(RuntimeError, match="isda._C was not built"):
        _backend_of("cpu")


# --------------------------------------------------------------------------------------------
# Input validation: every error names the offending argument
# --------------------------------------------------------------------------------------------
def _bad_inputs():
    """(case id, mutate(args) -> args, argument named in the error)."""

    def swap(i, fn):
        return lambda a: tuple(fn(t) if j == i else t for j, t in enumerate(a))

    V, SS, LSI, LOC, W = range(5)
    return [
        ("value-rank", swap(V, lambda t: t.flatten(2)), "value"),
        ("value-int", swap(V, lambda t: t.long()), "value"),
        ("shapes-rank", swap(SS, lambda t: t.flatten()), "spatial_shapes"),
        ("shapes-cols", swap(SS, lambda t: t[:, :1]), "spatial_shapes"),
        ("shapes-int32", swap(SS, lambda t: t.int()), "spatial_shapes"),
        ("shapes-sum", swap(SS, lambda t: t + 1), "spatial_shapes"),
        ("start-len", swap(LSI, lambda t: t[:-1]), "level_start_index"),
        ("start-values", swap(LSI, lambda t: t + 1), "level_start_index"),
        ("start-float", swap(LSI, lambda t: t.double()), "level_start_index"),
        ("loc-rank", swap(LOC, lambda t: t[..., 0]), "sampling_locations"),
        ("loc-N", swap(LOC, lambda t: t[:1]), "sampling_locations"),
        ("loc-M", swap(LOC, lambda t: t[:, :, :1]), "sampling_locations"),
        ("loc-L", swap(LOC, lambda t: t[:, :, :, :1]), "sampling_locations"),
        ("loc-dtype", swap(LOC, lambda t: t.float()), "sampling_locations"),
        ("loc-device", swap(LOC, lambda t: t.to("meta")), "sampling_locations"),
        ("w-P", swap(W, lambda t: t[..., :1]), "attention_weights"),
        ("w-Lq", swap(W, lambda t: t[:, :1]), "attention_weights"),
        ("w-dtype", swap(W, lambda t: t.float()), "attention_weights"),
        ("w-device", swap(W, lambda t: t.to("meta")), "attention_weights"),
        ("shapes-device", swap(SS, lambda t: t.to("meta")), "spatial_shapes"),
    ]


@pytest.mark.parametrize(
    "mutate,argument", [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()]
)
@pytest.mark.parametrize("impl", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_invalid_inputs_name_the_argument(impl, mutate, argument):
    args = mutate(make_inputs(N=2, M=2, D=4, Lq=3))
    with pytest.raises(ValueError, match=f"`{argument}`"):
        ms_deform_attn(*args, impl=impl)


@needs_ext
def test_operator_called_directly_rejects_what_would_read_out_of_bounds():
    value, shapes, starts, loc, weights = make_inputs()
    op = torch.ops.isda.ms_deform_attn
    with pytest.raises(RuntimeError, match="spatial_shapes must be .* int64"):
        op(value, shapes.int(), starts, loc, weights)
    with pytest.raises(RuntimeError, match="attention_weights"):
        op(value, shapes, starts, loc, weights[..., :1])
    with pytest.raises(RuntimeError, match="does not fit in value's S="):
        op(value, shapes * 2, starts, loc, weights)
    with pytest.raises(RuntimeError, match="does not fit in value's S="):
        op(value, shapes, starts - 1, loc, weights)


# --------------------------------------------------------------------------------------------
# Autocast and the nn.Module
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_cpu_autocast_computes_in_fp32(impl):
    value, shapes, starts, loc, weights = make_inputs(dtype=torch.float32)
    expected = ms_deform_attn_reference(value.bfloat16().float(), shapes, starts, loc, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(value.bfloat16(), shapes, starts, loc, weights, impl=impl)
    assert out.dtype == torch.float32
    assert_close(out, expected, **F32_TOL)


def _module_io(dtype):
    torch.manual_seed(0)
    shapes, starts, S = level_tensors(((8, 6), (4, 3), (2, 2), (1, 1)))
    module = MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=2).to(dtype)
    with torch.no_grad():  # non-trivial offsets and weights (the init zeroes their weights)
        module.sampling_offsets.weight.normal_(0, 0.5)
        module.attention_weights.weight.normal_(0, 0.5)
    N, Lq = 2, 7
    query = torch.randn(N, Lq, 32, dtype=dtype)
    reference_points = torch.rand(N, Lq, 4, 2, dtype=dtype)
    value = torch.randn(N, S, 32, dtype=dtype)
    mask = torch.zeros(N, S, dtype=torch.bool)
    mask[1, -5:] = True
    return module, (query, reference_points, value, shapes, starts, mask)


@needs_ext
@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64_TOL), (torch.float32, F32_TOL)])
def test_module_same_output_and_grads_on_reference_and_cpu(dtype, tol):
    module, inputs = _module_io(dtype)
    outputs, grads = [], []
    for impl in ("reference", "cpu"):
        module.impl = impl
        module.zero_grad()
        out = module(*inputs)
        out.square().sum().backward()
        outputs.append(out)
        grads.append([p.grad.clone() for p in module.parameters()])
    assert_close(outputs[1], outputs[0], **tol)
    for got, want in zip(grads[1], grads[0]):
        assert_close(got, want, **tol)


def test_sampling_locations_are_reference_plus_offset_over_level_size():
    """Locations = reference point + pixel offset / (W_l, H_l): the same floats as the plain
    broadcast formula, and gradients equal up to summation order."""
    shapes = torch.tensor([[6, 10], [3, 5], [2, 3]])
    N, Lq, M, L, P = 2, 9, 4, len(shapes), 3
    offsets = torch.randn(N, Lq, M, L, P, 2, requires_grad=True)
    ref = torch.rand(N, Lq, L, 2, requires_grad=True)
    got = sampling_locations(ref, offsets, shapes)
    per_level = torch.stack([shapes[:, 1], shapes[:, 0]], -1).float()[None, None, None, :, None]
    want = ref[:, :, None, :, None, :] + offsets / per_level
    assert torch.equal(got, want)
    upstream = torch.randn_like(want)
    for g, w in zip(
        torch.autograd.grad(got, (ref, offsets), upstream),
        torch.autograd.grad(want, (ref, offsets), upstream),
    ):
        assert_close(g, w, rtol=1e-5, atol=1e-5)
    # An offset of one level width in x moves x by exactly 1 and leaves y alone.
    step = torch.zeros(1, 1, 1, L, 1, 2)
    step[..., 0] = shapes[:, 1].float().view(1, 1, 1, L, 1)
    moved = sampling_locations(torch.zeros(1, 1, L, 2), step, shapes)
    assert torch.equal(moved[..., 0], torch.ones(1, 1, 1, L, 1))
    assert torch.equal(moved[..., 1], torch.zeros(1, 1, 1, L, 1))
