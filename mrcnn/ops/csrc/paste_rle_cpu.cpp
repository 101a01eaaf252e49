// mrcnn::paste_masks_rle: paste, threshold and COCO-RLE-encode detection masks on the CPU.
//
// Each detection is computed only inside its clipped box, column by column (COCO RLE is
// column-major), and its run lengths are counted as the pixels are produced: no full-size
// mask and no box-sized buffer exist. The arithmetic is mrcnn/paste.py's emulation of
// torchvision's paste (ATen's CPU upsample_bilinear2d, align_corners=False, on the mask
// zero-padded by one), so the strings equal pycocotools.mask.encode of that paste > threshold
// byte for byte. Read paste.py's docstring for the formulas; the names here follow it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

// The non-fused formulas must round every product: no compiler contraction into FMA.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace mrcnn {
namespace {

constexpr int64_t kPadding = 1;
// ATen picks its channels-last bilinear kernel when out_h + out_w <= 128.
constexpr int64_t kSmallOutputSum = 128;
// Box coordinates must stay well inside int64 once expanded and converted.
constexpr float kMaxCoordinate = 1073741824.f;  // 2^30

// a * b + c as ATen computes it: one fused multiply-add in its FMA builds (emulated as in
// paste.py: the float product is exact in double, then one rounding of the sum), or two
// float roundings in its DEFAULT build.
template <bool Fused>
inline float madd(float a, float b, float c) {
  if constexpr (Fused) {
    return static_cast<float>(static_cast<double>(a) * static_cast<double>(b) + static_cast<double>(c));
  } else {
    return a * b + c;
  }
}

// Source indices and weights along one axis (ATen's area_pixel_compute_source_index and
// guard_index_and_lambda) for image positions first .. first + n - 1.
struct Axis {
  std::vector<int32_t> i0, i1;
  std::vector<float> l0, l1;

  template <bool Fused>
  void compute(int64_t first, int64_t n, int64_t box_start, int64_t box_size, int64_t in_size) {
    i0.resize(n);
    i1.resize(n);
    l0.resize(n);
    l1.resize(n);
    const float scale = static_cast<float>(in_size) / static_cast<float>(box_size);
    for (int64_t k = 0; k < n; ++k) {
      const float dst = static_cast<float>(first + k - box_start);
      float src = madd<Fused>(scale, dst + 0.5f, -0.5f);
      if (src < 0) src = 0;
      int64_t lo = static_cast<int64_t>(std::floor(src));
      if (lo > in_size - 1) lo = in_size - 1;
      float w1 = src - static_cast<float>(lo);
      w1 = w1 < 0.f ? 0.f : (w1 > 1.f ? 1.f : w1);
      i0[k] = static_cast<int32_t>(lo);
      i1[k] = static_cast<int32_t>(lo + (lo < in_size - 1 ? 1 : 0));
      l1[k] = w1;
      l0[k] = 1.f - w1;
    }
  }
};

// Collects where one mask's column-major flattening changes value, as its pixels arrive in
// order. Branch-free per pixel: random-looking masks change value every few pixels, and a
// mispredicted branch costs more than the pixel's arithmetic.
class Transitions {
 public:
  explicit Transitions(std::vector<int64_t>& buf) : buf_(buf) {}

  // Room for n more pixels: call before each column.
  void reserve(int64_t n) {
    if (static_cast<int64_t>(buf_.size()) < size_ + n + 1) buf_.resize(2 * (size_ + n + 1));
  }

  void pixel(int64_t pos, bool set) {
    buf_[size_] = pos;
    size_ += set != value_;
    value_ = set;
  }

  // The pixels from `pos` on are unset until the next pixel() call (pos < total).
  void zeros_from(int64_t pos) { pixel(pos, false); }

  // Run lengths over the H * W = total pixels: unset, set, unset, ... (the first may be 0).
  void counts(int64_t total, std::vector<int64_t>& out) const {
    out.resize(size_ + 1);
    int64_t last = 0;
    for (int64_t k = 0; k < size_; ++k) {
      out[k] = buf_[k] - last;
      last = buf_[k];
    }
    out[size_] = total - last;
  }

