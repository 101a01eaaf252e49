// RoIPool (Fast R-CNN's max pooling over quantised bins), as torchvision::roi_pool computes it.
#pragma once

#include <ATen/ATen.h>

#include <cfloat>
#include <cmath>
#include <tuple>
#include <type_traits>

namespace mrcnn {

// (output (K, C, PH, PW) of input's dtype, argmax int32: the input element h * W + w within its
// channel plane that each output took, -1 for an empty bin).
std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cpu(const at::Tensor& input, const at::Tensor& rois,
                                                        double spatial_scale, int64_t pooled_height,
                                                        int64_t pooled_width);
at::Tensor roi_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax,
                                 int64_t batch_size, int64_t channels, int64_t height, int64_t width);

#ifdef MRCNN_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cuda(const at::Tensor& input, const at::Tensor& rois,
                                                         double spatial_scale, int64_t pooled_height,
                                                         int64_t pooled_width);
at::Tensor roi_pool_backward_cuda(const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax,
                                  int64_t batch_size, int64_t channels, int64_t height, int64_t width);
#endif

// The bins of one RoI, shared by both devices: torchvision's arithmetic in the input's type T
// (rounded box corners, bins of roi / pooled, floor/ceil, clipped to the map).
struct PoolBin {
  int hstart, hend, wstart, wend;
};

template <typename T, typename R>
#ifdef __CUDACC__
__host__ __device__
#endif
inline PoolBin roi_pool_bin(const R* roi, T spatial_scale, int ph, int pw, int pooled_height,
                            int pooled_width, int height, int width) {
  using std::ceil;
  using std::floor;
  using std::round;
  // round/floor/ceil of T: double in double, float and the 16-bit types in float (as C++ promotes them)
  using M = typename std::conditional<std::is_same<T, double>::value, double, float>::type;
  auto corner = [&](R v) { return static_cast<int>(round(static_cast<M>(static_cast<T>(static_cast<T>(v) * spatial_scale)))); };
  const int roi_start_w = corner(roi[1]), roi_start_h = corner(roi[2]);
  const int roi_end_w = corner(roi[3]), roi_end_h = corner(roi[4]);
  // malformed RoIs are forced to 1 x 1
  const int roi_width = roi_end_w - roi_start_w + 1 > 1 ? roi_end_w - roi_start_w + 1 : 1;
  const int roi_height = roi_end_h - roi_start_h + 1 > 1 ? roi_end_h - roi_start_h + 1 : 1;
  const T bin_h = static_cast<T>(roi_height) / static_cast<T>(pooled_height);
  const T bin_w = static_cast<T>(roi_width) / static_cast<T>(pooled_width);
  auto lo = [](int i, T bin) { return static_cast<int>(floor(static_cast<M>(static_cast<T>(static_cast<T>(i) * bin)))); };
  auto hi = [](int i, T bin) { return static_cast<int>(ceil(static_cast<M>(static_cast<T>(static_cast<T>(i) * bin)))); };
  auto clip = [](int v, int size) { return v < 0 ? 0 : (v > size ? size : v); };
  PoolBin b;
  b.hstart = clip(lo(ph, bin_h) + roi_start_h, height);
  b.hend = clip(hi(ph + 1, bin_h) + roi_start_h, height);
  b.wstart = clip(lo(pw, bin_w) + roi_start_w, width);
  b.wend = clip(hi(pw + 1, bin_w) + roi_start_w, width);
  return b;
}

// The maximum of one bin of a channel plane (row-major, `width` wide) and where it is: the
// first maximum in row-major order wins a tie and NaN never does; an empty bin is (0, -1).
template <typename T>
#ifdef __CUDACC__
__host__ __device__
#endif
inline T bin_max(const T* plane, const PoolBin& bin, int width, int* where) {
  const bool empty = bin.hend <= bin.hstart || bin.wend <= bin.wstart;
  T best = empty ? T(0) : T(-FLT_MAX);
  int best_at = -1;
  for (int h = bin.hstart; h < bin.hend; ++h) {
    for (int w = bin.wstart; w < bin.wend; ++w) {
      const int idx = h * width + w;
      if (plane[idx] > best) {
        best = plane[idx];
        best_at = idx;
      }
    }
  }
  *where = best_at;
  return best;
}

}  // namespace mrcnn
