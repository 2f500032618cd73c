"""The deformable-attention op as a registered PyTorch operator, ``torch.ops.isda.ms_deform_attn``:
PyTorch's operator checks, fake (Meta) shapes, TorchScript tracing into a file that a process with
only torch runs, and torch.compile of the model's transformer. CPU; the CUDA variants are in
test_ms_deform_attn_cuda.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch.testing import assert_close

from isda.layers import MSDeformAttn, ms_deform_attn, op_library_path
from isda.layers import msda_dispatch as msda
from isda.layers import msda_native
from isda.modeling.deformable_transformer import DeformableTransformer
from test_ms_deform_attn import F32_TOL, F64_TOL, level_tensors, make_inputs

pytestmark = pytest.mark.skipif(
    "cpu" not in msda.available_impls("cpu"), reason="isda._C was not built"
)


def operator_check():
    """PyTorch's operator checker: torch.library.opcheck (torch >= 2.4), else its internal
    equivalent, which needs the `expecttest` package."""
    if hasattr(torch.library, "opcheck"):
        return torch.library.opcheck
    optests = pytest.importorskip(
        "torch.testing._internal.optests", reason="torch < 2.4 needs `pip install expecttest`"
    )
    # That import freezes the torch.backends flags for the whole process (torch's internal
    # common_utils calls torch.backends.disable_global_flags()), after which Detectron2's
    # default_setup fails in every later test of the session: thaw them again.
    vars(torch.backends)["__allow_nonbracketed_mutation_flag"] = True
    return optests.opcheck


def with_grad(args):
    return tuple(t.requires_grad_() if t.is_floating_point() else t for t in args)


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv(msda.ENV_VAR, raising=False)


# --------------------------------------------------------------------------------------------
# Operator registration
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_operator_passes_pytorch_operator_checks(dtype, requires_grad):
    # Schema, autograd registration, fake tensors, and AOT dispatch with static and dynamic shapes.
    args = make_inputs(N=2, M=2, D=5, Lq=3, P=2, dtype=dtype)
    if requires_grad:
        args = with_grad(args)
    operator_check()(torch.ops.isda.ms_deform_attn.default, args)


def test_backward_operator_passes_pytorch_operator_checks():
    value, shapes, starts, loc, weights = make_inputs(N=2, M=2, D=5, Lq=3, P=2)
    grad_out = torch.randn(2, 3, 2 * 5, dtype=torch.float64)
    operator_check()(
        torch.ops.isda._ms_deform_attn_backward.default,
        (grad_out, value, shapes, starts, loc, weights),
        test_utils=["test_schema", "test_faketensor"],
    )


def test_operator_is_differentiable_by_itself():
    inputs = with_grad(make_inputs(N=1, shapes=((3, 2), (1, 1), (2, 3)), M=1, D=3, Lq=2, P=2))
    assert torch.autograd.gradcheck(torch.ops.isda.ms_deform_attn, inputs, eps=1e-6, atol=1e-6)


def test_double_backward_is_an_error():
    value, shapes, starts, loc, weights = with_grad(make_inputs(N=1, M=1, D=3, Lq=2, P=2))
    out = torch.ops.isda.ms_deform_attn(value, shapes, starts, loc, weights)
    (grad_value,) = torch.autograd.grad(out.square().sum(), value, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        grad_value.sum().backward()


def test_meta_tensors_propagate_shapes_without_data():
    args = make_inputs(N=3, M=4, D=6, Lq=7, P=2, dtype=torch.float32)
    meta = tuple(t.to("meta") for t in args)
    out = torch.ops.isda.ms_deform_attn(*meta)
    assert out.device.type == "meta" and out.shape == (3, 7, 4 * 6) and out.dtype == torch.float32
    grads = torch.ops.isda._ms_deform_attn_backward(torch.empty_like(out), *meta)
    assert [g.shape for g in grads] == [meta[0].shape, meta[3].shape, meta[4].shape]


# --------------------------------------------------------------------------------------------
# TorchScript: trace, save, and run in a process that imports only torch
# --------------------------------------------------------------------------------------------
RUN_SAVED_MODEL = textwrap.dedent("""
    import sys
    import torch

    library, model_file, inputs_file, output_file = sys.argv[1:]
    torch.ops.load_library(library)
    model = torch.jit.load(model_file)
    outputs = [model(*inputs) for inputs in torch.load(inputs_file)]
    assert not [name for name in sys.modules if name.split(".")[0] in ("isda", "detectron2")]
    torch.save(outputs, output_file)
    """)


def module_inputs(N, Lq, shapes=((8, 6), (4, 3), (2, 2)), dim=32, seed=0):
    """(query, reference_points, value, spatial_shapes, level_start_index, padding_mask)."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes, starts, S = level_tensors(shapes)
    mask = torch.zeros(N, S, dtype=torch.bool)
    mask[-1, -4:] = True
    return (
        torch.randn(N, Lq, dim, generator=gen),
        torch.rand(N, Lq, len(shapes), 2, generator=gen),
        torch.randn(N, S, dim, generator=gen),
        spatial_shapes,
        starts,
        mask,
    )


def attention_module(dim=32, levels=3):
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=dim, n_levels=levels, n_heads=4, n_points=2, impl="cpu")
    with torch.no_grad():  # non-trivial offsets and weights (the init zeroes their weights)
        module.sampling_offsets.weight.normal_(0, 0.5)
        module.attention_weights.weight.normal_(0, 0.5)
    return module.eval()


