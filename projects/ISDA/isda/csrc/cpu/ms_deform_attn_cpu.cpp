// CPU kernels of multi-scale deformable attention (forward and backward), float and double.
//
// Each sample's four bilinear corner weights are computed once and then applied to D contiguous
// channels in `#pragma omp simd` loops, which the AVX2+FMA build turns into 8-wide FMAs.
//
// Layout and parallelism:
//   forward  - value as given, (N, S, M, D); parallel over (n, q) rows: every row writes only its
//              own output slice.
//   backward - value copied head-major, (N, M, S, D), so that one head's rows are contiguous;
//              parallel over (n, m) heads: grad_value[n, m] is written by exactly one task, so the
//              scatter-add needs neither atomics nor per-thread buffers.
// at::parallel_for only runs in parallel when this file is compiled with OpenMP (setup.py), and
// _cpu_kernel_build() reports whether it was. Each head-query's L * P taps are computed in a pass
// of their own, then used. The hot loops are built twice (AVX2+FMA and baseline x86-64, picked
// at run time from the CPU's feature flags), D = 32 is specialised at compile time, and all index
// arithmetic is int64_t.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../ms_deform_attn.h"
#include "../ms_deform_attn_taps.h"

namespace isda {
namespace {

// (n, q) rows per parallel_for chunk in the forward: enough work per chunk to amortise the
// scheduling, small enough to balance the decoder shape (Lq = 300).
constexpr int64_t kForwardGrainRows = 16;

// Raw pointers of one call (all tensors contiguous). Gradients are null in the forward.
template <typename scalar_t>
struct KernelArgs {
  const scalar_t* value;
  const int64_t* shapes;  // (L, 2)
  const int64_t* starts;  // (L,)
  const scalar_t* loc;
  const scalar_t* attn;
  const scalar_t* grad_out;
  scalar_t* out;  // forward output
  scalar_t* grad_value;
  scalar_t* grad_loc;
  scalar_t* grad_attn;
  Sizes s;
};

// Channel count of a loop: the compile-time kD when non-zero (full unrolling for the common
// D = 32), else the runtime D.
template <int kD>
C10_ALWAYS_INLINE int64_t channels(int64_t D) {
  return kD > 0 ? kD : D;
}

// out[0:D] += sum_c attn * w_c * value_level[offset_c : offset_c + D] over the valid corners.
template <int kD, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void accumulate_sample(const scalar_t* __restrict__ value_level,
                                         const Taps<acc_t>& t, acc_t attn, int64_t D_rt,
                                         acc_t* __restrict__ out) {
  const int64_t D = channels<kD>(D_rt);
  if (t.all_valid) {
    // Fast path (the common case): one fused pass over the channels.
    const acc_t c0 = attn * t.weight[0], c1 = attn * t.weight[1];
    const acc_t c2 = attn * t.weight[2], c3 = attn * t.weight[3];
    const scalar_t* __restrict__ v0 = value_level + t.offset[0];
    const scalar_t* __restrict__ v1 = value_level + t.offset[1];
    const scalar_t* __restrict__ v2 = value_level + t.offset[2];
    const scalar_t* __restrict__ v3 = value_level + t.offset[3];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      out[d] += c0 * v0[d] + c1 * v1[d] + c2 * v2[d] + c3 * v3[d];
    }
    return;
  }
  for (int c = 0; c < kCorners; ++c) {
    if (!t.valid[c]) continue;
    const acc_t coeff = attn * t.weight[c];
    const scalar_t* __restrict__ v = value_level + t.offset[c];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      out[d] += coeff * v[d];
    }
  }
}

// Taps of the L * P samples of one (n, q, m) (inside[lp] false: no corner in the map). Computing
// them in a pass of their own, before any row is read, measured faster than computing each
// sample's taps next to its reads.
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void head_query_taps(const KernelArgs<scalar_t>& a, int64_t nqm,
                                       int64_t row_stride, Taps<acc_t>* taps, char* inside) {
  const Sizes& s = a.s;
  const scalar_t* loc_nqm = a.loc + nqm * s.L * s.P * 2;
  for (int64_t l = 0; l < s.L; ++l) {
    const int64_t H = a.shapes[2 * l], W = a.shapes[2 * l + 1];
    for (int64_t p = 0; p < s.P; ++p) {
      const int64_t lp = l * s.P + p;
      Taps<acc_t>& t = taps[lp];
      inside[lp] =
          compute_taps<acc_t>(loc_nqm[2 * lp], loc_nqm[2 * lp + 1], H, W, row_stride, t);
    }
  }
}

