// Multi-scale deformable attention: declarations of the CPU/CUDA kernels and the device dispatcher.
//
// Tensor contract (see isda/layers/ms_deform_attn_func.py):
//   value               (N, S, M, D)          float / double (CUDA also half / bfloat16)
//   spatial_shapes      (L, 2)  int64         (H_l, W_l)
//   level_start_index   (L,)    int64
//   sampling_loc        (N, Lq, M, L, P, 2)   normalised (x, y), same dtype as value
//   attn_weight         (N, Lq, M, L, P)      same dtype as value
//   -> output           (N, Lq, M * D)
// Bilinear sampling, zero padding, align_corners=False (identical to grid_sample).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace isda {

// ---- CPU kernels (csrc/cpu/ms_deform_attn_cpu.cpp) -------------------------------------------
at::Tensor ms_deform_attn_cpu_forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight);

// Returns {grad_value, grad_sampling_loc, grad_attn_weight}.
std::vector<at::Tensor> ms_deform_attn_cpu_backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight,
    const at::Tensor& grad_output);

#ifdef WITH_CUDA
// ---- CUDA kernels (csrc/cuda/ms_deform_attn_cuda.cu) -----------------------------------------
at::Tensor ms_deform_attn_cuda_forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight);

std::vector<at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight,
    const at::Tensor& grad_output);
#endif

// Shape / dtype / device checks shared by both backends. The Python wrapper validates more
// thoroughly (it can read spatial_shapes); these guard direct calls into isda._C.
inline void check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(
      spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
      "ms_deform_attn: spatial_shapes must be (L, 2), got ",
      spatial_shapes.sizes());
  TORCH_CHECK(
      spatial_shapes.scalar_type() == at::kLong,
      "ms_deform_attn: spatial_shapes must be int64, got ",
      spatial_shapes.scalar_type());
  TORCH_CHECK(
      level_start_index.dim() == 1 && level_start_index.scalar_type() == at::kLong,
      "ms_deform_attn: level_start_index must be a 1-D int64 tensor");
  TORCH_CHECK(
      sampling_loc.dim() == 6 && sampling_loc.size(5) == 2,
      "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got ",
      sampling_loc.sizes());
  TORCH_CHECK(
      attn_weight.dim() == 5,
      "ms_deform_attn: attention_weights must be (N, Lq, M, L, P), got ",
      attn_weight.sizes());
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK(
      level_start_index.size(0) == L,
      "ms_deform_attn: level_start_index has ",
      level_start_index.size(0),
      " entries but spatial_shapes has ",
      L,
      " levels");
  TORCH_CHECK(
      sampling_loc.size(0) == value.size(0) && sampling_loc.size(2) == value.size(2) &&
          sampling_loc.size(3) == L,
      "ms_deform_attn: sampling_locations ",
      sampling_loc.sizes(),
      " does not match value ",
      value.sizes(),
      " and L=",
      L);
  TORCH_CHECK(
      attn_weight.sizes() == sampling_loc.sizes().slice(0, 5),
      "ms_deform_attn: attention_weights ",
      attn_weight.sizes(),
      " does not match sampling_locations ",
      sampling_loc.sizes());
  // CUDA half / bf16 values may come with fp32 locations and weights (kept precise under AMP).
  const bool low_precision_cuda = value.is_cuda() && (value.scalar_type() == at::kHalf ||
                                                      value.scalar_type() == at::kBFloat16);
  const auto loc_type = sampling_loc.scalar_type();
  TORCH_CHECK(
      attn_weight.scalar_type() == loc_type &&
          (loc_type == value.scalar_type() || (low_precision_cuda && loc_type == at::kFloat)),
      "ms_deform_attn: sampling_locations and attention_weights must have value's dtype ",
      value.scalar_type(),
      low_precision_cuda ? " or float32" : "",
      ", got ",
      loc_type,
      " and ",
      attn_weight.scalar_type());
  const auto device = value.device();
  TORCH_CHECK(
      spatial_shapes.device() == device && level_start_index.device() == device &&
          sampling_loc.device() == device && attn_weight.device() == device,
      "ms_deform_attn: all inputs must be on value's device ",
      device);
}

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& sampling_loc,
                              const at::Tensor& value) {
  const int64_t N = value.size(0), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_loc.size(1);
  TORCH_CHECK(
      grad_output.dim() == 3 && grad_output.size(0) == N && grad_output.size(1) == Lq &&
          grad_output.size(2) == M * D,
      "ms_deform_attn backward: grad_output must be (N, Lq, M*D) = (",
      N, ", ", Lq, ", ", M * D, "), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type() &&
                  grad_output.device() == value.device(),
              "ms_deform_attn backward: grad_output must match value's dtype and device");
}

// ---- Dispatchers: pick the backend from the tensors' device ------------------------------------
constexpr const char* kNoCudaMessage =
    "isda._C was not compiled with CUDA support, but got CUDA tensors. Rebuild isda with a CUDA "
    "toolkit whose major version matches torch.version.cuda (or FORCE_CUDA=1), or call "
    "ms_deform_attn(..., impl='reference').";

inline at::Tensor ms_deform_attn_forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_cuda_forward(
        value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
#else
    TORCH_CHECK(false, kNoCudaMessage);
#endif
  }
  TORCH_CHECK(value.is_cpu(), "ms_deform_attn: unsupported device ", value.device());
  return ms_deform_attn_cpu_forward(
      value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
}

inline std::vector<at::Tensor> ms_deform_attn_backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight,
    const at::Tensor& grad_output) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  check_grad_output(grad_output, sampling_loc, value);
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_cuda_backward(
        value, spatial_shapes, level_start_index, sampling_loc, attn_weight, grad_output);
#else
    TORCH_CHECK(false, kNoCudaMessage);
#endif
  }
  TORCH_CHECK(value.is_cpu(), "ms_deform_attn: unsupported device ", value.device());
  return ms_deform_attn_cpu_backward(
      value, spatial_shapes, level_start_index, sampling_loc, attn_weight, grad_output);
}

}  // namespace isda