def test_traced_model_on_native_op_runs_in_a_process_with_only_torch(tmp_path):
    module = attention_module()
    example = module_inputs(N=2, Lq=5)
    with torch.no_grad():
        traced = torch.jit.trace(module, example)
    assert "isda::ms_deform_attn" in str(traced.inlined_graph)
    model_file, inputs_file, output_file = (tmp_path / f for f in ("m.pt", "in.pt", "out.pt"))
    traced.save(str(model_file))
    # Another batch size, query count and level sizes than the traced example.
    cases = [example, module_inputs(N=1, Lq=9, shapes=((5, 7), (3, 4), (1, 1)), seed=1)]
    torch.save(cases, inputs_file)
    script = tmp_path / "run_saved_model.py"
    script.write_text(RUN_SAVED_MODEL)
    cmd = [sys.executable, str(script), op_library_path(), *map(str, (model_file, inputs_file))]
    subprocess.run([*cmd, str(output_file)], check=True, timeout=120)
    loaded_outputs = torch.load(output_file)
    with torch.no_grad():
        for inputs, got in zip(cases, loaded_outputs):
            assert_close(got, module(*inputs), **F32_TOL)


def test_op_library_path_is_the_built_library():
    path = op_library_path()
    torch.ops.load_library(path)  # loading it again is a no-op, not a second registration
    assert "isda" in path and torch.ops.isda.ms_deform_attn.default is not None


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


def test_cpu_kernels_use_torch_threads_when_torch_has_them():
    # Without OpenMP at compile time, at::parallel_for runs the kernels on one thread whatever
    # torch.set_num_threads says; the results would still be right, only slower.
    if "OpenMP" not in torch.__config__.parallel_info() or not sys.platform.startswith("linux"):
        pytest.skip("the library is built with OpenMP on Linux against an OpenMP torch only")
    assert msda_native.cpu_kernel_build()["parallel"] == "threads"


def test_cpu_kernels_run_their_avx2_build_on_an_avx2_cpu():
    if not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("this CPU has no AVX2+FMA")
    assert msda_native.cpu_kernel_build()["isa"] == "avx2_fma"


@pytest.mark.parametrize("D", [8, 32])  # the generic and the compile-time D = 32 kernels
def test_cpu_kernels_give_the_same_result_on_one_and_on_two_threads(D):
    inputs = make_inputs(N=2, M=3, D=D, Lq=40, dtype=torch.float32, seed=3)
    expected = ms_deform_attn(*inputs, impl="reference")
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            args = with_grad(tuple(t.clone() for t in inputs))
            out = ms_deform_attn(*args, impl="cpu")
            grads = torch.autograd.grad(out.square().sum(), [args[0], args[3], args[4]])
            results.append((out, *grads))
    finally:
        torch.set_num_threads(before)
    assert_close(results[0][0], expected, **F32_TOL)
    for one_thread, two_threads in zip(*results):
        # Each output row and each gradient has one writer, whatever the thread count.
        assert torch.equal(one_thread, two_threads)


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------
def test_compiled_attention_module_has_no_graph_break_and_matches_eager():
    module = attention_module().train()
    inputs = module_inputs(N=2, Lq=5)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    want = module(*inputs)
    got = compiled(*inputs)
    assert_close(got, want, **F32_TOL)
    grads = [torch.autograd.grad(out.square().sum(), module.parameters()) for out in (got, want)]
    for g_compiled, g_eager in zip(*grads):
        assert_close(g_compiled, g_eager, **F32_TOL)


def tiny_transformer_inputs(dim=16, queries=6):
    torch.manual_seed(0)
    sizes = ((8, 10), (4, 5))
    feats = [torch.randn(1, dim, h, w) for h, w in sizes]
    masks = [torch.zeros(1, h, w, dtype=torch.bool) for h, w in sizes]
    pos = [torch.randn(1, dim, h, w) for h, w in sizes]
    return feats, masks, pos, torch.randn(queries, 2 * dim)


def test_compiled_transformer_in_eval_mode_matches_eager_without_op_graph_breaks():
    model = DeformableTransformer(
        dim=16, nheads=2, enc_layers=2, dec_layers=2, ffn_dim=32, n_levels=2, impl="cpu"
    ).eval()
    inputs = tiny_transformer_inputs()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(*inputs)
    # The transformer itself breaks the graph where it reads the level sizes (tolist); none of the
    # breaks may come from the op or its Python wrapper.
    assert explained.graph_count >= 1
    op_breaks = [
        reason
        for reason in explained.break_reasons
        if any("layers/msda_" in frame.filename for frame in reason.user_stack)
        or "ms_deform_attn" in reason.reason
    ]
    assert not op_breaks, op_breaks
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        want, got = model(*inputs), compiled(*inputs)
    for w, g in zip(want, got):
        assert_close(g, w, **F32_TOL)


def test_compiled_function_matches_eager_in_float64():
    args = make_inputs(N=2, M=2, D=8, Lq=4)
    compiled = torch.compile(
        lambda *a: ms_deform_attn(*a, impl="cpu"), backend="aot_eager", fullgraph=True
    )
    assert_close(compiled(*args), ms_deform_attn(*args, impl="reference"), **F64_TOL)
