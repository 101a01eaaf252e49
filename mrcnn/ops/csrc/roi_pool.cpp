// mrcnn::roi_pool: schemas, boundary checks and the CPU kernels.
//
// RoIPool (Girshick, Fast R-CNN), the row RoIAlign replaced in Mask R-CNN's ablation: box
// corners rounded to the feature grid, bins of roi / output cells with floor/ceil edges, the
// maximum of each bin. Results and argmax equal torchvision::roi_pool's (same arithmetic in the
// input's type, the first maximum in row-major order wins a tie, an empty bin gives 0 and -1).
// Forward runs in parallel over RoIs; backward over channels, each thread visiting the RoIs in
// order, so gradients are deterministic and summed in torchvision's order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "roi_align.h"
#include "roi_pool.h"

namespace mrcnn {
namespace {

void check_roi_pool_args(const char* op, const at::Tensor& input, const at::Tensor& rois,
                         double spatial_scale, int64_t pooled_height, int64_t pooled_width) {
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must be 4-D (N, C, H, W), got shape ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op, ": input must be floating point, got ",
              input.scalar_type());
  check_rois(op, rois, input);
  TORCH_CHECK_VALUE(pooled_height > 0 && pooled_width > 0, op, ": output_size must be positive, got (",
                    pooled_height, ", ", pooled_width, ")");
  TORCH_CHECK_VALUE(std::isfinite(spatial_scale) && spatial_scale > 0, op,
                    ": spatial_scale must be finite and positive, got ", spatial_scale);
  TORCH_CHECK_VALUE(input.size(2) * input.size(3) < (int64_t{1} << 31), op,
                    ": feature maps of ", input.size(2), " x ", input.size(3), " are too large for int32 argmax");
}

template <typename T>
void check_roi_values(const char* op, const T* rois, int64_t num_rois, int64_t batch_size) {
  for (int64_t k = 0; k < num_rois; ++k) {
    const T* r = rois + 5 * k;
    bool finite = true;
    for (int j = 0; j < 5; ++j) finite = finite && std::isfinite(static_cast<double>(r[j]));
    TORCH_CHECK_VALUE(finite, op, ": box ", k, " has non-finite values (", static_cast<double>(r[0]), ", ",
                      static_cast<double>(r[1]), ", ", static_cast<double>(r[2]), ", ", static_cast<double>(r[3]),
                      ", ", static_cast<double>(r[4]), ")");
    const double b = static_cast<double>(r[0]);
    TORCH_CHECK_VALUE(b >= 0 && b < static_cast<double>(batch_size), op, ": box ", k, " has batch index ", b,
                      ", outside [0, ", batch_size, ") for a batch of ", batch_size, " images");
  }
}

template <typename T>
void forward_kernel(const T* input, const T* rois, T spatial_scale, int64_t num_rois, int channels,
                    int height, int width, int pooled_height, int pooled_width, T* output, int* argmax) {
  at::parallel_for(0, num_rois, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* roi = rois + 5 * n;
      const int64_t b = static_cast<int64_t>(static_cast<double>(roi[0]));
      for (int ph = 0; ph < pooled_height; ++ph) {
        for (int pw = 0; pw < pooled_width; ++pw) {
          const PoolBin bin = roi_pool_bin<T>(roi, spatial_scale, ph, pw, pooled_height, pooled_width, height, width);
          for (int c = 0; c < channels; ++c) {
            const T* plane = input + (b * channels + c) * static_cast<int64_t>(height) * width;
            const int64_t o = ((n * channels + c) * pooled_height + ph) * pooled_width + pw;
            output[o] = bin_max(plane, bin, width, argmax + o);
          }
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(const T* grad, at::IntArrayRef grad_strides, const int* argmax, const T* rois,
                     int64_t num_rois, int64_t channels, int64_t plane_size, int pooled_height,
                     int pooled_width, T* grad_input) {
  const int64_t sn = grad_strides[0], sc = grad_strides[1], sh = grad_strides[2], sw = grad_strides[3];
  at::parallel_for(0, channels, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      for (int64_t n = 0; n < num_rois; ++n) {
        const int64_t b = static_cast<int64_t>(static_cast<double>(rois[5 * n]));
        T* plane = grad_input + (b * channels + c) * plane_size;
        const int* arg = argmax + (n * channels + c) * pooled_height * pooled_width;
        for (int ph = 0; ph < pooled_height; ++ph) {
          for (int pw = 0; pw < pooled_width; ++pw) {
            const int idx = arg[ph * pooled_width + pw];
            if (idx != -1) plane[idx] += grad[n * sn + c * sc + ph * sh + pw * sw];
          }
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cpu(const at::Tensor& input_in, const at::Tensor& rois_in,
                                                        double spatial_scale, int64_t pooled_height,
                                                        int64_t pooled_width) {
  const at::Tensor input = input_in.contiguous();
  const at::Tensor rois = rois_in.to(input.scalar_type()).contiguous();
  const int64_t K = rois.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  at::Tensor output = at::zeros({K, C, pooled_height, pooled_width}, input.options());
  at::Tensor argmax = at::full({K, C, pooled_height, pooled_width}, -1, input.options().dtype(at::kInt));
  if (output.numel() == 0) return {output, argmax};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_pool_forward_cpu", [&] {
    check_roi_values("roi_pool", rois.const_data_ptr<scalar_t>(), K, input.size(0));
    forward_kernel<scalar_t>(input.const_data_ptr<scalar_t>(), rois.const_data_ptr<scalar_t>(),
                             static_cast<scalar_t>(spatial_scale), K, C, H, W, pooled_height, pooled_width,
                             output.data_ptr<scalar_t>(), argmax.data_ptr<int>());
  });
  return {output, argmax};
}

at::Tensor roi_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& rois_in, const at::Tensor& argmax_in,
                                 int64_t batch_size, int64_t channels, int64_t height, int64_t width) {
  const at::Tensor rois = rois_in.to(grad.scalar_type()).contiguous();
  const at::Tensor argmax = argmax_in.contiguous();
  at::Tensor grad_input = at::zeros({batch_size, channels, height, width}, grad.options());
  if (grad.numel() == 0) return grad_input;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_pool_backward_cpu", [&] {
    check_roi_values("roi_pool_backward", rois.const_data_ptr<scalar_t>(), rois.size(0), batch_size);
    backward_kernel<scalar_t>(grad.const_data_ptr<scalar_t>(), grad.strides(), argmax.const_data_ptr<int>(),
                              rois.const_data_ptr<scalar_t>(), rois.size(0), channels, height * width,
                              static_cast<int>(grad.size(2)), static_cast<int>(grad.size(3)),
                              grad_input.data_ptr<scalar_t>());
  });
  return grad_input;
}

namespace {

void check_backward(const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax,
                    int64_t pooled_height, int64_t pooled_width, int64_t channels) {
  const char* op = "roi_pool_backward";
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), op, ": grad must be floating point");
  check_rois(op, rois, grad);
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                        grad.size(2) == pooled_height && grad.size(3) == pooled_width,
                    op, ": grad must be (K, C, ", pooled_height, ", ", pooled_width, ") with K = ", rois.size(0),
                    " rois and C = ", channels, ", got ", grad.sizes());
  TORCH_CHECK_VALUE(argmax.sizes() == grad.sizes() && argmax.scalar_type() == at::kInt &&
                        argmax.device() == grad.device(),
                    op, ": argmax must be the forward's int32 tensor of grad's shape and device, got ",
                    argmax.scalar_type(), " ", argmax.sizes(), " on ", argmax.device());
}

template <std::tuple<at::Tensor, at::Tensor> (*kernel)(const at::Tensor&, const at::Tensor&, double, int64_t, int64_t)>
std::tuple<at::Tensor, at::Tensor> roi_pool(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                            int64_t pooled_height, int64_t pooled_width) {
  check_roi_pool_args("roi_pool", input, rois, spatial_scale, pooled_height, pooled_width);
  return kernel(input, rois, spatial_scale, pooled_height, pooled_width);
}

template <at::Tensor (*kernel)(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
                               int64_t)>
at::Tensor roi_pool_backward(const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax,
                             double spatial_scale, int64_t pooled_height, int64_t pooled_width, int64_t batch_size,
                             int64_t channels, int64_t height, int64_t width) {
  (void)spatial_scale;  // the bins are in argmax; kept in the schema as torchvision's op has it
  check_backward(grad, rois, argmax, pooled_height, pooled_width, channels);
  return kernel(grad, rois, argmax, batch_size, channels, height, width);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mrcnn, m) {
  m.def("roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
        "-> (Tensor, Tensor)");
  m.def("roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor");
}

TORCH_LIBRARY_IMPL(mrcnn, CPU, m) {
  m.impl("roi_pool", &roi_pool<roi_pool_forward_cpu>);
  m.impl("roi_pool_backward", &roi_pool_backward<roi_pool_backward_cpu>);
}

#ifdef MRCNN_WITH_CUDA
TORCH_LIBRARY_IMPL(mrcnn, CUDA, m) {
  m.impl("roi_pool", &roi_pool<roi_pool_forward_cuda>);
  m.impl("roi_pool_backward", &roi_pool_backward<roi_pool_backward_cuda>);
}
#endif

}  // namespace mrcnn
