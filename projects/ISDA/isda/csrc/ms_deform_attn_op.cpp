// The registered operators of multi-scale deformable attention:
//
//   isda::ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
//                        attention_weights) -> output
//   isda::_ms_deform_attn_backward(grad_output, value, spatial_shapes, level_start_index,
//                                  sampling_locations, attention_weights)
//       -> (grad_value, grad_sampling_locations, grad_attention_weights)
//
// This file holds the schemas, the Autograd kernel (so torch.ops.isda.ms_deform_attn is
// differentiable by itself, in TorchScript too) and the Meta kernels (shapes without data, for
// fake tensors, torch.compile and torch.export). The CPU and CUDA kernels register themselves in
// cpu/ms_deform_attn_cpu.cpp and cuda/ms_deform_attn_cuda.cu.
#include <Python.h>  // first, as Python's C API asks

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

namespace isda {
namespace {

at::Tensor call_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                        const at::Tensor& attn_weight) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("isda::ms_deform_attn", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&)>();
  return op.call(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
}

Grads call_backward(const at::Tensor& grad_output, const at::Tensor& value,
                    const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                    const at::Tensor& sampling_loc, const at::Tensor& attn_weight) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("isda::_ms_deform_attn_backward", "")
                             .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&)>();
  return op.call(grad_output, value, spatial_shapes, level_start_index, sampling_loc,
                 attn_weight);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Autograd of the forward: saves the inputs and calls the backward operator.
class MSDeformAttnFunction : public torch::autograd::Function<MSDeformAttnFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& value,
                            const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                            const at::Tensor& sampling_loc, const at::Tensor& attn_weight) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({value, spatial_shapes, level_start_index, sampling_loc, attn_weight});
    return call_forward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    auto [grad_value, grad_loc, grad_attn] =
        call_backward(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4]);
    return {grad_value, at::Tensor(), at::Tensor(), grad_loc, grad_attn};
  }
};

// Autograd of the backward operator: first-order gradients only (the kernels compute no second
// derivatives), so differentiating through it is an error rather than a silent zero.
class MSDeformAttnBackwardFunction
    : public torch::autograd::Function<MSDeformAttnBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const at::Tensor& grad_output,
                               const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index,
                               const at::Tensor& sampling_loc, const at::Tensor& attn_weight) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_value, grad_loc, grad_attn] = call_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
    return {grad_value, grad_loc, grad_attn};
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grad_outputs*/) {
    TORCH_CHECK(false, "ms_deform_attn: double backward is not supported");
  }
};

at::Tensor forward_autograd(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                            const at::Tensor& attn_weight) {
  return MSDeformAttnFunction::apply(value, spatial_shapes, level_start_index, sampling_loc,
                                     attn_weight);
}

Grads backward_autograd(const at::Tensor& grad_output, const at::Tensor& value,
                        const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                        const at::Tensor& sampling_loc, const at::Tensor& attn_weight) {
  auto grads = MSDeformAttnBackwardFunction::apply(grad_output, value, spatial_shapes,
                                                   level_start_index, sampling_loc, attn_weight);
  return {grads[0], grads[1], grads[2]};
}

// Meta kernels: output shapes and dtypes only. Sizes stay symbolic (SymInt) so that dynamic
// shapes under torch.compile / torch.export do not specialise on N, Lq, M or D.
void check_ranks(const at::Tensor& value, const at::Tensor& sampling_loc) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got rank ",
              value.dim());
  TORCH_CHECK(sampling_loc.dim() == 6,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got rank ",
              sampling_loc.dim());
}

at::Tensor forward_meta(const at::Tensor& value, const at::Tensor& /*spatial_shapes*/,
                        const at::Tensor& /*level_start_index*/, const at::Tensor& sampling_loc,
                        const at::Tensor& /*attn_weight*/) {
  check_ranks(value, sampling_loc);
  return at::empty_symint(
      {value.sym_size(0), sampling_loc.sym_size(1), value.sym_size(2) * value.sym_size(3)},
      value.options());
}

Grads backward_meta(const at::Tensor& /*grad_output*/, const at::Tensor& value,
                    const at::Tensor& /*spatial_shapes*/, const at::Tensor& /*level_start_index*/,
                    const at::Tensor& sampling_loc, const at::Tensor& attn_weight) {
  check_ranks(value, sampling_loc);
  // Contiguous, like the kernels' outputs.
  return {at::empty_symint(value.sym_sizes(), value.options()),
          at::empty_symint(sampling_loc.sym_sizes(), sampling_loc.options()),
          at::empty_symint(attn_weight.sym_sizes(), attn_weight.options())};
}

}  // namespace

TORCH_LIBRARY(isda, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "_ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(isda, Autograd, m) {
  m.impl("ms_deform_attn", &forward_autograd);
  m.impl("_ms_deform_attn_backward", &backward_autograd);
}

TORCH_LIBRARY_IMPL(isda, Meta, m) {
  m.impl("ms_deform_attn", &forward_meta);
  m.impl("_ms_deform_attn_backward", &backward_meta);
}

}  // namespace isda

// `import isda._C` loads this library, which registers the operators above; the module itself
// is empty. A process without the isda package loads the same file with
// torch.ops.load_library(isda.layers.op_library_path()).
static PyModuleDef isda_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                    "ISDA native operators (torch.ops.isda)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&isda_c_module); }
