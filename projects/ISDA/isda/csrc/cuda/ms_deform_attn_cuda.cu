// CUDA kernels of multi-scale deformable attention (forward and backward).
//
// dtypes: float, double, half, bfloat16; every sum is accumulated in at::opmath_type (fp32 for
// the 16-bit types, double for double). With half / bf16 values, the sampling locations and
// attention weights may be fp32 (what autocast passes); their gradients then are fp32 too.
//
// Thread mapping: each (n, q, m) head-query is served by a segment of `lanes` consecutive threads
// (a power of two <= 32, so a segment never straddles a warp). Lane j handles channels
// d = j, j + lanes, j + 2 * lanes, ... so the lanes of a segment read consecutive addresses of
// a value row (coalesced), and each thread keeps several channels in registers.
//
// Backward: grad_value is scattered with atomics into an accumulator of the opmath type (fp32 for
// half / bf16, which also avoids 16-bit atomics); the per-sample gradients of the location and
// of the attention weight are reduced across the segment with warp shuffles and written once by
// lane 0, so they need no atomics. All indices are int64_t.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../ms_deform_attn.h"
#include "../ms_deform_attn_taps.h"

namespace isda {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;
// Channels a thread should own before the segment grows past one lane (instruction-level
// parallelism: independent loads in flight per sample).
constexpr int kTargetChannelsPerLane = 4;
// Largest channels-per-lane instantiations; D above 32 * kMaxChannelsPerLaneLarge is rejected.
constexpr int kMaxChannelsPerLaneSmall = 4;
constexpr int kMaxChannelsPerLaneMedium = 8;
constexpr int kMaxChannelsPerLaneLarge = 32;

// Sum of v over the `lanes` threads of this thread's segment (lanes is a power of two <= 32).
template <typename T>
__device__ __forceinline__ T segment_sum(T v, unsigned mask, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(mask, v, offset, lanes);
  }
  return v;
}

__device__ __forceinline__ unsigned segment_mask(int lanes) {
  if (lanes == kWarpSize) return 0xffffffffu;
  const int base = (threadIdx.x % kWarpSize) & ~(lanes - 1);
  return ((1u << lanes) - 1u) << base;
}

// loc_t: dtype of the locations and weights: scalar_t, or float for half / bf16 values (autocast
// keeps the locations in fp32: bf16 would round them by up to ~0.3 pixel on a 152-wide map).
template <typename scalar_t, typename loc_t, int kMaxCpl>
__global__ void __launch_bounds__(kThreadsPerBlock)
    ms_deform_attn_forward_kernel(const scalar_t* __restrict__ value,
                                  const int64_t* __restrict__ shapes,
                                  const int64_t* __restrict__ starts,
                                  const loc_t* __restrict__ loc,
                                  const loc_t* __restrict__ attn, scalar_t* __restrict__ out,
                                  Sizes s, int lanes, int cpl) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= s.N * s.Lq * s.M * lanes) return;
  const int lane = static_cast<int>(idx % lanes);
  const int64_t nqm = idx / lanes;  // flattened (n, q, m)
  const int64_t m = nqm % s.M;
  const int64_t n = nqm / (s.M * s.Lq);
  const int64_t row_stride = s.M * s.D;
  const int64_t LP = s.L * s.P;
  const scalar_t* value_head = value + n * s.S * row_stride + m * s.D;
  const loc_t* loc_nqm = loc + nqm * LP * 2;
  const loc_t* attn_nqm = attn + nqm * LP;

  acc_t acc[kMaxCpl];
#pragma unroll
  for (int k = 0; k < kMaxCpl; ++k) acc[k] = acc_t(0);

  for (int64_t l = 0; l < s.L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    if (!level_fits(starts[l], H, W, s.S)) continue;  // never read outside value
    const scalar_t* value_level = value_head + starts[l] * row_stride;
    for (int64_t p = 0; p < s.P; ++p) {
      const int64_t lp = l * s.P + p;
      Taps<acc_t> t;
      if (!compute_taps<acc_t>(static_cast<acc_t>(loc_nqm[2 * lp]),
                               static_cast<acc_t>(loc_nqm[2 * lp + 1]), H, W, row_stride, t)) {
        continue;
      }
      const acc_t a = static_cast<acc_t>(attn_nqm[lp]);
#pragma unroll
      for (int c = 0; c < kCorners; ++c) {
        if (!t.valid[c]) continue;
        const acc_t coeff = a * t.weight[c];
        const scalar_t* v = value_level + t.offset[c];
#pragma unroll
        for (int k = 0; k < kMaxCpl; ++k) {
          const int64_t d = lane + static_cast<int64_t>(k) * lanes;
          if (k < cpl && d < s.D) acc[k] += coeff * static_cast<acc_t>(v[d]);
        }
      }
    }
  }
  scalar_t* o = out + nqm * s.D;
#pragma unroll
  for (int k = 0; k < kMaxCpl; ++k) {
    const int64_t d = lane + static_cast<int64_t>(k) * lanes;
    if (k < cpl && d < s.D) o[d] = static_cast<scalar_t>(acc[k]);
  }
}