// Forward over the flattened (n, q) rows [begin, end).
template <int kD, typename scalar_t>
C10_ALWAYS_INLINE void forward_rows(const KernelArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = scalar_t;  // float / double only: accumulate in the input type, like grid_sample
  const Sizes& s = a.s;
  const int64_t D = channels<kD>(s.D);
  const int64_t row_stride = s.M * D;  // elements between consecutive tokens of one head
  const int64_t LP = s.L * s.P;
  std::vector<Taps<acc_t>> taps(LP);  // the samples of one (n, q, m)
  std::vector<char> inside(LP);
  for (int64_t nq = begin; nq < end; ++nq) {
    const int64_t n = nq / s.Lq;
    const scalar_t* value_n = a.value + n * s.S * row_stride;
    for (int64_t m = 0; m < s.M; ++m) {
      const int64_t nqm = nq * s.M + m;
      const scalar_t* value_head = value_n + m * D;
      head_query_taps(a, nqm, row_stride, taps.data(), inside.data());
      scalar_t* o = a.out + nqm * D;
      // With D known at compile time the sum lives in registers and is stored once.
      acc_t local[kD > 0 ? kD : 1];
      acc_t* acc = kD > 0 ? local : o;
      std::fill(acc, acc + D, acc_t(0));
      const scalar_t* attn_nqm = a.attn + nqm * LP;
      for (int64_t l = 0; l < s.L; ++l) {
        const scalar_t* value_level = value_head + a.starts[l] * row_stride;
        for (int64_t p = 0; p < s.P; ++p) {
          const int64_t lp = l * s.P + p;
          if (inside[lp]) {
            accumulate_sample<kD, scalar_t, acc_t>(value_level, taps[lp], attn_nqm[lp], D, acc);
          }
        }
      }
      if (kD > 0) {
        std::copy(acc, acc + D, o);
      }
    }
  }
}

// Backward of one sample: scatters attn * w_c * grad_out into grad_value and returns the dot
// products <grad_out, value_c> of each corner (zero for corners outside the map).
template <int kD, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void backward_sample(const scalar_t* __restrict__ value_level,
                                       scalar_t* __restrict__ grad_value_level,
                                       const scalar_t* __restrict__ go, const Taps<acc_t>& t,
                                       acc_t attn, int64_t D_rt, acc_t dot[kCorners]) {
  const int64_t D = channels<kD>(D_rt);
  if (t.all_valid) {
    // Fused pass; the corners are distinct tokens, so the four rows never overlap.
    const acc_t c0 = attn * t.weight[0], c1 = attn * t.weight[1];
    const acc_t c2 = attn * t.weight[2], c3 = attn * t.weight[3];
    const scalar_t* __restrict__ v0 = value_level + t.offset[0];
    const scalar_t* __restrict__ v1 = value_level + t.offset[1];
    const scalar_t* __restrict__ v2 = value_level + t.offset[2];
    const scalar_t* __restrict__ v3 = value_level + t.offset[3];
    scalar_t* __restrict__ g0 = grad_value_level + t.offset[0];
    scalar_t* __restrict__ g1 = grad_value_level + t.offset[1];
    scalar_t* __restrict__ g2 = grad_value_level + t.offset[2];
    scalar_t* __restrict__ g3 = grad_value_level + t.offset[3];
    acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
    for (int64_t d = 0; d < D; ++d) {
      const acc_t g = go[d];
      d0 += g * v0[d];
      d1 += g * v1[d];
      d2 += g * v2[d];
      d3 += g * v3[d];
      g0[d] += c0 * g;
      g1[d] += c1 * g;
      g2[d] += c2 * g;
      g3[d] += c3 * g;
    }
    dot[0] = d0, dot[1] = d1, dot[2] = d2, dot[3] = d3;
    return;
  }
  for (int c = 0; c < kCorners; ++c) {
    dot[c] = acc_t(0);
    if (!t.valid[c]) continue;
    const acc_t coeff = attn * t.weight[c];
    const scalar_t* __restrict__ v = value_level + t.offset[c];
    scalar_t* __restrict__ gv = grad_value_level + t.offset[c];
    acc_t acc = acc_t(0);
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < D; ++d) {
      acc += go[d] * v[d];
      gv[d] += coeff * go[d];
    }
    dot[c] = acc;
  }
}

