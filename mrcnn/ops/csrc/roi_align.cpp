// Operator schemas, boundary checks, and the Python module stub for mrcnn._C.
//
// Four ops live in the `mrcnn` namespace. The single-level pair mirrors
// torchvision::roi_align; the multi-level pair pools RoIs from several feature
// maps in one launch, each RoI choosing its map through `levels`. Autograd and
// fake (meta) kernels are registered from Python (mrcnn/ops/_registration.py).
#include <Python.h>
#include <torch/library.h>

#include <cmath>

#include "roi_align.h"
#include "roi_align_common.h"

namespace mrcnn {

at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::vector<at::Tensor> gradient_accumulators(const at::Tensor& grad, at::IntArrayRef heights,
                                              at::IntArrayRef widths, int64_t batch_size,
                                              int64_t channels) {
  TORCH_CHECK_VALUE(grad.size(1) == channels, "roi_align_backward: grad has ", grad.size(1),
                    " channels, expected ", channels);
  std::vector<at::Tensor> buffers(heights.size());
  for (size_t l = 0; l < heights.size(); ++l) {
    buffers[l] = at::zeros({batch_size, heights[l], widths[l], channels},
                           grad.options().dtype(accumulate_type(grad.scalar_type())));
  }
  return buffers;
}

std::vector<at::Tensor> gradients_from_accumulators(const std::vector<at::Tensor>& accumulators,
                                                    at::ScalarType dtype, bool channels_last) {
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  std::vector<at::Tensor> result(accumulators.size());
  for (size_t l = 0; l < accumulators.size(); ++l) {
    result[l] = accumulators[l].permute({0, 3, 1, 2}).to(dtype).contiguous(format);
  }
  return result;
}

void check_rois(const char* op, const at::Tensor& rois, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(rois.dim() == 2 && rois.size(1) == 5, op,
                    ": rois must be a [K, 5] tensor of (batch_index, x0, y0, x1, y1), got shape ",
                    rois.sizes());
  TORCH_CHECK(rois.device() == ref.device(), op, ": rois are on ", rois.device(),
              " but the feature map is on ", ref.device());
  const auto rt = rois.scalar_type();
  const auto it = ref.scalar_type();
  const bool reduced = it == at::kHalf || it == at::kBFloat16;
  TORCH_CHECK(rt == it || (reduced && rt == at::kFloat), op, ": rois dtype ", rt,
              " does not match the feature map dtype ", it,
              " (rois must have the input's dtype; float16/bfloat16 inputs also accept float32 rois)");
}

static void check_levels(const char* op, const at::Tensor& levels, const at::Tensor& rois) {
  TORCH_CHECK_VALUE(levels.dim() == 1 && levels.size(0) == rois.size(0), op,
                    ": levels must be a 1-D tensor with one entry per RoI (", rois.size(0),
                    "), got shape ", levels.sizes());
  TORCH_CHECK(levels.scalar_type() == at::kLong, op, ": levels must be int64, got ",
              levels.scalar_type());
  TORCH_CHECK(levels.device() == rois.device(), op, ": levels are on ", levels.device(),
              " but rois are on ", rois.device());
}

static void check_pooling(const char* op, at::ArrayRef<double> scales, size_t num_levels,
                          int64_t pooled_height, int64_t pooled_width) {
  TORCH_CHECK_VALUE(pooled_height > 0 && pooled_width > 0, op,
                    ": output_size must be positive, got (", pooled_height, ", ", pooled_width, ")");
  TORCH_CHECK_VALUE(scales.size() == num_levels, op, ": got ", scales.size(),
                    " spatial scales for ", num_levels, " feature maps");
  for (double s : scales) {
    TORCH_CHECK_VALUE(std::isfinite(s) && s > 0, op, ": spatial_scale must be finite and positive, got ", s);
  }
}

void check_forward_args(const char* op, at::TensorList features, const at::Tensor& rois,
                        const at::Tensor& levels, at::ArrayRef<double> scales,
                        int64_t pooled_height, int64_t pooled_width) {
  TORCH_CHECK_VALUE(!features.empty() && features.size() <= static_cast<size_t>(kMaxLevels), op,
                    ": expected 1 to ", kMaxLevels, " feature maps, got ", features.size());
  const at::Tensor& first = features[0];
  for (size_t l = 0; l < features.size(); ++l) {
    const at::Tensor& f = features[l];
    TORCH_CHECK_VALUE(f.dim() == 4, op, ": feature map ", l, " must be 4-D (N, C, H, W), got shape ",
                      f.sizes());
    TORCH_CHECK(at::isFloatingType(f.scalar_type()), op, ": feature map ", l,
                " must be floating point, got ", f.scalar_type());
    TORCH_CHECK(f.device() == first.device(), op, ": feature map ", l, " is on ", f.device(),
                " but feature map 0 is on ", first.device());
    TORCH_CHECK(f.scalar_type() == first.scalar_type(), op, ": feature map ", l, " has dtype ",
                f.scalar_type(), " but feature map 0 has ", first.scalar_type());
    TORCH_CHECK_VALUE(f.size(0) == first.size(0) && f.size(1) == first.size(1), op,
                      ": feature maps must share batch size and channels; map ", l, " is ",
                      f.sizes(), ", map 0 is ", first.sizes());
  }
  check_rois(op, rois, first);
  if (levels.defined()) check_levels(op, levels, rois);
  check_pooling(op, scales, features.size(), pooled_height, pooled_width);
}

void check_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& rois,
                         const at::Tensor& levels, at::ArrayRef<double> scales,
                         int64_t pooled_height, int64_t pooled_width) {
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == rois.size(0) &&
                        grad.size(2) == pooled_height && grad.size(3) == pooled_width,
                    op, ": grad must be (K, C, ", pooled_height, ", ", pooled_width,
                    ") with K = number of rois, got ", grad.sizes());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), op, ": grad must be floating point");
  check_rois(op, rois, grad);
  if (levels.defined()) check_levels(op, levels, rois);
  check_pooling(op, scales, scales.size(), pooled_height, pooled_width);
}

