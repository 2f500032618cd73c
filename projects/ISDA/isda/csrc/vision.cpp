// Python bindings of isda._C: the multi-scale deformable attention op.
#include <torch/extension.h>

#include "ms_deform_attn.h"

namespace isda {

// True when the CUDA kernels were compiled in (setup.py defines WITH_CUDA for CUDAExtension).
bool compiled_with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace isda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ISDA native ops: multi-scale deformable attention (CPU, and CUDA when compiled).";
  m.def(
      "ms_deform_attn_forward",
      &isda::ms_deform_attn_forward,
      "ms_deform_attn forward (value, spatial_shapes, level_start_index, sampling_loc, "
      "attn_weight) -> (N, Lq, M*D)");
  m.def(
      "ms_deform_attn_backward",
      &isda::ms_deform_attn_backward,
      "ms_deform_attn backward (..., grad_output) -> [grad_value, grad_sampling_loc, "
      "grad_attn_weight]");
  m.def("compiled_with_cuda", &isda::compiled_with_cuda, "Whether CUDA kernels were built");
}
