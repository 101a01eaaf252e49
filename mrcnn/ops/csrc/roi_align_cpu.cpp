// CPU RoIAlign kernels (single- and multi-level), forward and backward.
//
// Layout: feature maps are pooled in channels-last (N, H, W, C) so that every
// bilinear tap reads a contiguous run of channels; the inner loops are plain
// channel loops that the compiler vectorises, built for AVX-512, AVX2 and a
// baseline target and picked at load time. Forward runs in parallel over RoIs;
// backward runs in parallel over channel blocks, each thread visiting the RoIs
// in order, so gradients are deterministic without atomics.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <vector>

#include "roi_align.h"
#include "roi_align_common.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MRCNN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MRCNN_CLONES
#endif

namespace mrcnn {
namespace {

// Samples of every bin along one axis, in compressed rows: bin p owns entries
// [begin[p], begin[p + 1]).
template <typename acc_t>
struct AxisTable {
  std::vector<int64_t> begin, lo, hi;
  std::vector<acc_t> frac;

  void build(acc_t start, acc_t bin, int64_t grid, int64_t pooled, int64_t size) {
    begin.assign(1, 0);
    lo.clear();
    hi.clear();
    frac.clear();
    for (int64_t p = 0; p < pooled; ++p) {
      int64_t first, last;
      axis_range(start, bin, grid, p, size, first, last);
      for (int64_t i = first; i < last; ++i) {
        int64_t l, h;
        acc_t f;
        if (axis_sample(sample_position(start, bin, grid, p, i), size, l, h, f)) {
          lo.push_back(l);
          hi.push_back(h);
          frac.push_back(f);
        }
      }
      begin.push_back(static_cast<int64_t>(lo.size()));
    }
  }

  // [first, last) covers every pixel a sample touches; false when there are no samples.
  bool span(int64_t& first, int64_t& last) const {
    if (lo.empty()) return false;
    first = *std::min_element(lo.begin(), lo.end());
    last = *std::max_element(hi.begin(), hi.end()) + 1;
    return true;
  }

  void shift(int64_t by) {
    for (auto& v : lo) v -= by;
    for (auto& v : hi) v -= by;
  }
};

// Everything the kernels need about one feature map, in channels-last layout.
template <typename acc_t>
struct Level {
  const acc_t* data;  // forward: input, (N, H, W, C)
  acc_t* grad;        // backward: gradient accumulator, (N, H, W, C)
  const void* nchw;   // forward, windowed mode: the input as given, (N, C, H, W), input dtype
  int64_t height, width;
  acc_t scale;
};

// acc[c] += sum over taps of w * feat[tap][c], for one bilinear sample.
template <typename acc_t>
inline void accumulate_sample(acc_t* __restrict acc, const acc_t* __restrict p1,
                              const acc_t* __restrict p2, const acc_t* __restrict p3,
                              const acc_t* __restrict p4, acc_t w1, acc_t w2, acc_t w3, acc_t w4,
                              int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) {
    acc[c] += w1 * p1[c] + w2 * p2[c] + w3 * p3[c] + w4 * p4[c];
  }
}

// grad[tap][c] += w * g[c] / count for the four taps of one sample.
template <typename acc_t>
inline void scatter_sample(acc_t* __restrict q1, acc_t* __restrict q2, acc_t* __restrict q3,
                           acc_t* __restrict q4, const acc_t* __restrict g, acc_t w1, acc_t w2,
                           acc_t w3, acc_t w4, acc_t count, int64_t channels) {
  // Taps can coincide at the map border, so each is applied in turn.
  for (int64_t c = 0; c < channels; ++c) q1[c] += g[c] * w1 / count;
  for (int64_t c = 0; c < channels; ++c) q2[c] += g[c] * w2 / count;
  for (int64_t c = 0; c < channels; ++c) q3[c] += g[c] * w3 / count;
  for (int64_t c = 0; c < channels; ++c) q4[c] += g[c] * w4 / count;
}

struct PoolArgs {
  int64_t num_rois, channels, pooled_h, pooled_w, sampling_ratio;
  bool aligned;
};

// Copies the window [y0, y1) x [x0, x1) of one (C, H, W) image into a channels-last
// buffer. For few RoIs on a large NCHW map this is far cheaper than transposing it all.
template <typename in_t, typename acc_t>
void gather_window(const in_t* __restrict src, int64_t C, int64_t H, int64_t W, int64_t y0, int64_t y1,
                   int64_t x0, int64_t x1, std::vector<acc_t>& buf) {
  const int64_t ww = x1 - x0;
  buf.resize((y1 - y0) * ww * C);
  acc_t* __restrict dst = buf.data();
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t y = y0; y < y1; ++y) {
      const in_t* row = src + (c * H + y) * W;
      acc_t* d = dst + (y - y0) * ww * C + c;
      for (int64_t x = x0; x < x1; ++x) d[(x - x0) * C] = static_cast<acc_t>(row[x]);
    }
  }
}

