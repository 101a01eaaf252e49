// CUDA RoIPool kernels: one thread per output element (forward), one per gradient element
// scattered with atomics (backward, not deterministic, as torchvision's). The bins come from
// roi_pool_bin (roi_pool.h), the CPU kernels' arithmetic. A RoI with a bad batch index or a
// non-finite box is never dereferenced: its outputs are NaN with argmax -1 (the Python API
// rejects such RoIs before launch).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cfloat>
#include <limits>

#include "roi_pool.h"

namespace mrcnn {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8));
}

// (n, c, ph, pw) of a flat index into a (K, C, PH, PW) tensor
struct OutputIndex {
  int64_t n;
  int c, ph, pw;
};

__device__ __forceinline__ OutputIndex output_index(int64_t index, int channels, int pooled_height, int pooled_width) {
  OutputIndex o;
  o.pw = static_cast<int>(index % pooled_width);
  o.ph = static_cast<int>((index / pooled_width) % pooled_height);
  o.c = static_cast<int>((index / pooled_width / pooled_height) % channels);
  o.n = index / pooled_width / pooled_height / channels;
  return o;
}

template <typename T>
__device__ __forceinline__ bool valid_roi(const T* roi, int64_t batch_size) {
  for (int j = 0; j < 5; ++j) {
    if (!isfinite(static_cast<double>(roi[j]))) return false;
  }
  const double b = static_cast<double>(roi[0]);
  return b >= 0 && b < static_cast<double>(batch_size);
}

template <typename T>
__global__ void roi_pool_forward_kernel(int64_t total, const T* __restrict__ input, const T* __restrict__ rois,
                                        T spatial_scale, int64_t batch_size, int channels, int height, int width,
                                        int pooled_height, int pooled_width, T* __restrict__ output,
                                        int* __restrict__ argmax) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const OutputIndex o = output_index(index, channels, pooled_height, pooled_width);
    const T* roi = rois + 5 * o.n;
    if (!valid_roi(roi, batch_size)) {
      output[index] = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
      argmax[index] = -1;
      continue;
    }
    const int64_t b = static_cast<int64_t>(static_cast<double>(roi[0]));
    const PoolBin bin = roi_pool_bin<T>(roi, spatial_scale, o.ph, o.pw, pooled_height, pooled_width, height, width);
    const T* plane = input + (b * channels + o.c) * static_cast<int64_t>(height) * width;
    output[index] = bin_max(plane, bin, width, argmax + index);
  }
}

template <typename T>
__global__ void roi_pool_backward_kernel(int64_t total, const T* __restrict__ grad, int64_t sn, int64_t sc,
                                         int64_t sh, int64_t sw, const int* __restrict__ argmax,
                                         const T* __restrict__ rois, int64_t batch_size, int channels,
                                         int64_t plane_size, int pooled_height, int pooled_width,
                                         T* __restrict__ grad_input) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const OutputIndex o = output_index(index, channels, pooled_height, pooled_width);
    const int idx = argmax[index];
    const T* roi = rois + 5 * o.n;
    if (idx < 0 || idx >= plane_size || !valid_roi(roi, batch_size)) continue;
    const int64_t b = static_cast<int64_t>(static_cast<double>(roi[0]));
    gpuAtomicAdd(grad_input + (b * channels + o.c) * plane_size + idx,
                 grad[o.n * sn + o.c * sc + o.ph * sh + o.pw * sw]);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cuda(const at::Tensor& input_in, const at::Tensor& rois_in,
                                                         double spatial_scale, int64_t pooled_height,
                                                         int64_t pooled_width) {
  const c10::cuda::CUDAGuard guard(input_in.device());
  const at::Tensor input = input_in.contiguous();
  const at::Tensor rois = rois_in.to(input.scalar_type()).contiguous();
  const int64_t K = rois.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  at::Tensor output = at::zeros({K, C, pooled_height, pooled_width}, input.options());
  at::Tensor argmax = at::full({K, C, pooled_height, pooled_width}, -1, input.options().dtype(at::kInt));
  const int64_t total = output.numel();
  if (total == 0) return {output, argmax};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_pool_forward_cuda", [&] {
    roi_pool_forward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        total, input.const_data_ptr<scalar_t>(), rois.const_data_ptr<scalar_t>(),
        static_cast<scalar_t>(spatial_scale), input.size(0), static_cast<int>(C), static_cast<int>(H),
        static_cast<int>(W), static_cast<int>(pooled_height), static_cast<int>(pooled_width),
        output.data_ptr<scalar_t>(), argmax.data_ptr<int>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {output, argmax};
}

at::Tensor roi_pool_backward_cuda(const at::Tensor& grad, const at::Tensor& rois_in, const at::Tensor& argmax_in,
                                  int64_t batch_size, int64_t channels, int64_t height, int64_t width) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor rois = rois_in.to(grad.scalar_type()).contiguous();
  const at::Tensor argmax = argmax_in.contiguous();
  at::Tensor grad_input = at::zeros({batch_size, channels, height, width}, grad.options());
  const int64_t total = grad.numel();
  if (total == 0) return grad_input;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_pool_backward_cuda", [&] {
    roi_pool_backward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        total, grad.const_data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
        argmax.const_data_ptr<int>(), rois.const_data_ptr<scalar_t>(), batch_size, static_cast<int>(channels),
        height * width, static_cast<int>(grad.size(2)), static_cast<int>(grad.size(3)),
        grad_input.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_input;
}

}  // namespace mrcnn