// Backward over the flattened (n, m) heads [begin, end). Each head is the only writer of
// grad_value[n, :, m, :]; grad_loc / grad_attn entries belong to one (n, q, m), hence one head.
template <int kD, typename scalar_t>
C10_ALWAYS_INLINE void backward_heads(const KernelArgs<scalar_t>& a, int64_t begin,
                                      int64_t end) {
  using acc_t = scalar_t;
  const Sizes& s = a.s;
  const int64_t D = channels<kD>(s.D);
  const int64_t row_stride = D;  // head-major: the tokens of one head are contiguous
  const int64_t LP = s.L * s.P;
  std::vector<Taps<acc_t>> taps(LP);  // the samples of one (n, q, m)
  std::vector<char> inside(LP);
  for (int64_t nm = begin; nm < end; ++nm) {
    const int64_t n = nm / s.M, m = nm % s.M;
    const int64_t head_offset = nm * s.S * D;
    // grad_value is allocated uninitialised: each task zeroes its own (contiguous) head slice,
    // so the zero-fill (and the first touch of fresh pages) is parallel too.
    std::fill(a.grad_value + head_offset, a.grad_value + head_offset + s.S * D, scalar_t(0));
    for (int64_t q = 0; q < s.Lq; ++q) {
      const int64_t nqm = (n * s.Lq + q) * s.M + m;
      const scalar_t* go = a.grad_out + nqm * D;
      const scalar_t* attn_nqm = a.attn + nqm * LP;
      scalar_t* gloc_nqm = a.grad_loc + nqm * LP * 2;
      scalar_t* gattn_nqm = a.grad_attn + nqm * LP;
      head_query_taps(a, nqm, row_stride, taps.data(), inside.data());
      for (int64_t l = 0; l < s.L; ++l) {
        const int64_t H = a.shapes[2 * l], W = a.shapes[2 * l + 1];
        const int64_t level_offset = head_offset + a.starts[l] * row_stride;
        for (int64_t p = 0; p < s.P; ++p) {
          const int64_t lp = l * s.P + p;
          if (!inside[lp]) continue;  // outputs were zero-initialised
          const Taps<acc_t>& t = taps[lp];
          const acc_t w = attn_nqm[lp];
          acc_t dot[kCorners];
          backward_sample<kD, scalar_t, acc_t>(a.value + level_offset,
                                               a.grad_value + level_offset, go, t, w, D, dot);
          const SampleGrads<acc_t> g = sample_grads(t, dot, w, H, W);
          gattn_nqm[lp] = g.attn;
          gloc_nqm[2 * lp] = g.x;
          gloc_nqm[2 * lp + 1] = g.y;
        }
      }
    }
  }
}

// Channel counts with a compile-time specialisation (D = d_model / heads = 256 / 8 in ISDA).
constexpr int kSpecialisedD = 32;

template <typename scalar_t>
C10_ALWAYS_INLINE void forward_rows_any_d(const KernelArgs<scalar_t>& a, int64_t b, int64_t e) {
  if (a.s.D == kSpecialisedD) {
    forward_rows<kSpecialisedD>(a, b, e);
  } else {
    forward_rows<0>(a, b, e);
  }
}

template <typename scalar_t>
C10_ALWAYS_INLINE void backward_heads_any_d(const KernelArgs<scalar_t>& a, int64_t b, int64_t e) {
  if (a.s.D == kSpecialisedD) {
    backward_heads<kSpecialisedD>(a, b, e);
  } else {
    backward_heads<0>(a, b, e);
  }
}

// Two builds of the hot loops: one for AVX2+FMA and one for the baseline ISA, picked at run time
// from the CPU's feature flags, so the wheel still runs on any x86-64 CPU. (GCC's
// target_clones("arch=haswell") would dispatch on the CPU model, not its features, and pick the
// baseline on AMD EPYC and on every Intel model newer than Haswell.)
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define ISDA_AVX2_FMA __attribute__((target("avx2,fma")))
bool cpu_has_avx2_fma() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
}
#else
#define ISDA_AVX2_FMA
bool cpu_has_avx2_fma() { return false; }
#endif

// Defines `name(a, b, e)`, which calls `body<scalar_t>(a, b, e)` in its AVX2+FMA or baseline build.
#define ISDA_DISPATCHED_RANGE(name, body, scalar_t)                                         \
  ISDA_AVX2_FMA void name##_avx2_fma(const KernelArgs<scalar_t>& a, int64_t b, int64_t e) { \
    body<scalar_t>(a, b, e);                                                                  \
  }                                                                                           \
  void name##_baseline(const KernelArgs<scalar_t>& a, int64_t b, int64_t e) {               \
    body<scalar_t>(a, b, e);                                                                  \
  }                                                                                           \
  void name(const KernelArgs<scalar_t>& a, int64_t b, int64_t e) {                          \
    if (cpu_has_avx2_fma()) {                                                                 \
      name##_avx2_fma(a, b, e);                                                               \
    } else {                                                                                  \
      name##_baseline(a, b, e);                                                               \
    }                                                                                         \
  }