// Forward over RoIs [begin, end). `out` is (K, C, PH, PW) contiguous.
template <typename acc_t, typename out_t>
void forward_rois(const Level<acc_t>* levels, const int64_t* roi_level, const acc_t* rois,
                  const PoolArgs& a, out_t* out, int64_t begin, int64_t end) {
  const int64_t C = a.channels, PH = a.pooled_h, PW = a.pooled_w, bins = PH * PW;
  std::vector<acc_t> acc(C), window;
  AxisTable<acc_t> ys, xs;
  for (int64_t k = begin; k < end; ++k) {
    const acc_t* roi = rois + k * 5;
    const Level<acc_t>& lv = levels[roi_level ? roi_level[k] : 0];
    const RoiGeometry<acc_t> g = roi_geometry<acc_t>(roi, lv.scale, PH, PW, a.sampling_ratio, a.aligned);
    ys.build(g.start_h, g.bin_h, g.grid_h, PH, lv.height);
    xs.build(g.start_w, g.bin_w, g.grid_w, PW, lv.width);
    const int64_t image = static_cast<int64_t>(roi[0]);
    const acc_t* feat = nullptr;  // channels-last pixels, `row` of them per image row
    int64_t row = lv.width;
    if (lv.nchw == nullptr) {
      feat = lv.data + image * lv.height * lv.width * C;
    } else {
      int64_t y0, y1, x0, x1;
      if (ys.span(y0, y1) && xs.span(x0, x1)) {
        gather_window(static_cast<const out_t*>(lv.nchw) + image * C * lv.height * lv.width, C, lv.height,
                      lv.width, y0, y1, x0, x1, window);
        ys.shift(y0);
        xs.shift(x0);
        feat = window.data();
        row = x1 - x0;
      }  // else: no sample lands on the map; the loops below do nothing and the output is 0
    }
    out_t* out_k = out + k * C * bins;
    for (int64_t ph = 0; ph < PH; ++ph) {
      for (int64_t pw = 0; pw < PW; ++pw) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t iy = ys.begin[ph]; iy < ys.begin[ph + 1]; ++iy) {
          const acc_t ly = ys.frac[iy], hy = acc_t(1) - ly;
          const acc_t* row_lo = feat + ys.lo[iy] * row * C;
          const acc_t* row_hi = feat + ys.hi[iy] * row * C;
          for (int64_t ix = xs.begin[pw]; ix < xs.begin[pw + 1]; ++ix) {
            const acc_t lx = xs.frac[ix], hx = acc_t(1) - lx;
            accumulate_sample(acc.data(), row_lo + xs.lo[ix] * C, row_lo + xs.hi[ix] * C,
                              row_hi + xs.lo[ix] * C, row_hi + xs.hi[ix] * C, hy * hx, hy * lx,
                              ly * hx, ly * lx, C);
          }
        }
        const int64_t bin = ph * PW + pw;
        for (int64_t c = 0; c < C; ++c) out_k[c * bins + bin] = static_cast<out_t>(acc[c] / g.count);
      }
    }
  }
}

