// Declarations shared by the op registration, the CPU kernels and the CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace mrcnn {

// Metadata checks done at the operator boundary on every device (no data reads,
// no host synchronisation). Throws ValueError/RuntimeError naming the problem.
// `levels` is undefined for the single-level op.
void check_forward_args(const char* op, at::TensorList features, const at::Tensor& rois,
                        const at::Tensor& levels, at::ArrayRef<double> spatial_scales,
                        int64_t pooled_height, int64_t pooled_width);

void check_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& rois,
                         const at::Tensor& levels, at::ArrayRef<double> spatial_scales,
                         int64_t pooled_height, int64_t pooled_width);

// rois: a [K, 5] tensor on ref's device, of ref's dtype (float32 also for reduced-precision ref).
void check_rois(const char* op, const at::Tensor& rois, const at::Tensor& ref);

// Reduced-precision inputs are pooled in float, double in double.
at::ScalarType accumulate_type(at::ScalarType input_type);

// Backward, both devices: zeroed (N, H, W, C) accumulators of the accumulation type,
// one per level, and their conversion into input gradients ((N, C, H, W), grad's dtype,
// channels-last when the input was).
std::vector<at::Tensor> gradient_accumulators(const at::Tensor& grad, at::IntArrayRef heights,
                                              at::IntArrayRef widths, int64_t batch_size,
                                              int64_t channels);
std::vector<at::Tensor> gradients_from_accumulators(const std::vector<at::Tensor>& accumulators,
                                                    at::ScalarType dtype, bool channels_last);

// Kernels. Single-level calls pass one feature map and an undefined `levels`.
at::Tensor multilevel_forward_cpu(at::TensorList features, const at::Tensor& rois,
                                  const at::Tensor& levels, at::ArrayRef<double> spatial_scales,
                                  int64_t pooled_height, int64_t pooled_width,
                                  int64_t sampling_ratio, bool aligned);
std::vector<at::Tensor> multilevel_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                                const at::Tensor& levels,
                                                at::ArrayRef<double> spatial_scales,
                                                at::IntArrayRef heights, at::IntArrayRef widths,
                                                int64_t batch_size, int64_t channels,
                                                int64_t pooled_height, int64_t pooled_width,
                                                int64_t sampling_ratio, bool aligned,
                                                bool channels_last);

#ifdef MRCNN_WITH_CUDA
at::Tensor multilevel_forward_cuda(at::TensorList features, const at::Tensor& rois,
                                   const at::Tensor& levels, at::ArrayRef<double> spatial_scales,
                                   int64_t pooled_height, int64_t pooled_width,
                                   int64_t sampling_ratio, bool aligned);
std::vector<at::Tensor> multilevel_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                                 const at::Tensor& levels,
                                                 at::ArrayRef<double> spatial_scales,
                                                 at::IntArrayRef heights, at::IntArrayRef widths,
                                                 int64_t batch_size, int64_t channels,
                                                 int64_t pooled_height, int64_t pooled_width,
                                                 int64_t sampling_ratio, bool aligned,
                                                 bool channels_last);
#endif

}  // namespace mrcnn
