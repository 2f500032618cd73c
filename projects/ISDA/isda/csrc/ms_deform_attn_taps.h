// Bilinear tap arithmetic of multi-scale deformable attention, shared by the CPU and CUDA kernels.
//
// Every function here is C10_HOST_DEVICE, so the CPU tests exercise exactly the arithmetic that
// the CUDA kernels run. Conventions (identical to grid_sample, bilinear, zero padding,
// align_corners=False): normalised location (x, y) of an H x W level reads pixel coordinate
// (x * W - 0.5, y * H - 0.5). Corner order: (h_low, w_low), (h_low, w_high), (h_high, w_low),
// (h_high, w_high). All index arithmetic is int64_t.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace isda {

constexpr int kCorners = 4;

// Sizes of one call: value (N, S, M, D), sampling locations (N, Lq, M, L, P, 2).
struct Sizes {
  int64_t N, S, M, D, Lq, L, P;
};

// The four bilinear taps of one sample on one level.
template <typename acc_t>
struct Taps {
  int64_t offset[kCorners];  // element offset of each corner's channel row in the level
  acc_t weight[kCorners];    // bilinear weight of each corner
  bool valid[kCorners];      // corner inside the map (zero padding otherwise)
  bool all_valid;
  acc_t lh, lw;  // fractional parts: h_im - h_low, w_im - w_low
};

// Exact floor of a finite value as int64: truncate, then step down for negative non-integers
// (cheaper than std::floor, a library call on the baseline x86-64 ISA).
template <typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE int64_t floor_to_int(acc_t v) {
  const int64_t truncated = static_cast<int64_t>(v);
  return truncated - static_cast<int64_t>(static_cast<acc_t>(truncated) > v);
}

// Whether level l (tokens [start, start + H * W)) lies inside value's S tokens. A level that does
// not is skipped, so malformed spatial_shapes / level_start_index can never read out of bounds.
C10_HOST_DEVICE C10_ALWAYS_INLINE bool level_fits(int64_t start, int64_t H, int64_t W,
                                                  int64_t S) {
  return start >= 0 && H >= 0 && W >= 0 && (H == 0 || W <= S / H) && start <= S - H * W;
}

// Computes the taps of location (x, y) on an H x W level whose tokens are `row_stride` elements
// apart. Returns false when no corner can be inside the map (or the location is NaN), so the
// sample contributes nothing and has zero gradient - exactly grid_sample's zero padding.
template <typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE bool compute_taps(acc_t x, acc_t y, int64_t H, int64_t W,
                                                    int64_t row_stride, Taps<acc_t>& t) {
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

// Gradients of one sample from the corner dot products dot[c] = <grad_out, value_c>:
// d(out)/d(attn) and, through w_im = x * W - 0.5 and h_im = y * H - 0.5, attn * d(out)/d(x, y).
template <typename acc_t>
struct SampleGrads {
  acc_t attn, x, y;
};

template <typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE SampleGrads<acc_t> sample_grads(const Taps<acc_t>& t,
                                                                  const acc_t dot[kCorners],
                                                                  acc_t attn, int64_t H,
                                                                  int64_t W) {
  const acc_t hh = acc_t(1) - t.lh, hw = acc_t(1) - t.lw;
  const acc_t d_w = hh * (dot[1] - dot[0]) + t.lh * (dot[3] - dot[2]);
  const acc_t d_h = hw * (dot[2] - dot[0]) + t.lw * (dot[3] - dot[1]);
  SampleGrads<acc_t> g;
  g.attn = t.weight[0] * dot[0] + t.weight[1] * dot[1] + t.weight[2] * dot[2] +
           t.weight[3] * dot[3];
  g.x = attn * d_w * static_cast<acc_t>(W);
  g.y = attn * d_h * static_cast<acc_t>(H);
  return g;
}

}  // namespace isda