// Backward for channels [c0, c1) over every RoI, in RoI order.
template <typename acc_t, typename grad_t>
void backward_channels(const Level<acc_t>* levels, const int64_t* roi_level, const acc_t* rois,
                       const PoolArgs& a, const grad_t* grad_out, int64_t c0, int64_t c1) {
  const int64_t C = a.channels, PH = a.pooled_h, PW = a.pooled_w, bins = PH * PW;
  const int64_t width = c1 - c0;
  std::vector<acc_t> g(width);
  AxisTable<acc_t> ys, xs;
  for (int64_t k = 0; k < a.num_rois; ++k) {
    const acc_t* roi = rois + k * 5;
    const Level<acc_t>& lv = levels[roi_level ? roi_level[k] : 0];
    const RoiGeometry<acc_t> geo = roi_geometry<acc_t>(roi, lv.scale, PH, PW, a.sampling_ratio, a.aligned);
    ys.build(geo.start_h, geo.bin_h, geo.grid_h, PH, lv.height);
    xs.build(geo.start_w, geo.bin_w, geo.grid_w, PW, lv.width);
    acc_t* gin = lv.grad + static_cast<int64_t>(roi[0]) * lv.height * lv.width * C + c0;
    const grad_t* gout = grad_out + k * C * bins + c0 * bins;
    for (int64_t ph = 0; ph < PH; ++ph) {
      for (int64_t pw = 0; pw < PW; ++pw) {
        const int64_t bin = ph * PW + pw;
        for (int64_t c = 0; c < width; ++c) g[c] = static_cast<acc_t>(gout[c * bins + bin]);
        for (int64_t iy = ys.begin[ph]; iy < ys.begin[ph + 1]; ++iy) {
          const acc_t ly = ys.frac[iy], hy = acc_t(1) - ly;
          acc_t* row_lo = gin + ys.lo[iy] * lv.width * C;
          acc_t* row_hi = gin + ys.hi[iy] * lv.width * C;
          for (int64_t ix = xs.begin[pw]; ix < xs.begin[pw + 1]; ++ix) {
            const acc_t lx = xs.frac[ix], hx = acc_t(1) - lx;
            scatter_sample(row_lo + xs.lo[ix] * C, row_lo + xs.hi[ix] * C, row_hi + xs.lo[ix] * C,
                           row_hi + xs.hi[ix] * C, g.data(), hy * hx, hy * lx, ly * hx, ly * lx,
                           geo.count, width);
          }
        }
      }
    }
  }
}

// Non-template entry points, each compiled for several instruction sets.
#define MRCNN_DEFINE_FORWARD(NAME, ACC, OUT)                                                   \
  MRCNN_CLONES void NAME(const Level<ACC>* levels, const int64_t* roi_level, const ACC* rois, \
                         const PoolArgs& a, OUT* out, int64_t begin, int64_t end) {          \
    forward_rois<ACC, OUT>(levels, roi_level, rois, a, out, begin, end);                     \
  }
MRCNN_DEFINE_FORWARD(forward_f64, double, double)
MRCNN_DEFINE_FORWARD(forward_f32, float, float)
MRCNN_DEFINE_FORWARD(forward_f16, float, c10::Half)
MRCNN_DEFINE_FORWARD(forward_bf16, float, c10::BFloat16)
#undef MRCNN_DEFINE_FORWARD

#define MRCNN_DEFINE_BACKWARD(NAME, ACC, GRAD)                                                 \
  MRCNN_CLONES void NAME(const Level<ACC>* levels, const int64_t* roi_level, const ACC* rois, \
                         const PoolArgs& a, const GRAD* grad_out, int64_t c0, int64_t c1) {  \
    backward_channels<ACC, GRAD>(levels, roi_level, rois, a, grad_out, c0, c1);              \
  }
