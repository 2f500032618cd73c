// Multi-scale deformable attention: what the CPU and CUDA kernels of the registered operators
// isda::ms_deform_attn and isda::_ms_deform_attn_backward share (schemas: ms_deform_attn_op.cpp).
//
// Tensor contract (validated in full at the Python boundary, isda/layers/msda_checks.py):
//   value               (N, S, M, D)          float / double (CUDA also half / bfloat16)
//   spatial_shapes      (L, 2)  int64         (H_l, W_l)
//   level_start_index   (L,)    int64
//   sampling_loc        (N, Lq, M, L, P, 2)   normalised (x, y), value's dtype
//   attn_weight         (N, Lq, M, L, P)      value's dtype (CUDA half / bf16: also float32)
//   -> output           (N, Lq, M * D)
// Bilinear sampling, zero padding, align_corners=False (identical to grid_sample).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <tuple>

#include "ms_deform_attn_taps.h"

namespace isda {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // value, locations, weights

// The checks the kernels need to stay inside their buffers: ranks, matching sizes, dtypes and
// one device. The values of spatial_shapes / level_start_index are guarded by level_fits().
inline void check_memory_safety(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                const at::Tensor& level_start_index,
                                const at::Tensor& sampling_loc, const at::Tensor& attn_weight) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2 &&
                  spatial_shapes.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes must be (L, 2) int64, got ", spatial_shapes.sizes(),
              " ", spatial_shapes.scalar_type());
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L &&
                  level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: level_start_index must be (L,) int64 with L=", L);
  TORCH_CHECK(sampling_loc.dim() == 6 && sampling_loc.size(0) == value.size(0) &&
                  sampling_loc.size(2) == value.size(2) && sampling_loc.size(3) == L &&
                  sampling_loc.size(5) == 2,
              "ms_deform_attn: sampling_locations ", sampling_loc.sizes(),
              " does not match value ", value.sizes(), " and L=", L);
  TORCH_CHECK(attn_weight.sizes() == sampling_loc.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights ", attn_weight.sizes(),
              " does not match sampling_locations ", sampling_loc.sizes());
  // CUDA half / bf16 values may come with fp32 locations and weights (kept precise under AMP).
  const bool low_precision_cuda = value.is_cuda() && (value.scalar_type() == at::kHalf ||
                                                      value.scalar_type() == at::kBFloat16);
  const auto loc_type = sampling_loc.scalar_type();
  TORCH_CHECK(attn_weight.scalar_type() == loc_type &&
                  (loc_type == value.scalar_type() || (low_precision_cuda && loc_type == at::kFloat)),
              "ms_deform_attn: sampling_locations and attention_weights must have value's dtype ",
              value.scalar_type(), ", got ", loc_type, " and ", attn_weight.scalar_type());
  const auto device = value.device();
  TORCH_CHECK(spatial_shapes.device() == device && level_start_index.device() == device &&
                  sampling_loc.device() == device && attn_weight.device() == device,
              "ms_deform_attn: all inputs must be on value's device ", device);
}

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value,
                              const at::Tensor& sampling_loc) {
  const int64_t N = value.size(0), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_loc.size(1);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == N && grad_output.size(1) == Lq &&
                  grad_output.size(2) == M * D,
              "ms_deform_attn backward: grad_output must be (N, Lq, M*D) = (", N, ", ", Lq, ", ",
              M * D, "), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type() &&
                  grad_output.device() == value.device(),
              "ms_deform_attn backward: grad_output must match value's dtype and device");
}

// Contiguous copies (views when already contiguous) of one call's inputs.
struct Inputs {
  at::Tensor value, shapes, starts, loc, attn;
};

// check_memory_safety(), then the inputs made contiguous; `device` is the kernel's device type.
inline Inputs checked_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                             const at::Tensor& attn_weight, c10::DeviceType device) {
  check_memory_safety(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  TORCH_CHECK(value.device().type() == device, "ms_deform_attn: the ", device,
              " kernel got tensors on ", value.device());
  return Inputs{value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
                sampling_loc.contiguous(), attn_weight.contiguous()};
}

inline Sizes get_sizes(const at::Tensor& value, const at::Tensor& sampling_loc) {
  return Sizes{value.size(0),        value.size(1),        value.size(2),       value.size(3),
               sampling_loc.size(1), sampling_loc.size(3), sampling_loc.size(4)};
}

}  // namespace isda