template <typename scalar_t, typename loc_t, int kMaxCpl>
__global__ void __launch_bounds__(kThreadsPerBlock)
    ms_deform_attn_backward_kernel(const scalar_t* __restrict__ value,
                                   const int64_t* __restrict__ shapes,
                                   const int64_t* __restrict__ starts,
                                   const loc_t* __restrict__ loc,
                                   const loc_t* __restrict__ attn,
                                   const scalar_t* __restrict__ grad_out,
                                   at::opmath_type<scalar_t>* __restrict__ grad_value,
                                   loc_t* __restrict__ grad_loc,
                                   loc_t* __restrict__ grad_attn, Sizes s, int lanes, int cpl) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Whole segments leave together (the thread count is a multiple of `lanes` and segments are
  // aligned), so the shuffles below always see every lane of their segment.
  if (idx >= s.N * s.Lq * s.M * lanes) return;
  const unsigned mask = segment_mask(lanes);
  const int lane = static_cast<int>(idx % lanes);
  const int64_t nqm = idx / lanes;
  const int64_t m = nqm % s.M;
  const int64_t n = nqm / (s.M * s.Lq);
  const int64_t row_stride = s.M * s.D;
  const int64_t LP = s.L * s.P;
  const int64_t head_offset = n * s.S * row_stride + m * s.D;
  const loc_t* loc_nqm = loc + nqm * LP * 2;
  const loc_t* attn_nqm = attn + nqm * LP;

  acc_t go[kMaxCpl];  // this lane's channels of grad_output
#pragma unroll
  for (int k = 0; k < kMaxCpl; ++k) {
    const int64_t d = lane + static_cast<int64_t>(k) * lanes;
    go[k] = (k < cpl && d < s.D) ? static_cast<acc_t>(grad_out[nqm * s.D + d]) : acc_t(0);
  }

  for (int64_t l = 0; l < s.L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    if (!level_fits(starts[l], H, W, s.S)) continue;  // never read or write outside value
    const int64_t level_offset = head_offset + starts[l] * row_stride;
    for (int64_t p = 0; p < s.P; ++p) {
      const int64_t lp = l * s.P + p;
      Taps<acc_t> t;
      // Uniform across the segment: all its lanes read the same location.
      if (!compute_taps<acc_t>(static_cast<acc_t>(loc_nqm[2 * lp]),
                               static_cast<acc_t>(loc_nqm[2 * lp + 1]), H, W, row_stride, t)) {
        continue;  // grad_loc / grad_attn were zero-initialised
      }
      const acc_t a = static_cast<acc_t>(attn_nqm[lp]);
      acc_t dot[kCorners];
#pragma unroll
      for (int c = 0; c < kCorners; ++c) {
        dot[c] = acc_t(0);
        if (!t.valid[c]) continue;
        const acc_t coeff = a * t.weight[c];
        const scalar_t* v = value + level_offset + t.offset[c];
        acc_t* gv = grad_value + level_offset + t.offset[c];
#pragma unroll
        for (int k = 0; k < kMaxCpl; ++k) {
          const int64_t d = lane + static_cast<int64_t>(k) * lanes;
          if (k < cpl && d < s.D) {
            dot[c] += go[k] * static_cast<acc_t>(v[d]);
            gpuAtomicAdd(gv + d, coeff * go[k]);
          }
        }
      }
      // The gradients are linear in the dot products, so each lane's partial ones add up.
      const SampleGrads<acc_t> partial = sample_grads(t, dot, a, H, W);
      const acc_t g_attn = segment_sum(partial.attn, mask, lanes);
      const acc_t g_x = segment_sum(partial.x, mask, lanes);
      const acc_t g_y = segment_sum(partial.y, mask, lanes);
      if (lane == 0) {
        grad_attn[nqm * LP + lp] = static_cast<loc_t>(g_attn);
        grad_loc[(nqm * LP + lp) * 2] = static_cast<loc_t>(g_x);
        grad_loc[(nqm * LP + lp) * 2 + 1] = static_cast<loc_t>(g_y);
      }
    }
  }
}

// Segment width and channels per lane for D channels.
struct LaunchShape {
  int lanes;
  int cpl;
  int64_t blocks;
};

int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

LaunchShape launch_shape(const Sizes& s) {
  const int64_t want_lanes = (s.D + kTargetChannelsPerLane - 1) / kTargetChannelsPerLane;
  const int lanes = std::min(kWarpSize, next_pow2(std::max<int64_t>(want_lanes, 1)));
  const int64_t cpl = (s.D + lanes - 1) / lanes;
  TORCH_CHECK(cpl <= kMaxChannelsPerLaneLarge, "ms_deform_attn (CUDA): channels per head D=", s.D,
              " exceeds the supported maximum ", kWarpSize * kMaxChannelsPerLaneLarge);
  const int64_t threads = s.N * s.Lq * s.M * lanes;
  const int64_t blocks = (threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "ms_deform_attn (CUDA): input too large for one launch (", threads, " threads)");
  return LaunchShape{lanes, static_cast<int>(cpl), blocks};
}