MRCNN_DEFINE_BACKWARD(backward_f64, double, double)
MRCNN_DEFINE_BACKWARD(backward_f32, float, float)
MRCNN_DEFINE_BACKWARD(backward_f16, float, c10::Half)
MRCNN_DEFINE_BACKWARD(backward_bf16, float, c10::BFloat16)
#undef MRCNN_DEFINE_BACKWARD

// Type-to-entry-point overloads. Declaring the target_clones functions themselves as
// overloads compiles, but measured 10-30% slower here (2026-11-21), so the clones keep names.
inline void forward_dispatch(const Level<double>* l, const int64_t* rl, const double* r,
                             const PoolArgs& a, double* o, int64_t b, int64_t e) {
  forward_f64(l, rl, r, a, o, b, e);
}
inline void forward_dispatch(const Level<float>* l, const int64_t* rl, const float* r,
                             const PoolArgs& a, float* o, int64_t b, int64_t e) {
  forward_f32(l, rl, r, a, o, b, e);
}
inline void forward_dispatch(const Level<float>* l, const int64_t* rl, const float* r,
                             const PoolArgs& a, c10::Half* o, int64_t b, int64_t e) {
  forward_f16(l, rl, r, a, o, b, e);
}
inline void forward_dispatch(const Level<float>* l, const int64_t* rl, const float* r,
                             const PoolArgs& a, c10::BFloat16* o, int64_t b, int64_t e) {
  forward_bf16(l, rl, r, a, o, b, e);
}
inline void backward_dispatch(const Level<double>* l, const int64_t* rl, const double* r,
                              const PoolArgs& a, const double* g, int64_t c0, int64_t c1) {
  backward_f64(l, rl, r, a, g, c0, c1);
}
inline void backward_dispatch(const Level<float>* l, const int64_t* rl, const float* r,
                              const PoolArgs& a, const float* g, int64_t c0, int64_t c1) {
  backward_f32(l, rl, r, a, g, c0, c1);
}
inline void backward_dispatch(const Level<float>* l, const int64_t* rl, const float* r,
                              const PoolArgs& a, const c10::Half* g, int64_t c0, int64_t c1) {
  backward_f16(l, rl, r, a, g, c0, c1);
}
inline void backward_dispatch(const Level<float>* l, const int64_t* rl, const float* r,
                              const PoolArgs& a, const c10::BFloat16* g, int64_t c0, int64_t c1) {
  backward_bf16(l, rl, r, a, g, c0, c1);
}

// (N, C, H, W) contiguous -> (N, H, W, C) in the accumulation type. ATen's generic
// permuted copy is several times slower than this cache-blocked one, and for NCHW
// inputs the copy costs as much as the pooling itself.
template <typename in_t, typename acc_t>
void transpose_block(const in_t* __restrict src, acc_t* __restrict dst, int64_t C, int64_t HW,
                     int64_t c0, int64_t c1, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t c = c0; c < c1; ++c) dst[p * C + c] = static_cast<acc_t>(src[c * HW + p]);
  }
}

template <typename in_t, typename acc_t>
at::Tensor to_channels_last(const at::Tensor& input, at::ScalarType acc_type) {
  if (input.scalar_type() == acc_type && input.is_contiguous(at::MemoryFormat::ChannelsLast)) return input;
  if (!input.is_contiguous()) {  // any other layout: ATen's copy, then no second pass needed
    return input.to(acc_type).contiguous(at::MemoryFormat::ChannelsLast);
  }
  const int64_t N = input.size(0), C = input.size(1), HW = input.size(2) * input.size(3);
  at::Tensor out = at::empty(input.sizes(), input.options().dtype(acc_type), at::MemoryFormat::ChannelsLast);
  constexpr int64_t kTile = 32;
  const int64_t pixel_tiles = (HW + kTile - 1) / kTile;
  const in_t* src = input.data_ptr<in_t>();
  acc_t* dst = out.data_ptr<acc_t>();
  at::parallel_for(0, N * pixel_tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / pixel_tiles, p0 = (t % pixel_tiles) * kTile, p1 = std::min(HW, p0 + kTile);
      for (int64_t c0 = 0; c0 < C; c0 += kTile) {
        transpose_block(src + n * C * HW, dst + n * HW * C, C, HW, c0, std::min(C, c0 + kTile), p0, p1);
      }
    }
  });
  return out;
}

