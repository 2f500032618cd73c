// CPU kernels of multi-scale deformable attention (forward and backward), float and double.
//
// Layout: value is (N, S, M, D) so the D channels of one (token, head) are contiguous. Each
// sample's four bilinear corner weights are computed once and then applied to D contiguous
// channels, which the compiler vectorises.
//
// Parallelism:
//   forward  - over (n, q) rows: every row writes only its own output slice.
//   backward - over (n, m) heads: grad_value[n, :, m, :] is written by exactly one task, so the
//              scatter-add needs neither atomics nor per-thread buffers. Each query's corner
//              rows are prefetched before use (scattered decoder samples miss the cache).
// The hot loops are compiled twice (AVX2+FMA and baseline x86-64, picked at load time), D = 32 is
// specialised at compile time, and all index arithmetic is int64_t.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <vector>

#include "../ms_deform_attn.h"

namespace isda {
namespace {

// (n, q) rows per parallel_for chunk in the forward: enough work per chunk to amortise the
// scheduling, small enough to balance the decoder shape (Lq = 300).
constexpr int64_t kForwardGrainRows = 16;
constexpr int kCorners = 4;
constexpr int64_t kCacheLine = 64;         // bytes
constexpr int64_t kMaxPrefetchBytes = 256;  // per row: the first lines are enough to start

// Asks for the first bytes of a channel row ahead of use (a hint; a no-op where unsupported).
template <typename scalar_t>
C10_ALWAYS_INLINE void prefetch_row(const scalar_t* row, int64_t D) {
#if defined(__GNUC__)
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t size = std::min<int64_t>(row_bytes, kMaxPrefetchBytes);
  for (int64_t b = 0; b < size; b += kCacheLine) {
    __builtin_prefetch(bytes + b);
  }
#endif
}

// The four bilinear taps of one sample on one level.
// Corner order: (h_low, w_low), (h_low, w_high), (h_high, w_low), (h_high, w_high).
template <typename acc_t>
struct Taps {
  int64_t offset[kCorners];  // element offset of each corner's channel row in the level
  acc_t weight[kCorners];    // bilinear weight of each corner
  bool valid[kCorners];      // corner inside the map (zero padding otherwise)
  bool all_valid;
  acc_t lh, lw;              // fractional parts: h_im - h_low, w_im - w_low
};

// Exact floor of a finite value as int64: truncate, then step down for negative non-integers.
// (Cheaper than std::floor, which is a library call on the baseline x86-64 ISA.)
template <typename acc_t>
C10_ALWAYS_INLINE int64_t floor_to_int(acc_t v) {
  const int64_t truncated = static_cast<int64_t>(v);
  return truncated - static_cast<int64_t>(static_cast<acc_t>(truncated) > v);
}

// Computes the taps of location (x, y) on an H x W level whose tokens are `row_stride` elements
// apart. Returns false when no corner can be inside the map (or the location is NaN), so the
// sample contributes nothing and has zero gradient - exactly grid_sample's zero padding.
template <typename acc_t>
inline bool compute_taps(acc_t x, acc_t y, int64_t H, int64_t W, int64_t row_stride,
                         Taps<acc_t>& t) {
  // align_corners=False: normalised 0 is the left edge of pixel 0, i.e. pixel coordinate -0.5.
  const acc_t h_im = y * static_cast<acc_t>(H) - acc_t(0.5);
  const acc_t w_im = x * static_cast<acc_t>(W) - acc_t(0.5);
  // Written so that NaN fails; h_im == -1 still has its high corner on row 0 (grid_sample keeps
  // that corner's gradient), so the lower bound is inclusive.
  if (!(h_im >= acc_t(-1) && w_im >= acc_t(-1) && h_im < static_cast<acc_t>(H) &&
        w_im < static_cast<acc_t>(W))) {
    return false;
  }
  const int64_t h_low = floor_to_int(h_im);
  const int64_t w_low = floor_to_int(w_im);
  t.lh = h_im - static_cast<acc_t>(h_low);
  t.lw = w_im - static_cast<acc_t>(w_low);
  const acc_t hh = acc_t(1) - t.lh, hw = acc_t(1) - t.lw;
  const bool h_low_in = h_low >= 0, h_high_in = h_low + 1 < H;
  const bool w_low_in = w_low >= 0, w_high_in = w_low + 1 < W;
  t.weight[0] = hh * hw;
  t.weight[1] = hh * t.lw;
  t.weight[2] = t.lh * hw;
  t.weight[3] = t.lh * t.lw;
  t.valid[0] = h_low_in && w_low_in;
  t.valid[1] = h_low_in && w_high_in;
  t.valid[2] = h_high_in && w_low_in;
  t.valid[3] = h_high_in && w_high_in;
  // The other corners are one token right / one row down from (h_low, w_low).
  t.offset[0] = (h_low * W + w_low) * row_stride;
  t.offset[1] = t.offset[0] + row_stride;
  t.offset[2] = t.offset[0] + W * row_stride;
  t.offset[3] = t.offset[2] + row_stride;
  t.all_valid = t.valid[0] && t.valid[1] && t.valid[2] && t.valid[3];
  return true;
}

struct Sizes {
  int64_t N, S, M, D, Lq, L, P;
};

Sizes get_sizes(const at::Tensor& value, const at::Tensor& sampling_loc) {
  return Sizes{value.size(0), value.size(1), value.size(2), value.size(3),
               sampling_loc.size(1), sampling_loc.size(3), sampling_loc.size(4)};
}

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

// Forward over the flattened (n, q) rows [begin, end).
template <int kD, typename scalar_t>
C10_ALWAYS_INLINE void forward_rows(const KernelArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = scalar_t;  // float / double only: accumulate in the input type, like grid_sample
  const Sizes& s = a.s;
  const int64_t D = channels<kD>(s.D);
  const int64_t row_stride = s.M * D;  // elements between consecutive tokens of one head
  const int64_t LP = s.L * s.P;
  for (int64_t nq = begin; nq < end; ++nq) {
    const int64_t n = nq / s.Lq;
    const scalar_t* value_n = a.value + n * s.S * row_stride;
    for (int64_t m = 0; m < s.M; ++m) {
      const int64_t nqm = nq * s.M + m;
      scalar_t* o = a.out + nqm * D;
      std::fill(o, o + D, scalar_t(0));
      const scalar_t* loc_nqm = a.loc + nqm * LP * 2;
      const scalar_t* attn_nqm = a.attn + nqm * LP;
      for (int64_t l = 0; l < s.L; ++l) {
        const int64_t H = a.shapes[2 * l], W = a.shapes[2 * l + 1];
        const scalar_t* value_level = value_n + a.starts[l] * row_stride + m * D;
        for (int64_t p = 0; p < s.P; ++p) {
          const int64_t lp = l * s.P + p;
          Taps<acc_t> t;
          if (compute_taps<acc_t>(loc_nqm[2 * lp], loc_nqm[2 * lp + 1], H, W, row_stride, t)) {
            accumulate_sample<kD, scalar_t, acc_t>(value_level, t, attn_nqm[lp], D, o);
          }
        }
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
  const int64_t row_stride = s.M * D;
  const int64_t LP = s.L * s.P;
  std::vector<Taps<acc_t>> taps(LP);  // the samples of one (n, q, m)
  std::vector<char> inside(LP);
  for (int64_t nm = begin; nm < end; ++nm) {
    const int64_t n = nm / s.M, m = nm % s.M;
    const int64_t head_offset = n * s.S * row_stride + m * D;
    // grad_value is allocated uninitialised: each task zeroes its own head slice, so the
    // zero-fill (and the first touch of fresh pages) is parallel too.
    for (int64_t token = 0; token < s.S; ++token) {
      scalar_t* row = a.grad_value + head_offset + token * row_stride;
      std::fill(row, row + D, scalar_t(0));
    }
    for (int64_t q = 0; q < s.Lq; ++q) {
      const int64_t nqm = (n * s.Lq + q) * s.M + m;
      const scalar_t* go = a.grad_out + nqm * D;
      const scalar_t* loc_nqm = a.loc + nqm * LP * 2;
      const scalar_t* attn_nqm = a.attn + nqm * LP;
      scalar_t* gloc_nqm = a.grad_loc + nqm * LP * 2;
      scalar_t* gattn_nqm = a.grad_attn + nqm * LP;
      // Pass 1: all taps of this query, with their rows prefetched. Scattered samples (decoder
      // queries) miss the cache on every corner; issuing the loads early overlaps the misses.
      for (int64_t l = 0; l < s.L; ++l) {
        const int64_t H = a.shapes[2 * l], W = a.shapes[2 * l + 1];
        const int64_t level_offset = head_offset + a.starts[l] * row_stride;
        for (int64_t p = 0; p < s.P; ++p) {
          const int64_t lp = l * s.P + p;
          Taps<acc_t>& t = taps[lp];
          inside[lp] =
              compute_taps<acc_t>(loc_nqm[2 * lp], loc_nqm[2 * lp + 1], H, W, row_stride, t);
          if (!inside[lp]) continue;
          for (int c = 0; c < kCorners; ++c) {
            if (!t.valid[c]) continue;
            prefetch_row(a.value + level_offset + t.offset[c], D);
            prefetch_row(a.grad_value + level_offset + t.offset[c], D);
          }
        }
      }
      // Pass 2: the gradients.
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
          const acc_t hh = acc_t(1) - t.lh, hw = acc_t(1) - t.lw;
          gattn_nqm[lp] = t.weight[0] * dot[0] + t.weight[1] * dot[1] + t.weight[2] * dot[2] +
                          t.weight[3] * dot[3];
          // d(sample)/d(w_im) and d(sample)/d(h_im); chain rule through w_im = x * W - 0.5.
          const acc_t d_w = hh * (dot[1] - dot[0]) + t.lh * (dot[3] - dot[2]);
          const acc_t d_h = hw * (dot[2] - dot[0]) + t.lw * (dot[3] - dot[1]);
          gloc_nqm[2 * lp] = w * d_w * static_cast<acc_t>(W);
          gloc_nqm[2 * lp + 1] = w * d_h * static_cast<acc_t>(H);
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

// Function multi-versioning: the channel loops are compiled for AVX2+FMA and for the baseline
// ISA, and the loader picks one at run time, so the wheel still runs on any x86-64 CPU.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define ISDA_CPU_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define ISDA_CPU_CLONES
#endif

ISDA_CPU_CLONES void forward_rows_f32(const KernelArgs<float>& a, int64_t b, int64_t e) {
  forward_rows_any_d(a, b, e);
}
ISDA_CPU_CLONES void forward_rows_f64(const KernelArgs<double>& a, int64_t b, int64_t e) {
  forward_rows_any_d(a, b, e);
}
ISDA_CPU_CLONES void backward_heads_f32(const KernelArgs<float>& a, int64_t b, int64_t e) {
  backward_heads_any_d(a, b, e);
}
ISDA_CPU_CLONES void backward_heads_f64(const KernelArgs<double>& a, int64_t b, int64_t e) {
  backward_heads_any_d(a, b, e);
}

void forward_range(const KernelArgs<float>& a, int64_t b, int64_t e) {
  forward_rows_f32(a, b, e);
}
void forward_range(const KernelArgs<double>& a, int64_t b, int64_t e) {
  forward_rows_f64(a, b, e);
}
void backward_range(const KernelArgs<float>& a, int64_t b, int64_t e) {
  backward_heads_f32(a, b, e);
}
void backward_range(const KernelArgs<double>& a, int64_t b, int64_t e) {
  backward_heads_f64(a, b, e);
}

void check_cpu(const at::Tensor& value) {
  TORCH_CHECK(value.is_cpu(), "ms_deform_attn_cpu: expected CPU tensors, got ", value.device());
}

}  // namespace

at::Tensor ms_deform_attn_cpu_forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  check_cpu(value);
  const Sizes s = get_sizes(value, sampling_loc);
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto loc_c = sampling_loc.contiguous();
  const auto attn_c = attn_weight.contiguous();
  auto output = at::empty({s.N, s.Lq, s.M * s.D}, value.options());
  if (output.numel() == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_forward", [&] {
    KernelArgs<scalar_t> a{value_c.data_ptr<scalar_t>(), shapes_c.data_ptr<int64_t>(),
                           starts_c.data_ptr<int64_t>(), loc_c.data_ptr<scalar_t>(),
                           attn_c.data_ptr<scalar_t>(), nullptr, output.data_ptr<scalar_t>(),
                           nullptr, nullptr, nullptr, s};
    at::parallel_for(0, s.N * s.Lq, kForwardGrainRows,
                     [&](int64_t begin, int64_t end) { forward_range(a, begin, end); });
  });
  return output;
}

std::vector<at::Tensor> ms_deform_attn_cpu_backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight,
    const at::Tensor& grad_output) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  check_grad_output(grad_output, sampling_loc, value);
  check_cpu(value);
  const Sizes s = get_sizes(value, sampling_loc);
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto loc_c = sampling_loc.contiguous();
  const auto attn_c = attn_weight.contiguous();
  const auto grad_out_c = grad_output.contiguous();
  auto grad_loc = at::zeros_like(loc_c);
  auto grad_attn = at::zeros_like(attn_c);
  if (grad_out_c.numel() == 0 || value_c.numel() == 0) {
    return {at::zeros_like(value_c), grad_loc, grad_attn};
  }
  // Zeroed per head inside backward_heads.
  auto grad_value = at::empty_like(value_c);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_backward", [&] {
    KernelArgs<scalar_t> a{value_c.data_ptr<scalar_t>(), shapes_c.data_ptr<int64_t>(),
                           starts_c.data_ptr<int64_t>(), loc_c.data_ptr<scalar_t>(),
                           attn_c.data_ptr<scalar_t>(), grad_out_c.data_ptr<scalar_t>(),
                           nullptr, grad_value.data_ptr<scalar_t>(),
                           grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>(), s};
    // One task per (n, m) head: race-free scatter into grad_value (see backward_heads).
    at::parallel_for(0, s.N * s.M, /*grain_size=*/1,
                     [&](int64_t begin, int64_t end) { backward_range(a, begin, end); });
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace isda