 private:
  std::vector<int64_t>& buf_;
  int64_t size_ = 0;
  bool value_ = false;
};

// pycocotools' rleToString: 5 bits a character, counts after the second stored as the
// difference to the count two before.
void append_coco_string(const std::vector<int64_t>& counts, std::string& out) {
  for (size_t i = 0; i < counts.size(); ++i) {
    int64_t x = counts[i];
    if (i > 2) x -= counts[i - 2];
    bool more = true;
    while (more) {
      int64_t c = x & 0x1f;
      x >>= 5;  // arithmetic shift, as in pycocotools
      more = (c & 0x10) ? x != -1 : x != 0;
      if (more) c |= 0x20;
      out.push_back(static_cast<char>(c + 48));
    }
  }
}

struct Box {
  int64_t x0, y0, w, h;    // the integer box torchvision pastes into
  int64_t xs, ys, xe, ye;  // clipped to the image: [xs, xe) x [ys, ye)
};

Box integer_box(const float* b, float expand, int64_t H, int64_t W) {
  // torchvision's expand_boxes, with its float32 operations in the same order.
  float w_half = (b[2] - b[0]) * 0.5f;
  float h_half = (b[3] - b[1]) * 0.5f;
  const float x_c = (b[2] + b[0]) * 0.5f;
  const float y_c = (b[3] + b[1]) * 0.5f;
  w_half *= expand;
  h_half *= expand;
  Box r;
  r.x0 = static_cast<int64_t>(x_c - w_half);
  r.y0 = static_cast<int64_t>(y_c - h_half);
  const int64_t x1 = static_cast<int64_t>(x_c + w_half);
  const int64_t y1 = static_cast<int64_t>(y_c + h_half);
  r.w = std::max<int64_t>(x1 - r.x0 + 1, 1);
  r.h = std::max<int64_t>(y1 - r.y0 + 1, 1);
  r.xs = std::max<int64_t>(r.x0, 0);
  r.ys = std::max<int64_t>(r.y0, 0);
  r.xe = std::min<int64_t>(x1 + 1, W);
  r.ye = std::min<int64_t>(y1 + 1, H);
  return r;
}

// Scratch space of one thread, reused across its detections.
struct Scratch {
  std::vector<float> padded, column;
  std::vector<int64_t> transitions, counts;
  Axis xa, ya;
};

template <bool Fused>
int64_t encode_one(const float* mask, int64_t M, const float* box, float expand, int64_t H, int64_t W,
                   float threshold, Scratch& s, std::string& out) {
  const int64_t Mp = M + 2 * kPadding;
  const Box b = integer_box(box, expand, H, W);
  Transitions runs(s.transitions);
  if (b.xe > b.xs && b.ye > b.ys) {
    s.padded.assign(Mp * Mp, 0.f);
    for (int64_t r = 0; r < M; ++r) {
      std::copy(mask + r * M, mask + (r + 1) * M, s.padded.data() + (r + kPadding) * Mp + kPadding);
    }
    const float* P = s.padded.data();
    const int64_t n_cols = b.xe - b.xs, n_rows = b.ye - b.ys;
    s.xa.compute<Fused>(b.xs, n_cols, b.x0, b.w, Mp);
    s.ya.compute<Fused>(b.ys, n_rows, b.y0, b.h, Mp);
    const Axis& xa = s.xa;
    const Axis& ya = s.ya;
    const bool small = b.h + b.w <= kSmallOutputSum;
    const bool gap = n_rows < H;  // then unset pixels separate this box's columns in the flattening
    s.column.resize(Mp);
    float* col = s.column.data();
    for (int64_t j = 0; j < n_cols; ++j) {
      const int64_t base = (b.xs + j) * H + b.ys;
      runs.reserve(n_rows + 1);
      const int32_t c0 = xa.i0[j], c1 = xa.i1[j];
      const float w0 = xa.l0[j], w1 = xa.l1[j];
      if (!small) {
        // ATen's separable kernel: along the row first (x0 * w0 + x1 * w1) for every source row...
        for (int64_t r = 0; r < Mp; ++r) {
          col[r] = madd<Fused>(P[r * Mp + c0], w0, P[r * Mp + c1] * w1);
        }
        // ...then down the column: t0 * h0 + t1 * h1.
        for (int64_t i = 0; i < n_rows; ++i) {
          const float t1h1 = col[ya.i1[i]] * ya.l1[i];
          const float v = madd<Fused>(col[ya.i0[i]], ya.l0[i], t1h1);
          runs.pixel(base + i, v > threshold);
        }
      } else {
        // ATen's channels-last kernel: corners x00, x01, x10, x11 with weights h * w, in that order.
        for (int64_t i = 0; i < n_rows; ++i) {
          const float h0 = ya.l0[i], h1 = ya.l1[i];
          const float* r0 = P + ya.i0[i] * Mp;
          const float* r1 = P + ya.i1[i] * Mp;
          float v = madd<Fused>(r0[c0], h0 * w0, r0[c1] * (h0 * w1));
          v = madd<Fused>(r1[c0], h1 * w0, v);
          v = madd<Fused>(r1[c1], h1 * w1, v);
          runs.pixel(base + i, v > threshold);
        }
      }
      if (gap && base + n_rows < H * W) runs.zeros_from(base + n_rows);
    }
    runs.reserve(1);
    if (b.xe * H < H * W) runs.zeros_from(b.xe * H);  // past the box's last column
  }
  runs.counts(H * W, s.counts);
  int64_t area = 0;
  for (size_t i = 1; i < s.counts.size(); i += 2) area += s.counts[i];
  append_coco_string(s.counts, out);
  return area;
}

// Returns (chars uint8, offsets int64 [N + 1], areas int64 [N]): detection n's COCO
// compressed RLE string is chars[offsets[n] : offsets[n + 1]].
std::tuple<at::Tensor, at::Tensor, at::Tensor> paste_masks_rle_cpu(const at::Tensor& masks_in,
                                                                   const at::Tensor& boxes_in,
                                                                   int64_t height, int64_t width,
                                                                   double threshold, bool fused) {
  TORCH_CHECK_VALUE(masks_in.dim() == 3 && masks_in.size(1) == masks_in.size(2) && masks_in.size(1) >= 1,
                    "paste_masks_rle: masks must be N x M x M, got shape ", masks_in.sizes());
  TORCH_CHECK_VALUE(masks_in.scalar_type() == at::kFloat, "paste_masks_rle: masks must be float32, got ",
                    masks_in.scalar_type());
  TORCH_CHECK_VALUE(boxes_in.dim() == 2 && boxes_in.size(0) == masks_in.size(0) && boxes_in.size(1) == 4,
                    "paste_masks_rle: boxes must be N x 4 with N = ", masks_in.size(0), ", got shape ",
                    boxes_in.sizes());
  TORCH_CHECK_VALUE(boxes_in.scalar_type() == at::kFloat, "paste_masks_rle: boxes must be float32, got ",
                    boxes_in.scalar_type());
  TORCH_CHECK_VALUE(height >= 1 && width >= 1, "paste_masks_rle: image size must be positive, got (",
                    height, ", ", width, ")");
  TORCH_CHECK_VALUE(masks_in.size(1) < (1 << 20), "paste_masks_rle: masks of side ", masks_in.size(1),
                    " are too large");
  const at::Tensor masks = masks_in.contiguous();
  const at::Tensor boxes = boxes_in.contiguous();
  const int64_t N = masks.size(0), M = masks.size(1);
  const float* mask_data = masks.const_data_ptr<float>();
  const float* box_data = boxes.const_data_ptr<float>();
  for (int64_t k = 0; k < 4 * N; ++k) {
    const float v = box_data[k];
    TORCH_CHECK_VALUE(std::isfinite(v) && std::fabs(v) < kMaxCoordinate,
                      "paste_masks_rle: box ", k / 4, " has coordinate ", v,
                      " (boxes must be finite, within 2^30 pixels)");
  }
  // The paste's padding grows the box by (M + 2) / M; ATen applies the scalar in float32.
  const float expand = static_cast<float>(static_cast<double>(M + 2 * kPadding) / static_cast<double>(M));
  const float thr = static_cast<float>(threshold);
  std::vector<std::string> strings(N);
  auto areas = at::empty({N}, at::kLong);
  int64_t* area_data = areas.data_ptr<int64_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t n = begin; n < end; ++n) {
      const float* mask = mask_data + n * M * M;
      const float* box = box_data + 4 * n;
      area_data[n] = fused ? encode_one<true>(mask, M, box, expand, height, width, thr, scratch, strings[n])
                           : encode_one<false>(mask, M, box, expand, height, width, thr, scratch, strings[n]);
    }
  });
  auto offsets = at::empty({N + 1}, at::kLong);
  int64_t* off = offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t n = 0; n < N; ++n) off[n + 1] = off[n] + static_cast<int64_t>(strings[n].size());
  auto chars = at::empty({off[N]}, at::kByte);
  uint8_t* dst = chars.data_ptr<uint8_t>();
  for (int64_t n = 0; n < N; ++n) std::copy(strings[n].begin(), strings[n].end(), dst + off[n]);
  return {chars, offsets, areas};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mrcnn, m) {
  m.def(
      "paste_masks_rle(Tensor masks, Tensor boxes, int height, int width, float threshold, bool fused) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mrcnn, CPU, m) {
  m.impl("paste_masks_rle", &paste_masks_rle_cpu);
}

}  // namespace mrcnn
