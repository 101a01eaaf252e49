// mrcnn::roi_align for quantized CPU tensors (quint8, qint8, qint32), as torchvision's quantized
// kernel accepts them: per-tensor affine input of one image, RoIs quantized to the input's dtype,
// output quantized with the input's scale and zero point.
//
// The arithmetic is torchvision's (qroi_align), so the results are the same integers: each bin
// sums weight * raw integer over its samples (the sampling geometry of roi_align_common.h, shared
// with the float kernels), then dequantizes once, scale * (sum - zero_point * sum of weights),
// averages, and requantizes with round-half-even and clamping. Dequantizing every value first and
// pooling floats, the obvious alternative, differs from it by one in a few percent of outputs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "roi_align.h"
#include "roi_align_common.h"

namespace mrcnn {
namespace {

// One bilinear sample: four pixel offsets in a (H, W) plane and their weights.
struct Tap {
  int64_t p1, p2, p3, p4;
  float w1, w2, w3, w4;
};

// The samples of every bin of one RoI, bin after bin; bin b owns [begin[b], begin[b + 1]).
void bin_taps(const RoiGeometry<float>& g, int64_t pooled_h, int64_t pooled_w, int64_t height, int64_t width,
              std::vector<int64_t>& begin, std::vector<Tap>& taps) {
  begin.assign(1, 0);
  taps.clear();
  for (int64_t ph = 0; ph < pooled_h; ++ph) {
    int64_t y_first, y_last;
    axis_range(g.start_h, g.bin_h, g.grid_h, ph, height, y_first, y_last);
    for (int64_t pw = 0; pw < pooled_w; ++pw) {
      int64_t x_first, x_last;
      axis_range(g.start_w, g.bin_w, g.grid_w, pw, width, x_first, x_last);
      for (int64_t iy = y_first; iy < y_last; ++iy) {
        int64_t y_lo, y_hi;
        float ly;
        // a sample off the map has zero weights in torchvision: adding it changes no sum
        if (!axis_sample(sample_position(g.start_h, g.bin_h, g.grid_h, ph, iy), height, y_lo, y_hi, ly)) continue;
        for (int64_t ix = x_first; ix < x_last; ++ix) {
          int64_t x_lo, x_hi;
          float lx;
          if (!axis_sample(sample_position(g.start_w, g.bin_w, g.grid_w, pw, ix), width, x_lo, x_hi, lx)) continue;
          const float hy = 1.f - ly, hx = 1.f - lx;
          taps.push_back({y_lo * width + x_lo, y_lo * width + x_hi, y_hi * width + x_lo, y_hi * width + x_hi,
                          hy * hx, hy * lx, ly * hx, ly * lx});
        }
      }
      begin.push_back(static_cast<int64_t>(taps.size()));
    }
  }
}

template <typename scalar_t>
void forward_quantized(const scalar_t* input, const float* rois, int64_t num_rois, int64_t channels,
                       int64_t height, int64_t width, int64_t pooled_h, int64_t pooled_w, float spatial_scale,
                       int64_t sampling_ratio, bool aligned, float scale, int64_t zero_point, scalar_t* output) {
  using raw_t = typename scalar_t::underlying;
  constexpr int64_t qmin = std::numeric_limits<raw_t>::min();
  constexpr int64_t qmax = std::numeric_limits<raw_t>::max();
  const float inv_scale = 1.0f / scale;
  const int64_t bins = pooled_h * pooled_w;
  at::parallel_for(0, num_rois, 1, [&](int64_t begin_roi, int64_t end_roi) {
    std::vector<int64_t> begin;
    std::vector<Tap> taps;
    for (int64_t k = begin_roi; k < end_roi; ++k) {
      const RoiGeometry<float> g =
          roi_geometry<float>(rois + k * 5, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned);
      bin_taps(g, pooled_h, pooled_w, height, width, begin, taps);
      for (int64_t c = 0; c < channels; ++c) {
        const scalar_t* plane = input + c * height * width;  // one image: batch index 0
        scalar_t* out = output + (k * channels + c) * bins;
        for (int64_t b = 0; b < bins; ++b) {
          float sum = 0.f, sum_w = 0.f;
          for (int64_t t = begin[b]; t < begin[b + 1]; ++t) {
            const Tap& s = taps[t];
            sum += s.w1 * static_cast<float>(plane[s.p1].val_) + s.w2 * static_cast<float>(plane[s.p2].val_) +
                   s.w3 * static_cast<float>(plane[s.p3].val_) + s.w4 * static_cast<float>(plane[s.p4].val_);
            sum_w += s.w1 + s.w2 + s.w3 + s.w4;
          }
          float value = scale * (sum - static_cast<float>(zero_point) * sum_w);
          value /= g.count;
          int64_t q = static_cast<int64_t>(zero_point + std::nearbyint(value * inv_scale));
          out[b] = scalar_t(static_cast<raw_t>(std::min(std::max(q, qmin), qmax)));
        }
      }
    }
  });
}

at::Tensor roi_align_quantized_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                   int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                                   bool aligned) {
  TORCH_CHECK_VALUE(input.dim() == 4, "roi_align: input must be 4-D (N, C, H, W), got shape ", input.sizes());
  TORCH_CHECK(input.qscheme() == at::kPerTensorAffine,
              "roi_align: quantized input must be per-tensor affine, got ", toString(input.qscheme()));
  // A quantized batch index is exact only for some scales: one image per batch, as torchvision.
  TORCH_CHECK_VALUE(input.size(0) == 1, "roi_align: quantized input must hold one image, got a batch of ",
                    input.size(0));
  TORCH_CHECK_VALUE(rois.dim() == 2 && rois.size(1) == 5,
                    "roi_align: rois must be a [K, 5] tensor of (batch_index, x0, y0, x1, y1), got shape ",
                    rois.sizes());
  TORCH_CHECK(rois.scalar_type() == input.scalar_type(), "roi_align: rois dtype ", rois.scalar_type(),
              " does not match the quantized input dtype ", input.scalar_type(),
              " (quantize the rois to the input's dtype)");
  TORCH_CHECK(rois.device() == input.device(), "roi_align: rois are on ", rois.device(),
              " but the feature map is on ", input.device());
  TORCH_CHECK_VALUE(pooled_height > 0 && pooled_width > 0, "roi_align: output_size must be positive, got (",
                    pooled_height, ", ", pooled_width, ")");
  TORCH_CHECK(rois.qscheme() == at::kPerTensorAffine, "roi_align: quantized rois must be per-tensor affine, got ",
              toString(rois.qscheme()));

  // The RoIs as torchvision's kernel reads them: each value dequantized on its own (ATen's
  // dequantize_val; Tensor.dequantize's vector code may round differently).
  at::Tensor float_rois = at::empty(rois.sizes(), rois.options().dtype(at::kFloat));
  float* r = float_rois.data_ptr<float>();
  AT_DISPATCH_QINT_TYPES(rois.scalar_type(), "roi_align_quantized_rois", [&] {
    const at::Tensor values = rois.contiguous();
    const scalar_t* q = values.data_ptr<scalar_t>();
    for (int64_t i = 0; i < values.numel(); ++i) r[i] = at::native::dequantize_val(rois.q_scale(), rois.q_zero_point(), q[i]);
  });
  for (int64_t k = 0; k < float_rois.size(0); ++k) {
    TORCH_CHECK_VALUE(r[k * 5] == 0.f, "roi_align: box ", k, " has batch index ", r[k * 5],
                      ", outside [0, 1) for a quantized input of one image");
  }

  const at::Tensor features = input.contiguous();
  at::Tensor output = at::_empty_affine_quantized({rois.size(0), input.size(1), pooled_height, pooled_width},
                                                  input.options(), input.q_scale(), input.q_zero_point());
  if (output.numel() == 0) return output;
  AT_DISPATCH_QINT_TYPES(input.scalar_type(), "roi_align_quantized", [&] {
    forward_quantized<scalar_t>(features.data_ptr<scalar_t>(), r, float_rois.size(0), input.size(1),
                                input.size(2), input.size(3), pooled_height, pooled_width,
                                static_cast<float>(spatial_scale), sampling_ratio, aligned,
                                static_cast<float>(input.q_scale()), input.q_zero_point(),
                                output.data_ptr<scalar_t>());
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(mrcnn, QuantizedCPU, m) {
  m.impl("roi_align", &roi_align_quantized_cpu);
}

}  // namespace mrcnn
