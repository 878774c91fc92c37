// Argument checks shared by the CPU and CUDA launchers: the ops can be called directly, so a bad
// argument must fail here rather than read or write out of bounds.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace actnn {

inline void check_stream_args(const at::Tensor& bits, const at::Tensor& offsets, int64_t n,
                              int64_t group_size, const at::Device& device) {
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0,
              "actnn_mm: group_size must be a positive multiple of 8, got ", group_size);
  TORCH_CHECK(bits.dim() == 1 && bits.size(0) == n && bits.scalar_type() == at::kByte,
              "actnn_mm: bits must be a uint8 tensor of shape (", n, ",)");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == n + 1 && offsets.scalar_type() == at::kLong,
              "actnn_mm: offsets must be an int64 tensor of shape (", n + 1, ",)");
  TORCH_CHECK(bits.device() == device && offsets.device() == device,
              "actnn_mm: bits and offsets must be on ", device);
  TORCH_CHECK(bits.is_contiguous() && offsets.is_contiguous(),
              "actnn_mm: bits and offsets must be contiguous");
}

inline void check_float_dtype(at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "actnn_mm: expected float32, float16 or bfloat16, got ", t);
}

// Instantiates a kernel for the three activation dtypes the codec accepts.
#define ACTNN_DISPATCH_FLOAT(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

inline void check_pack_bits(int64_t bits) {
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8,
              "actnn_mm: pack_bits takes 1, 2, 4 or 8 bits, got ", bits);
}

inline void check_pack_args(const at::Tensor& values, int64_t bits) {
  check_pack_bits(bits);
  TORCH_CHECK((values.scalar_type() == at::kByte || values.scalar_type() == at::kBool) &&
                  values.is_contiguous(),
              "actnn_mm: pack_bits expects a contiguous uint8 or bool tensor");
}

inline void check_unpack_args(const at::Tensor& packed, int64_t bits, int64_t numel) {
  check_pack_bits(bits);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() * (8 / bits) >= numel,
              "actnn_mm: unpack_bits expects a contiguous uint8 tensor holding ", numel, " values");
}

inline void check_pack_positive_args(const at::Tensor& values) {
  check_float_dtype(values.scalar_type());
  TORCH_CHECK(values.is_contiguous(), "actnn_mm: pack_positive expects contiguous values");
}

inline void check_apply_mask_args(const at::Tensor& values, const at::Tensor& mask) {
  check_float_dtype(values.scalar_type());
  TORCH_CHECK(values.is_contiguous() && mask.scalar_type() == at::kByte && mask.is_contiguous() &&
                  mask.numel() * 8 >= values.numel() && mask.device() == values.device(),
              "actnn_mm: apply_mask expects contiguous values and a contiguous uint8 mask of at "
              "least ", (values.numel() + 7) / 8, " bytes on the same device");
}

inline void check_apply_mask_transposed_args(const at::Tensor& values, const at::Tensor& mask) {
  check_apply_mask_args(values, mask);
  TORCH_CHECK(values.dim() == 3, "actnn_mm: apply_mask_transposed expects (N, cols, rows) values");
}

inline void check_batch_norm_args(const at::Tensor& grad, const at::Tensor& xh) {
  check_float_dtype(xh.scalar_type());
  TORCH_CHECK(xh.dim() == 2 && grad.sizes() == xh.sizes() &&
                  grad.scalar_type() == xh.scalar_type() && grad.device() == xh.device() &&
                  grad.is_contiguous() && xh.is_contiguous(),
              "actnn_mm: batch_norm ops expect a gradient and xh of one (rows, channels) shape, "
              "dtype and device, contiguous");
}

inline void check_batch_norm_coef(const at::Tensor& coef, const at::Tensor& xh) {
  TORCH_CHECK(coef.sizes() == at::IntArrayRef({3, xh.size(1)}) &&
                  coef.scalar_type() == at::kFloat && coef.is_contiguous() &&
                  coef.device() == xh.device(),
              "actnn_mm: batch_norm_combine expects a contiguous float32 coef of shape (3, ",
              xh.size(1), ") on the device of xh");
}

inline void check_row_stats_input(const at::Tensor& x) {
  check_float_dtype(x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(),
              "actnn_mm: the allocator's statistics expect a contiguous (N, M) tensor");
}

inline void check_mean_square_range_args(const at::Tensor& x, int64_t group_size,
                                         int64_t max_groups) {
  check_row_stats_input(x);
  TORCH_CHECK(group_size > 0 && max_groups > 0,
              "actnn_mm: mean_square_range needs a positive group_size and max_groups, got ",
              group_size, " and ", max_groups);
}

inline void check_sum_of_squares_args(const at::Tensor& x, int64_t max_values, int64_t blocks) {
  check_row_stats_input(x);
  TORCH_CHECK(blocks > 0 && max_values >= blocks,
              "actnn_mm: sum_of_squares needs 0 < blocks <= max_values, got ", blocks, " and ",
              max_values);
}

inline int64_t num_groups(int64_t sample_size, int64_t group_size) {
  return (sample_size + group_size - 1) / group_size;
}

inline void check_quantize_args(const at::Tensor& x, const at::Tensor& bits,
                                const at::Tensor& offsets, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(),
              "actnn_mm: quantize expects a contiguous (N, M) tensor");
  check_float_dtype(x.scalar_type());
  check_stream_args(bits, offsets, x.size(0), group_size, x.device());
}

inline void check_dequantize_args(const at::Tensor& data, const at::Tensor& meta,
                                  const at::Tensor& bits, const at::Tensor& offsets, int64_t n,
                                  int64_t sample_size, int64_t group_size, at::ScalarType dtype) {
  TORCH_CHECK(n >= 0 && sample_size >= 0, "actnn_mm: negative sizes");
  check_float_dtype(dtype);
  check_stream_args(bits, offsets, n, group_size, data.device());
  const int64_t groups = n * num_groups(sample_size, group_size);
  TORCH_CHECK(data.dim() == 1 && data.scalar_type() == at::kByte && data.is_contiguous(),
              "actnn_mm: data must be a contiguous uint8 vector");
  TORCH_CHECK(meta.sizes() == at::IntArrayRef({groups, 2}) &&
                  meta.scalar_type() == at::kBFloat16 && meta.is_contiguous(),
              "actnn_mm: meta must be a contiguous bfloat16 tensor of shape (", groups, ", 2)");
}

inline void check_dequantize_transposed_args(const at::Tensor& data, const at::Tensor& meta,
                                             const at::Tensor& bits, const at::Tensor& offsets,
                                             int64_t n, int64_t rows, int64_t cols,
                                             int64_t group_size, at::ScalarType dtype) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "actnn_mm: negative sizes");
  check_dequantize_args(data, meta, bits, offsets, n, rows * cols, group_size, dtype);
}

}  // namespace actnn