ISDA_DISPATCHED_RANGE(forward_range, forward_rows_any_d, float)
ISDA_DISPATCHED_RANGE(forward_range, forward_rows_any_d, double)
ISDA_DISPATCHED_RANGE(backward_range, backward_heads_any_d, float)
ISDA_DISPATCHED_RANGE(backward_range, backward_heads_any_d, double)
#undef ISDA_DISPATCHED_RANGE

// Every level must lie inside value's tokens: the kernels index value with these numbers.
void check_levels(const at::Tensor& shapes, const at::Tensor& starts, int64_t S) {
  const int64_t* hw = shapes.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  for (int64_t l = 0; l < shapes.size(0); ++l) {
    TORCH_CHECK(level_fits(start[l], hw[2 * l], hw[2 * l + 1], S), "ms_deform_attn: level ", l,
                " (H=", hw[2 * l], ", W=", hw[2 * l + 1], ", start ", start[l],
                ") does not fit in value's S=", S, " tokens");
  }
}

// (N, S, M, D) -> (N, M, S, D) copy: the backward walks one head at a time.
at::Tensor head_major(const at::Tensor& value) {
  return value.permute({0, 2, 1, 3}).contiguous();
}

Inputs checked_cpu_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                          const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                          const at::Tensor& attn_weight) {
  Inputs in = checked_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight,
                             c10::DeviceType::CPU);
  check_levels(in.shapes, in.starts, value.size(1));
  return in;
}

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                       const at::Tensor& attn_weight) {
  const Inputs in =
      checked_cpu_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  const Sizes s = get_sizes(value, sampling_loc);
  auto output = at::empty({s.N, s.Lq, s.M * s.D}, value.options());
  if (output.numel() == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_forward", [&] {
    KernelArgs<scalar_t> a{in.value.data_ptr<scalar_t>(), in.shapes.data_ptr<int64_t>(),
                           in.starts.data_ptr<int64_t>(), in.loc.data_ptr<scalar_t>(),
                           in.attn.data_ptr<scalar_t>(), nullptr, output.data_ptr<scalar_t>(),
                           nullptr, nullptr, nullptr, s};
    at::parallel_for(0, s.N * s.Lq, kForwardGrainRows,
                     [&](int64_t begin, int64_t end) { forward_range(a, begin, end); });
  });
  return output;
}

Grads backward_cpu(const at::Tensor& grad_output, const at::Tensor& value,
                   const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_loc, const at::Tensor& attn_weight) {
  const Inputs in =
      checked_cpu_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  check_grad_output(grad_output, value, sampling_loc);
  const Sizes s = get_sizes(value, sampling_loc);
  const auto grad_out = grad_output.contiguous();
  auto grad_loc = at::zeros_like(in.loc);
  auto grad_attn = at::zeros_like(in.attn);
  if (grad_out.numel() == 0 || in.value.numel() == 0) {
    return {at::zeros_like(in.value), grad_loc, grad_attn};
  }
  const at::Tensor value_heads = head_major(in.value);
  auto grad_value = at::empty_like(value_heads);  // zeroed per head inside backward_heads
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_backward", [&] {
    KernelArgs<scalar_t> a{value_heads.data_ptr<scalar_t>(), in.shapes.data_ptr<int64_t>(),
                           in.starts.data_ptr<int64_t>(), in.loc.data_ptr<scalar_t>(),
                           in.attn.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
                           nullptr, grad_value.data_ptr<scalar_t>(),
                           grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>(), s};
    // One task per (n, m) head: race-free scatter into grad_value (see backward_heads).
    at::parallel_for(0, s.N * s.M, /*grain_size=*/1,
                     [&](int64_t begin, int64_t end) { backward_range(a, begin, end); });
  });
  return {grad_value.permute({0, 2, 1, 3}).contiguous(), grad_loc, grad_attn};
}

}  // namespace

// How this library's CPU kernels were built and which build this CPU runs, e.g.
// "isa=avx2_fma parallel=openmp" ("isa=baseline", "parallel=serial" otherwise).
std::string cpu_kernel_build() {
#ifdef INTRA_OP_PARALLEL  // set by ATen/Parallel.h when at::parallel_for can use threads
  const char* parallel = "parallel=threads";
#else
  const char* parallel = "parallel=serial";
#endif
  return std::string(cpu_has_avx2_fma() ? "isa=avx2_fma " : "isa=baseline ") + parallel;
}

TORCH_LIBRARY_FRAGMENT(isda, m) {
  m.def("_cpu_kernel_build() -> str", &cpu_kernel_build);
}

TORCH_LIBRARY_IMPL(isda, CPU, m) {
  m.impl("ms_deform_attn", &forward_cpu);
  m.impl("_ms_deform_attn_backward", &backward_cpu);
}

}  // namespace isda