// Calls fn(std::integral_constant<int, kMaxCpl>) with the smallest instantiation that fits.
template <typename Fn>
void with_max_cpl(int cpl, const Fn& fn) {
  if (cpl <= kMaxChannelsPerLaneSmall) {
    fn(std::integral_constant<int, kMaxChannelsPerLaneSmall>{});
  } else if (cpl <= kMaxChannelsPerLaneMedium) {
    fn(std::integral_constant<int, kMaxChannelsPerLaneMedium>{});
  } else {
    fn(std::integral_constant<int, kMaxChannelsPerLaneLarge>{});
  }
}

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                        const at::Tensor& attn_weight) {
  const Inputs in = checked_inputs(value, spatial_shapes, level_start_index, sampling_loc,
                                   attn_weight, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(value.device());
  const Sizes s = get_sizes(value, sampling_loc);
  const auto &value_c = in.value, &shapes_c = in.shapes, &starts_c = in.starts;
  const auto &loc_c = in.loc, &attn_c = in.attn;
  // Every channel is written by exactly one lane (lanes * cpl >= D), so no zero-fill is needed.
  auto output = at::empty({s.N, s.Lq, s.M * s.D}, value.options());
  if (output.numel() == 0) {
    return output;  // nothing to launch (a zero-block launch is an error)
  }
  const LaunchShape ls = launch_shape(s);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool fp32_locations = loc_c.scalar_type() != value.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda_forward", [&] {
        // loc_tag's type is the dtype of the locations and weights (see the kernel).
        auto launch = [&](auto loc_tag) {
          using loc_t = decltype(loc_tag);
          with_max_cpl(ls.cpl, [&](auto max_cpl) {
            ms_deform_attn_forward_kernel<scalar_t, loc_t, decltype(max_cpl)::value>
                <<<static_cast<unsigned>(ls.blocks), kThreadsPerBlock, 0, stream>>>(
                    value_c.data_ptr<scalar_t>(), shapes_c.data_ptr<int64_t>(),
                    starts_c.data_ptr<int64_t>(), loc_c.data_ptr<loc_t>(),
                    attn_c.data_ptr<loc_t>(), output.data_ptr<scalar_t>(), s, ls.lanes, ls.cpl);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        };
        if (fp32_locations) {
          launch(float{});
        } else {
          launch(scalar_t{});
        }
      });
  return output;
}

Grads backward_cuda(const at::Tensor& grad_output, const at::Tensor& value,
                    const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                    const at::Tensor& sampling_loc, const at::Tensor& attn_weight) {
  const Inputs in = checked_inputs(value, spatial_shapes, level_start_index, sampling_loc,
                                   attn_weight, c10::DeviceType::CUDA);
  check_grad_output(grad_output, value, sampling_loc);
  const c10::cuda::CUDAGuard device_guard(value.device());
  const Sizes s = get_sizes(value, sampling_loc);
  const auto &value_c = in.value, &shapes_c = in.shapes, &starts_c = in.starts;
  const auto &loc_c = in.loc, &attn_c = in.attn;
  const auto grad_out_c = grad_output.contiguous();
  // grad_value accumulates atomically in the opmath type (fp32 for half / bf16).
  const auto acc_type = at::toOpMathType(value.scalar_type());
  auto grad_value_acc = at::zeros(value_c.sizes(), value_c.options().dtype(acc_type));
  auto grad_loc = at::zeros_like(loc_c);
  auto grad_attn = at::zeros_like(attn_c);
  if (grad_out_c.numel() > 0 && value_c.numel() > 0) {
    const LaunchShape ls = launch_shape(s);
    const auto stream = at::cuda::getCurrentCUDAStream();
    const bool fp32_locations = loc_c.scalar_type() != value.scalar_type();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda_backward", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          auto launch = [&](auto loc_tag) {
            using loc_t = decltype(loc_tag);
            with_max_cpl(ls.cpl, [&](auto max_cpl) {
              ms_deform_attn_backward_kernel<scalar_t, loc_t, decltype(max_cpl)::value>
                  <<<static_cast<unsigned>(ls.blocks), kThreadsPerBlock, 0, stream>>>(
                      value_c.data_ptr<scalar_t>(), shapes_c.data_ptr<int64_t>(),
                      starts_c.data_ptr<int64_t>(), loc_c.data_ptr<loc_t>(),
                      attn_c.data_ptr<loc_t>(), grad_out_c.data_ptr<scalar_t>(),
                      grad_value_acc.data_ptr<acc_t>(), grad_loc.data_ptr<loc_t>(),
                      grad_attn.data_ptr<loc_t>(), s, ls.lanes, ls.cpl);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
          };
          if (fp32_locations) {
            launch(float{});
          } else {
            launch(scalar_t{});
          }
        });
  }
  auto grad_value =
      acc_type == value.scalar_type() ? grad_value_acc : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(isda, CUDA, m) {
  m.impl("ms_deform_attn", &forward_cuda);
  m.impl("_ms_deform_attn_backward", &backward_cuda);
}

}  // namespace isda
