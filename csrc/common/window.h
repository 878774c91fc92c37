// The window ops (QMaxPool2d's argmax offsets) up to the backend's loop: argument checks, the
// output, the offset type. A backend defines Map<kToOffsets, in_t, out_t>::run(in, window, out),
// which writes window_offset (kToOffsets) or window_index of each element of `in` into `out`.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "codec.h"

namespace actnn {

// The Window of a max pooling's kernel, stride, padding and dilation (two ints each: rows,
// columns) over input planes `width` wide.
inline Window make_window(int64_t width, at::IntArrayRef kernel, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation) {
  const bool pairs = kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                     dilation.size() == 2;
  TORCH_CHECK(pairs && width > 0 && kernel[0] > 0 && kernel[1] > 0 && stride[0] > 0 &&
                  stride[1] > 0 && padding[0] >= 0 && padding[1] >= 0 && dilation[0] > 0 &&
                  dilation[1] > 0,
              "actnn_mm: window ops expect a positive width and pairs of positive kernel, "
              "stride and dilation and of non-negative padding");
  // Below 2^31 each, the positions computed from them (products of two) cannot overflow int64.
  constexpr int64_t kLimit = int64_t(1) << 31;
  const bool small = width < kLimit && kernel[0] < kLimit && kernel[1] < kLimit &&
                     stride[0] < kLimit && stride[1] < kLimit && padding[0] < kLimit &&
                     padding[1] < kLimit && dilation[0] < kLimit && dilation[1] < kLimit;
  TORCH_CHECK(small, "actnn_mm: window ops expect width, kernel, stride, padding and dilation "
              "below 2^31");
  return Window{width, kernel[1], stride[0], stride[1], padding[0], padding[1], dilation[0],
                dilation[1], 1.0 / double(width), 1.0 / double(kernel[1]),
                1.0 / double(dilation[0]), 1.0 / double(dilation[1])};
}

inline void check_window_offsets_args(const at::Tensor& indices, at::ScalarType dtype,
                                      at::IntArrayRef kernel) {
  TORCH_CHECK(indices.dim() == 4 && indices.is_contiguous() && indices.scalar_type() == at::kLong,
              "actnn_mm: window_offsets expects contiguous int64 (P, OH, OW, K) indices");
  TORCH_CHECK(dtype == at::kInt || (dtype == at::kByte && kernel.size() == 2 && kernel[0] > 0 &&
                                    kernel[0] <= 256 && kernel[1] <= 256 / kernel[0]),
              "actnn_mm: window_offsets returns int32, or uint8 for windows of at most 256");
}

// Calls f(T()) with T the C++ type of window offsets of `dtype` (uint8 or int32).
template <typename F>
void dispatch_offsets(at::ScalarType dtype, F&& f) {
  if (dtype == at::kByte) return f(uint8_t());
  return f(int32_t());
}

inline void check_window_indices_args(const at::Tensor& offsets) {
  TORCH_CHECK(offsets.dim() == 4 && offsets.is_contiguous() &&
                  (offsets.scalar_type() == at::kByte || offsets.scalar_type() == at::kInt),
              "actnn_mm: window_indices expects contiguous uint8 or int32 (P, OH, OW, K) "
              "offsets");
}

template <template <bool, typename, typename> class Map>
at::Tensor window_offsets_impl(const at::Tensor& indices, int64_t width, at::IntArrayRef kernel,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, at::ScalarType dtype) {
  check_window_offsets_args(indices, dtype, kernel);
  const Window w = make_window(width, kernel, stride, padding, dilation);
  at::Tensor out = at::empty(indices.sizes(), indices.options().dtype(dtype));
  dispatch_offsets(dtype,
                   [&](auto type) { Map<true, int64_t, decltype(type)>::run(indices, w, out); });
  return out;
}

template <template <bool, typename, typename> class Map>
at::Tensor window_indices_impl(const at::Tensor& offsets, int64_t width, at::IntArrayRef kernel,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation) {
  check_window_indices_args(offsets);
  const Window w = make_window(width, kernel, stride, padding, dilation);
  at::Tensor out = at::empty(offsets.sizes(), offsets.options().dtype(at::kLong));
  dispatch_offsets(offsets.scalar_type(),
                   [&](auto type) { Map<false, decltype(type), int64_t>::run(offsets, w, out); });
  return out;
}

}  // namespace actnn