namespace {

using Forward = at::Tensor (*)(at::TensorList, const at::Tensor&, const at::Tensor&,
                               at::ArrayRef<double>, int64_t, int64_t, int64_t, bool);
using Backward = std::vector<at::Tensor> (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             at::ArrayRef<double>, at::IntArrayRef, at::IntArrayRef,
                                             int64_t, int64_t, int64_t, int64_t, int64_t, bool, bool);

// Device-specific entry points, each a thin adapter over the multi-level kernels.
template <Forward kernel>
at::Tensor roi_align(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                     int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                     bool aligned) {
  const double scale_storage[1] = {spatial_scale};
  const at::ArrayRef<double> scales(scale_storage, 1);
  check_forward_args("roi_align", {input}, rois, at::Tensor(), scales, pooled_height, pooled_width);
  return kernel({input}, rois, at::Tensor(), scales, pooled_height, pooled_width, sampling_ratio,
                aligned);
}

template <Backward kernel>
at::Tensor roi_align_backward(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                              int64_t pooled_height, int64_t pooled_width, int64_t batch_size,
                              int64_t channels, int64_t height, int64_t width,
                              int64_t sampling_ratio, bool aligned, bool channels_last) {
  const double scale_storage[1] = {spatial_scale};
  const at::ArrayRef<double> scales(scale_storage, 1);
  const at::IntArrayRef heights(&height, 1);
  const at::IntArrayRef widths(&width, 1);
  check_backward_args("roi_align_backward", grad, rois, at::Tensor(), scales, pooled_height,
                      pooled_width);
  return kernel(grad, rois, at::Tensor(), scales, heights, widths, batch_size, channels,
                pooled_height, pooled_width, sampling_ratio, aligned, channels_last)[0];
}

template <Forward kernel>
at::Tensor multilevel_roi_align(at::TensorList features, const at::Tensor& rois,
                                const at::Tensor& levels, at::ArrayRef<double> spatial_scales,
                                int64_t pooled_height, int64_t pooled_width,
                                int64_t sampling_ratio, bool aligned) {
  check_forward_args("multilevel_roi_align", features, rois, levels, spatial_scales, pooled_height,
                     pooled_width);
  return kernel(features, rois, levels, spatial_scales, pooled_height, pooled_width,
                sampling_ratio, aligned);
}

template <Backward kernel>
std::vector<at::Tensor> multilevel_roi_align_backward(
    const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& levels,
    at::ArrayRef<double> spatial_scales, at::IntArrayRef heights, at::IntArrayRef widths,
    int64_t batch_size, int64_t channels, int64_t pooled_height, int64_t pooled_width,
    int64_t sampling_ratio, bool aligned, bool channels_last) {
  check_backward_args("multilevel_roi_align_backward", grad, rois, levels, spatial_scales,
                      pooled_height, pooled_width);
  TORCH_CHECK_VALUE(heights.size() == spatial_scales.size() && widths.size() == spatial_scales.size(),
                    "multilevel_roi_align_backward: heights, widths and spatial_scales must have one "
                    "entry per level");
  return kernel(grad, rois, levels, spatial_scales, heights, widths, batch_size, channels,
                pooled_height, pooled_width, sampling_ratio, aligned, channels_last);
}

}  // namespace

TORCH_LIBRARY(mrcnn, m) {
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
      "int sampling_ratio, bool aligned, bool channels_last) -> Tensor");
  m.def(
      "multilevel_roi_align(Tensor[] features, Tensor rois, Tensor levels, float[] spatial_scales, "
      "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "multilevel_roi_align_backward(Tensor grad, Tensor rois, Tensor levels, "
      "float[] spatial_scales, int[] heights, int[] widths, SymInt batch_size, SymInt channels, "
      "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, bool aligned, "
      "bool channels_last) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mrcnn, CPU, m) {
  m.impl("roi_align", &roi_align<multilevel_forward_cpu>);
  m.impl("roi_align_backward", &roi_align_backward<multilevel_backward_cpu>);
  m.impl("multilevel_roi_align", &multilevel_roi_align<multilevel_forward_cpu>);
  m.impl("multilevel_roi_align_backward", &multilevel_roi_align_backward<multilevel_backward_cpu>);
}

#ifdef MRCNN_WITH_CUDA
TORCH_LIBRARY_IMPL(mrcnn, CUDA, m) {
  m.impl("roi_align", &roi_align<multilevel_forward_cuda>);
  m.impl("roi_align_backward", &roi_align_backward<multilevel_backward_cuda>);
  m.impl("multilevel_roi_align", &multilevel_roi_align<multilevel_forward_cuda>);
  m.impl("multilevel_roi_align_backward", &multilevel_roi_align_backward<multilevel_backward_cuda>);
}
#endif

}  // namespace mrcnn

// `import mrcnn._C` loads this library, which registers the ops above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) {
#ifdef MRCNN_WITH_CUDA
    PyModule_AddIntConstant(module, "with_cuda", 1);
#else
    PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
  }
  return module;
}
