// CUDA RoIAlign kernels (single- and multi-level), forward and backward.
//
// Thread mapping, chosen for FPN shapes (C = 256, small bins, many RoIs):
//   block  = 32 channels x 8 bin lanes, one RoI, a tile of up to 64 bins;
//   a warp = 32 consecutive channels of the same bin, so every bilinear tap is one
//            coalesced 128-byte (fp32) read from the channels-last feature map.
// The output is (K, C, PH, PW): results are staged in shared memory and written
// with bins as the fast index, so stores are coalesced too. Forward sums in a
// fixed order (deterministic); backward scatters with atomics into a
// channels-last accumulator (coalesced atomics; not deterministic, as torchvision).
// RoIs with a bad batch index, level or non-finite box are never dereferenced:
// their outputs are NaN (the Python API rejects them before launch).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>
#include <vector>

#include "roi_align.h"
#include "roi_align_common.h"

namespace mrcnn {
namespace {

constexpr int kChannelTile = 32;
constexpr int kBinLanes = 8;
constexpr int kBinTile = 64;

template <typename T>
struct LevelsArg {
  T* data[kMaxLevels];  // forward: input (const); backward: gradient accumulator
  int64_t height[kMaxLevels];
  int64_t width[kMaxLevels];
  double scale[kMaxLevels];
  int num_levels;
};

struct LaunchShape {
  int64_t batch_size, channels;
  int pooled_h, pooled_w, sampling_ratio;
  bool aligned;
};

// Level of RoI k, or -1 when the RoI cannot be pooled safely.
template <typename roi_t, typename T>
__device__ __forceinline__ int valid_level(const roi_t* roi, const int64_t* roi_level, int64_t k,
                                           const LevelsArg<T>& lv, int64_t batch_size) {
  for (int j = 0; j < 5; ++j) {
    if (!isfinite(static_cast<double>(roi[j]))) return -1;
  }
  const double b = static_cast<double>(roi[0]);
  if (b < 0 || b >= static_cast<double>(batch_size)) return -1;
  const int64_t l = roi_level ? roi_level[k] : 0;
  return (l >= 0 && l < lv.num_levels) ? static_cast<int>(l) : -1;
}

// Calls f(y_low, y_high, x_low, x_high, w1, w2, w3, w4) for every bilinear sample of bin
// (ph, pw), in torchvision's order (rows outer, columns inner).
template <typename acc_t, typename F>
__device__ __forceinline__ void for_each_sample(const RoiGeometry<acc_t>& g, int ph, int pw, int64_t H,
                                                int64_t W, F&& f) {
  int64_t y0, y1, x0, x1;
  axis_range(g.start_h, g.bin_h, g.grid_h, ph, H, y0, y1);
  axis_range(g.start_w, g.bin_w, g.grid_w, pw, W, x0, x1);
  for (int64_t iy = y0; iy < y1; ++iy) {
    int64_t ylo, yhi;
    acc_t ly;
    if (!axis_sample(sample_position(g.start_h, g.bin_h, g.grid_h, ph, iy), H, ylo, yhi, ly)) continue;
    const acc_t hy = acc_t(1) - ly;
    for (int64_t ix = x0; ix < x1; ++ix) {
      int64_t xlo, xhi;
      acc_t lx;
      if (!axis_sample(sample_position(g.start_w, g.bin_w, g.grid_w, pw, ix), W, xlo, xhi, lx)) continue;
      const acc_t hx = acc_t(1) - lx;
      f(ylo, yhi, xlo, xhi, hy * hx, hy * lx, ly * hx, ly * lx);
    }
  }
}

template <typename T, typename acc_t, typename roi_t>
__global__ void __launch_bounds__(kChannelTile * kBinLanes)
forward_kernel(LevelsArg<const T> lv, const roi_t* __restrict__ rois,
               const int64_t* __restrict__ roi_level, LaunchShape s, T* __restrict__ out) {
  __shared__ acc_t tile[kChannelTile][kBinTile + 1];
  const int64_t k = blockIdx.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kChannelTile;
  const int bin0 = blockIdx.z * kBinTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t C = s.channels, c = c0 + tx;
  const int bins = s.pooled_h * s.pooled_w;
  const roi_t* roi = rois + k * 5;
  const int level = valid_level(roi, roi_level, k, lv, s.batch_size);

  if (level >= 0 && c < C) {
    const int64_t H = lv.height[level], W = lv.width[level];
    const RoiGeometry<acc_t> g = roi_geometry<acc_t>(
        roi, static_cast<acc_t>(lv.scale[level]), s.pooled_h, s.pooled_w, s.sampling_ratio, s.aligned);
    const T* feat = lv.data[level] + static_cast<int64_t>(static_cast<double>(roi[0])) * H * W * C + c;
    for (int b = ty; b < kBinTile && bin0 + b < bins; b += kBinLanes) {
      const int ph = (bin0 + b) / s.pooled_w, pw = (bin0 + b) % s.pooled_w;
      acc_t acc = 0;
      for_each_sample(g, ph, pw, H, W,
                      [&](int64_t ylo, int64_t yhi, int64_t xlo, int64_t xhi, acc_t w1, acc_t w2, acc_t w3, acc_t w4) {
                        acc += w1 * static_cast<acc_t>(feat[(ylo * W + xlo) * C]) +
                               w2 * static_cast<acc_t>(feat[(ylo * W + xhi) * C]) +
                               w3 * static_cast<acc_t>(feat[(yhi * W + xlo) * C]) +
                               w4 * static_cast<acc_t>(feat[(yhi * W + xhi) * C]);
                      });
      tile[tx][b] = acc / g.count;
    }
  } else {
    for (int b = ty; b < kBinTile; b += kBinLanes) tile[tx][b] = std::numeric_limits<acc_t>::quiet_NaN();
  }
  __syncthreads();

  // Write the tile with bins as the fast index: coalesced stores into (K, C, PH, PW).
  for (int i = ty * kChannelTile + tx; i < kChannelTile * kBinTile; i += kChannelTile * kBinLanes) {
    const int cc = i / kBinTile, bb = i % kBinTile;
    if (c0 + cc < C && bin0 + bb < bins) {
      out[(k * C + c0 + cc) * bins + bin0 + bb] = static_cast<T>(tile[cc][bb]);
    }
  }
}

template <typename T, typename acc_t, typename roi_t>
__global__ void __launch_bounds__(kChannelTile * kBinLanes)
backward_kernel(LevelsArg<acc_t> lv, const roi_t* __restrict__ rois,
                const int64_t* __restrict__ roi_level, LaunchShape s, const T* __restrict__ grad_out) {
  __shared__ acc_t tile[kChannelTile][kBinTile + 1];
  const int64_t k = blockIdx.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kChannelTile;
  const int bin0 = blockIdx.z * kBinTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t C = s.channels, c = c0 + tx;
  const int bins = s.pooled_h * s.pooled_w;

  // Read the gradient tile with bins as the fast index (coalesced loads).
  for (int i = ty * kChannelTile + tx; i < kChannelTile * kBinTile; i += kChannelTile * kBinLanes) {
    const int cc = i / kBinTile, bb = i % kBinTile;
    tile[cc][bb] = (c0 + cc < C && bin0 + bb < bins)
                       ? static_cast<acc_t>(grad_out[(k * C + c0 + cc) * bins + bin0 + bb])
                       : acc_t(0);
  }
  __syncthreads();

  const roi_t* roi = rois + k * 5;
  const int level = valid_level(roi, roi_level, k, lv, s.batch_size);
  if (level < 0 || c >= C) return;
  const int64_t H = lv.height[level], W = lv.width[level];
  const RoiGeometry<acc_t> g = roi_geometry<acc_t>(
      roi, static_cast<acc_t>(lv.scale[level]), s.pooled_h, s.pooled_w, s.sampling_ratio, s.aligned);
  acc_t* grad_in = lv.data[level] + static_cast<int64_t>(static_cast<double>(roi[0])) * H * W * C + c;
  for (int b = ty; b < kBinTile && bin0 + b < bins; b += kBinLanes) {
    const int ph = (bin0 + b) / s.pooled_w, pw = (bin0 + b) % s.pooled_w;
    const acc_t grad = tile[tx][b];
    for_each_sample(g, ph, pw, H, W,
                    [&](int64_t ylo, int64_t yhi, int64_t xlo, int64_t xhi, acc_t w1, acc_t w2, acc_t w3, acc_t w4) {
                      gpuAtomicAdd(grad_in + (ylo * W + xlo) * C, grad * w1 / g.count);
                      gpuAtomicAdd(grad_in + (ylo * W + xhi) * C, grad * w2 / g.count);
                      gpuAtomicAdd(grad_in + (yhi * W + xlo) * C, grad * w3 / g.count);
                      gpuAtomicAdd(grad_in + (yhi * W + xhi) * C, grad * w4 / g.count);
                    });
  }
}

dim3 launch_grid(int64_t num_rois, int64_t channels, int64_t bins) {
  TORCH_CHECK_VALUE(num_rois <= std::numeric_limits<int32_t>::max(), "roi_align: too many RoIs (",
                    num_rois, ") for one launch");
  const int64_t channel_tiles = (channels + kChannelTile - 1) / kChannelTile;
  const int64_t bin_tiles = (bins + kBinTile - 1) / kBinTile;
  TORCH_CHECK_VALUE(channel_tiles <= 65535 && bin_tiles <= 65535, "roi_align: ", channels,
                    " channels or ", bins, " output bins exceed the CUDA launch limits");
  return dim3(static_cast<unsigned>(num_rois), static_cast<unsigned>(channel_tiles),
              static_cast<unsigned>(bin_tiles));
}

// Calls f.template operator()<roi_t>() with roi_t = the rois' element type.
template <typename scalar_t, typename F>
void dispatch_roi_type(const at::Tensor& rois, F&& f) {
  if (rois.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) {
    f(static_cast<scalar_t*>(nullptr));
  } else {
    f(static_cast<float*>(nullptr));
  }
}

}  // namespace

at::Tensor multilevel_forward_cuda(at::TensorList features, const at::Tensor& rois,
                                   const at::Tensor& levels, at::ArrayRef<double> spatial_scales,
                                   int64_t pooled_height, int64_t pooled_width,
                                   int64_t sampling_ratio, bool aligned) {
  const at::Tensor& first = features[0];
  c10::cuda::CUDAGuard guard(first.device());
  const int64_t K = rois.size(0), C = first.size(1), L = static_cast<int64_t>(features.size());
  at::Tensor out = at::empty({K, C, pooled_height, pooled_width}, first.options());
  if (K == 0 || C == 0) return out;

  const at::Tensor rois_c = rois.contiguous();
  const at::Tensor levels_c = levels.defined() ? levels.contiguous() : at::Tensor();
  std::vector<at::Tensor> nhwc(L);
  for (int64_t l = 0; l < L; ++l) nhwc[l] = features[l].contiguous(at::MemoryFormat::ChannelsLast);
  const dim3 grid = launch_grid(K, C, pooled_height * pooled_width);
  const dim3 block(kChannelTile, kBinLanes);
  const LaunchShape shape{first.size(0), C, static_cast<int>(pooled_height),
                          static_cast<int>(pooled_width), static_cast<int>(sampling_ratio), aligned};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "mrcnn_roi_align_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LevelsArg<const scalar_t> lv{};
    lv.num_levels = static_cast<int>(L);
    for (int64_t l = 0; l < L; ++l) {
      lv.data[l] = nhwc[l].data_ptr<scalar_t>();
      lv.height[l] = nhwc[l].size(2);
      lv.width[l] = nhwc[l].size(3);
      lv.scale[l] = spatial_scales[l];
    }
    dispatch_roi_type<scalar_t>(rois_c, [&](auto* tag) {
      using roi_t = std::remove_pointer_t<decltype(tag)>;
      forward_kernel<scalar_t, acc_t, roi_t><<<grid, block, 0, stream>>>(
          lv, rois_c.data_ptr<roi_t>(), levels_c.defined() ? levels_c.data_ptr<int64_t>() : nullptr,
          shape, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::vector<at::Tensor> multilevel_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                                 const at::Tensor& levels,
                                                 at::ArrayRef<double> spatial_scales,
                                                 at::IntArrayRef heights, at::IntArrayRef widths,
                                                 int64_t batch_size, int64_t channels,
                                                 int64_t pooled_height, int64_t pooled_width,
                                                 int64_t sampling_ratio, bool aligned,
                                                 bool channels_last) {
  c10::cuda::CUDAGuard guard(grad.device());
  at::globalContext().alertNotDeterministic("mrcnn::roi_align_backward (CUDA)");
  const int64_t K = rois.size(0), L = static_cast<int64_t>(spatial_scales.size());
  std::vector<at::Tensor> buffers = gradient_accumulators(grad, heights, widths, batch_size, channels);

  if (K > 0 && channels > 0) {
    const at::Tensor rois_c = rois.contiguous();
    const at::Tensor levels_c = levels.defined() ? levels.contiguous() : at::Tensor();
    const at::Tensor grad_c = grad.contiguous();
    const dim3 grid = launch_grid(K, channels, pooled_height * pooled_width);
    const dim3 block(kChannelTile, kBinLanes);
    const LaunchShape shape{batch_size, channels, static_cast<int>(pooled_height),
                            static_cast<int>(pooled_width), static_cast<int>(sampling_ratio), aligned};
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mrcnn_roi_align_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      LevelsArg<acc_t> lv{};
      lv.num_levels = static_cast<int>(L);
      for (int64_t l = 0; l < L; ++l) {
        lv.data[l] = buffers[l].data_ptr<acc_t>();
        lv.height[l] = heights[l];
        lv.width[l] = widths[l];
        lv.scale[l] = spatial_scales[l];
      }
      dispatch_roi_type<scalar_t>(rois_c, [&](auto* tag) {
        using roi_t = std::remove_pointer_t<decltype(tag)>;
        backward_kernel<scalar_t, acc_t, roi_t><<<grid, block, 0, stream>>>(
            lv, rois_c.data_ptr<roi_t>(), levels_c.defined() ? levels_c.data_ptr<int64_t>() : nullptr,
            shape, grad_c.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  return gradients_from_accumulators(buffers, grad.scalar_type(), channels_last);
}

}  // namespace mrcnn