// Pixels per level that windowed pooling would copy (an upper bound: each RoI's
// sampled rectangle, plus the bilinear neighbours). Decides window vs full transpose.
template <typename acc_t>
std::vector<double> window_pixels(const Level<acc_t>* levels, int64_t num_levels, const int64_t* roi_level,
                                  const acc_t* rois, const PoolArgs& a) {
  std::vector<double> pixels(num_levels, 0.0);
  auto extent = [](double start, double end, int64_t size) {
    const double lo = std::max(0.0, std::floor(std::min(start, end)));
    const double hi = std::min(static_cast<double>(size), std::ceil(std::max(start, end)) + 2.0);
    return std::max(0.0, hi - lo);
  };
  for (int64_t k = 0; k < a.num_rois; ++k) {
    const acc_t* roi = rois + k * 5;
    const int64_t l = roi_level ? roi_level[k] : 0;
    const Level<acc_t>& lv = levels[l];
    const RoiGeometry<acc_t> g = roi_geometry<acc_t>(roi, lv.scale, a.pooled_h, a.pooled_w, a.sampling_ratio, a.aligned);
    pixels[l] += extent(g.start_h, g.start_h + a.pooled_h * g.bin_h, lv.height) *
                 extent(g.start_w, g.start_w + a.pooled_w * g.bin_w, lv.width);
  }
  return pixels;
}

// Box values are checked here, before any pointer arithmetic uses them.
template <typename acc_t>
void check_roi_values(const char* op, const acc_t* rois, const int64_t* roi_level, int64_t num_rois,
                      int64_t batch_size, int64_t num_levels) {
  for (int64_t k = 0; k < num_rois; ++k) {
    const acc_t* r = rois + k * 5;
    TORCH_CHECK_VALUE(std::isfinite(static_cast<double>(r[1])) && std::isfinite(static_cast<double>(r[2])) &&
                          std::isfinite(static_cast<double>(r[3])) && std::isfinite(static_cast<double>(r[4])),
                      op, ": box ", k, " has non-finite coordinates (", r[1], ", ", r[2], ", ", r[3],
                      ", ", r[4], ")");
    TORCH_CHECK_VALUE(std::isfinite(static_cast<double>(r[0])) && r[0] >= 0 &&
                          static_cast<double>(r[0]) < static_cast<double>(batch_size),
                      op, ": box ", k, " has batch index ", r[0], ", outside [0, ", batch_size,
                      ") for a batch of ", batch_size, " images");
    if (roi_level) {
      TORCH_CHECK_VALUE(roi_level[k] >= 0 && roi_level[k] < num_levels, op, ": box ", k,
                        " has level ", roi_level[k], ", outside [0, ", num_levels, ")");
    }
  }
}

// Channel blocks for the backward pass: enough for every thread, aligned to a cache line.
int64_t channel_block(int64_t channels) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t block = (channels + threads - 1) / threads;
  block = (block + 15) / 16 * 16;
  return std::max<int64_t>(1, std::min(block, channels));
}

}  // namespace

