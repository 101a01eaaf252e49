// Sampling geometry shared by the CPU and CUDA RoIAlign kernels.
//
// The arithmetic follows torchvision's roi_align kernels step by step (same
// order of operations, same clamping rules) so both produce the same numbers.
// One difference is deliberate: bilinear sampling is separable, so instead of a
// table of (ph, pw, iy, ix) samples we keep one table per axis, and for huge
// adaptive grids we only visit the samples that can land on the feature map
// (the others contribute exactly zero), which bounds work for absurd boxes.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MRCNN_HD __host__ __device__ __forceinline__
#else
#define MRCNN_HD inline
#endif

namespace mrcnn {

constexpr int kMaxLevels = 8;

// Where one RoI's bins start, how big they are, and how many samples each has.
template <typename acc_t>
struct RoiGeometry {
  acc_t start_h, start_w;  // top-left corner in feature-map coordinates
  acc_t bin_h, bin_w;      // bin size
  int64_t grid_h, grid_w;  // samples per bin along each axis (may be <= 0: no samples)
  acc_t count;             // divisor: max(grid_h * grid_w, 1), as torchvision
};

template <typename acc_t, typename roi_t>
MRCNN_HD RoiGeometry<acc_t> roi_geometry(const roi_t* roi, acc_t spatial_scale, int64_t pooled_h,
                                         int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
  RoiGeometry<acc_t> g;
  const acc_t offset = aligned ? acc_t(0.5) : acc_t(0);
  g.start_w = static_cast<acc_t>(roi[1]) * spatial_scale - offset;
  g.start_h = static_cast<acc_t>(roi[2]) * spatial_scale - offset;
  const acc_t end_w = static_cast<acc_t>(roi[3]) * spatial_scale - offset;
  const acc_t end_h = static_cast<acc_t>(roi[4]) * spatial_scale - offset;
  acc_t roi_w = end_w - g.start_w;
  acc_t roi_h = end_h - g.start_h;
  if (!aligned) {  // legacy mode forces malformed RoIs to be 1x1
    roi_w = roi_w > acc_t(1) ? roi_w : acc_t(1);
    roi_h = roi_h > acc_t(1) ? roi_h : acc_t(1);
  }
  g.bin_h = roi_h / static_cast<acc_t>(pooled_h);
  g.bin_w = roi_w / static_cast<acc_t>(pooled_w);
  if (sampling_ratio > 0) {
    g.grid_h = g.grid_w = sampling_ratio;
  } else {
    // ceil(roi / pooled), computed in double and clamped so a huge box cannot overflow.
    const double gh = ceil(static_cast<double>(roi_h / static_cast<acc_t>(pooled_h)));
    const double gw = ceil(static_cast<double>(roi_w / static_cast<acc_t>(pooled_w)));
    const double cap = 4.0e18;
    g.grid_h = static_cast<int64_t>(gh > cap ? cap : (gh < -cap ? -cap : gh));
    g.grid_w = static_cast<int64_t>(gw > cap ? cap : (gw < -cap ? -cap : gw));
  }
  const double n = static_cast<double>(g.grid_h) * static_cast<double>(g.grid_w);
  g.count = static_cast<acc_t>(n > 1.0 ? n : 1.0);
  return g;
}

// Position of sample i of bin p along one axis (torchvision's formula and order).
template <typename acc_t>
MRCNN_HD acc_t sample_position(acc_t start, acc_t bin, int64_t grid, int64_t p, int64_t i) {
  return start + static_cast<acc_t>(p) * bin +
         static_cast<acc_t>(static_cast<float>(i) + .5f) * bin / static_cast<acc_t>(grid);
}

// One axis of a bilinear sample: indices of the two neighbours and the weight of
// the upper one (the lower gets 1 - frac). Returns false when the sample falls
// outside [-1, size], where torchvision's sample is zero.
template <typename acc_t>
MRCNN_HD bool axis_sample(acc_t pos, int64_t size, int64_t& lo, int64_t& hi, acc_t& frac) {
  if (size <= 0 || pos < acc_t(-1) || pos > static_cast<acc_t>(size)) return false;
  if (pos <= acc_t(0)) pos = acc_t(0);
  lo = static_cast<int64_t>(pos);
  if (lo >= size - 1) {
    lo = hi = size - 1;
    pos = static_cast<acc_t>(lo);
  } else {
    hi = lo + 1;
  }
  frac = pos - static_cast<acc_t>(lo);
  return true;
}

// The range [first, last) of sample indices along one axis worth visiting for
// bin p. Small grids are visited whole (exactly as torchvision); for large
// grids (only adaptive sampling of big boxes, where bin > 0) we solve for the
// samples inside [-1, size] and widen by one on each side, then axis_sample's
// exact test decides.
template <typename acc_t>
MRCNN_HD void axis_range(acc_t start, acc_t bin, int64_t grid, int64_t p, int64_t size,
                         int64_t& first, int64_t& last) {
  first = 0;
  last = grid > 0 ? grid : 0;
  if (grid <= 64 || !(bin > acc_t(0))) return;
  const double origin = static_cast<double>(start) + static_cast<double>(p) * static_cast<double>(bin);
  const double step = static_cast<double>(bin) / static_cast<double>(grid);
  double lo = floor((-1.0 - origin) / step - 0.5) - 1.0;
  double hi = ceil((static_cast<double>(size) - origin) / step - 0.5) + 2.0;
  lo = lo < 0.0 ? 0.0 : lo;
  hi = hi > static_cast<double>(grid) ? static_cast<double>(grid) : hi;
  first = static_cast<int64_t>(lo);
  last = hi > lo ? static_cast<int64_t>(hi) : first;
}

}  // namespace mrcnn