at::Tensor multilevel_forward_cpu(at::TensorList features, const at::Tensor& rois,
                                  const at::Tensor& levels, at::ArrayRef<double> spatial_scales,
                                  int64_t pooled_height, int64_t pooled_width,
                                  int64_t sampling_ratio, bool aligned) {
  const at::Tensor& first = features[0];
  const auto acc_type = accumulate_type(first.scalar_type());
  const int64_t N = first.size(0), C = first.size(1), K = rois.size(0);
  const int64_t L = static_cast<int64_t>(features.size());
  at::Tensor out = at::empty({K, C, pooled_height, pooled_width}, first.options());

  at::Tensor rois_acc = rois.to(acc_type).contiguous();
  at::Tensor levels_c = levels.defined() ? levels.contiguous() : at::Tensor();
  const int64_t* roi_level = levels_c.defined() ? levels_c.data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "mrcnn_roi_align_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t* roi_data = rois_acc.data_ptr<acc_t>();
    check_roi_values("roi_align", roi_data, roi_level, K, N, L);
    if (K == 0 || C == 0) return;
    const PoolArgs a{K, C, pooled_height, pooled_width, sampling_ratio, aligned};
    std::vector<Level<acc_t>> lv(L);
    for (int64_t l = 0; l < L; ++l) {
      lv[l] = {nullptr, nullptr, nullptr, features[l].size(2), features[l].size(3),
               static_cast<acc_t>(spatial_scales[l])};
    }
    // A level in NCHW is either transposed whole, or each RoI copies just its window:
    // the latter when the windows add up to less than half the map.
    const std::vector<double> windows = window_pixels(lv.data(), L, roi_level, roi_data, a);
    std::vector<at::Tensor> nhwc(L);
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor& f = features[l];
      const bool ready = f.scalar_type() == acc_type && f.is_contiguous(at::MemoryFormat::ChannelsLast);
      const double map_pixels = static_cast<double>(N) * f.size(2) * f.size(3);
      if (!ready && f.is_contiguous() && windows[l] < 0.5 * map_pixels) {
        lv[l].nchw = f.data_ptr<scalar_t>();
      } else {
        nhwc[l] = to_channels_last<scalar_t, acc_t>(f, acc_type);
        lv[l].data = nhwc[l].data_ptr<acc_t>();
      }
    }
    scalar_t* out_data = out.data_ptr<scalar_t>();
    at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
      forward_dispatch(lv.data(), roi_level, roi_data, a, out_data, begin, end);
    });
  });
  return out;
}

std::vector<at::Tensor> multilevel_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                                const at::Tensor& levels,
                                                at::ArrayRef<double> spatial_scales,
                                                at::IntArrayRef heights, at::IntArrayRef widths,
                                                int64_t batch_size, int64_t channels,
                                                int64_t pooled_height, int64_t pooled_width,
                                                int64_t sampling_ratio, bool aligned,
                                                bool channels_last) {
  std::vector<at::Tensor> buffers = gradient_accumulators(grad, heights, widths, batch_size, channels);
  const auto acc_type = accumulate_type(grad.scalar_type());
  const int64_t K = rois.size(0), L = static_cast<int64_t>(spatial_scales.size());
  at::Tensor rois_acc = rois.to(acc_type).contiguous();
  at::Tensor levels_c = levels.defined() ? levels.contiguous() : at::Tensor();
  const int64_t* roi_level = levels_c.defined() ? levels_c.data_ptr<int64_t>() : nullptr;
  at::Tensor grad_c = grad.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mrcnn_roi_align_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t* roi_data = rois_acc.data_ptr<acc_t>();
    check_roi_values("roi_align_backward", roi_data, roi_level, K, batch_size, L);
    if (K == 0 || channels == 0) return;
    std::vector<Level<acc_t>> lv(L);
    for (int64_t l = 0; l < L; ++l) {
      lv[l] = {nullptr, buffers[l].data_ptr<acc_t>(), nullptr, heights[l], widths[l],
               static_cast<acc_t>(spatial_scales[l])};
    }
    const PoolArgs a{K, channels, pooled_height, pooled_width, sampling_ratio, aligned};
    const scalar_t* g = grad_c.data_ptr<scalar_t>();
    const int64_t block = channel_block(channels);
    const int64_t num_blocks = (channels + block - 1) / block;
    at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        backward_dispatch(lv.data(), roi_level, roi_data, a, g, b * block,
                          std::min(channels, (b + 1) * block));
      }
    });
  });

  return gradients_from_accumulators(buffers, grad.scalar_type(), channels_last);
}

}  // namespace mrcnn
