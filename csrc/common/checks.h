// Argument checks of every backend, in one place: the ops can be called directly, so a bad
// argument must fail before any memory is touched, with an error that names actnn_mm.
//
// Shapes, dtypes, devices, contiguity and sizes are checked on the host by every launcher (the
// CPU and CUDA ones call the same functions). The values of a compressed stream's widths and
// offsets are data: the CPU kernels check them on the host (check_stream_values); on CUDA reading
// them would make the host wait for the GPU, so the kernels check each sample's stream with
// sample_stream_fits before touching its bytes (CUDA_KERNEL_ASSERT, and a sample that fails is
// neither read nor written).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include "codec.h"

namespace actnn {

ACTNN_HD bool valid_bits(int bits) { return bits == 1 || bits == 2 || bits == 4 || bits == 8; }

// ceil(sample_size * bits / 8): the bytes of a sample's packed values, for any sample_size >= 0.
ACTNN_HD int64_t stream_bytes(int64_t sample_size, int bits) {
  return sample_size / 8 * bits + ceil_div(sample_size % 8 * bits, 8);
}

// Whether a sample's stream, bytes [begin, end) of a buffer of total_bytes, has a width of the
// format and room for its sample_size values. Bytes past a stream's values (up to the next
// stream, or the buffer's end) are slack: quantize zeroes them and nothing reads them.
ACTNN_HD bool sample_stream_fits(int bits, int64_t begin, int64_t end, int64_t sample_size,
                                 int64_t total_bytes) {
  return valid_bits(bits) && begin >= 0 && end >= begin && end <= total_bytes &&
         end - begin >= stream_bytes(sample_size, bits);
}

inline int64_t num_groups(int64_t sample_size, int64_t group_size) {
  return ceil_div(sample_size, group_size);
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

// n samples of sample_size values, given as numbers (not read from a tensor's shape).
inline void check_sizes(int64_t n, int64_t sample_size) {
  int64_t numel = 0;
  TORCH_CHECK(n >= 0 && sample_size >= 0 && !c10::mul_overflows(n, sample_size, &numel),
              "actnn_mm: expected non-negative sizes whose product fits in int64, got ", n,
              " samples of ", sample_size, " values");
}

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

// What can be checked of a stream's size without reading its offsets: every sample's stream
// holds at least ceil(sample_size / 8) bytes (1 bit per value) and streams do not overlap.
inline void check_stream_size(int64_t n, int64_t sample_size, int64_t total_bytes) {
  TORCH_CHECK(total_bytes >= 0, "actnn_mm: total_bytes must be non-negative, got ", total_bytes);
  const int64_t least = n * stream_bytes(sample_size, 1);  // <= n * sample_size: no overflow
  TORCH_CHECK(least <= total_bytes, "actnn_mm: ", n, " samples of ", sample_size,
              " values need at least ", least, " bytes of data, got ", total_bytes);
}

// The host's check of every sample's sample_stream_fits (offsets[0] >= 0, each stream in order
// and long enough, the last ending within the data), with an error naming the first that fails.
inline void check_stream_values(const uint8_t* bits, const int64_t* offsets, int64_t n,
                                int64_t sample_size, int64_t total_bytes) {
  TORCH_CHECK(offsets[0] >= 0, "actnn_mm: offsets must not be negative, got ", offsets[0]);
  for (int64_t i = 0; i < n; ++i) {
    const int b = bits[i];
    TORCH_CHECK(valid_bits(b), "actnn_mm: bit width ", b, " of sample ", i,
                " is not one of 1, 2, 4, 8");
    const int64_t need = stream_bytes(sample_size, b);
    TORCH_CHECK(offsets[i + 1] >= offsets[i] && offsets[i + 1] - offsets[i] >= need,
                "actnn_mm: offsets leave sample ", i, " too little room: bytes ", offsets[i],
                " to ", offsets[i + 1], " for ", need, " bytes of values");
  }
  TORCH_CHECK(offsets[n] <= total_bytes, "actnn_mm: offsets point past the data (", offsets[n],
              " > ", total_bytes, " bytes)");
}

inline void check_quantize_args(const at::Tensor& x, const at::Tensor& bits,
                                const at::Tensor& offsets, int64_t group_size,
                                int64_t total_bytes) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(),
              "actnn_mm: quantize expects a contiguous (N, M) tensor");
  check_float_dtype(x.scalar_type());
  check_stream_args(bits, offsets, x.size(0), group_size, x.device());
  check_stream_size(x.size(0), x.size(1), total_bytes);
}

inline void check_dequantize_args(const at::Tensor& data, const at::Tensor& meta,
                                  const at::Tensor& sample_meta, const at::Tensor& bits,
                                  const at::Tensor& offsets, int64_t n, int64_t sample_size,
                                  int64_t group_size, at::ScalarType dtype) {
  check_sizes(n, sample_size);
  check_float_dtype(dtype);
  check_stream_args(bits, offsets, n, group_size, data.device());
  const int64_t groups = n * num_groups(sample_size, group_size);
  TORCH_CHECK(data.dim() == 1 && data.scalar_type() == at::kByte && data.is_contiguous(),
              "actnn_mm: data must be a contiguous uint8 vector");
  TORCH_CHECK(meta.sizes() == at::IntArrayRef({groups, 2}) && meta.scalar_type() == at::kByte &&
                  meta.is_contiguous() && meta.device() == data.device(),
              "actnn_mm: meta must be a contiguous uint8 tensor of shape (", groups, ", 2) on ",
              data.device());
  TORCH_CHECK(sample_meta.sizes() == at::IntArrayRef({n, 2}) &&
                  sample_meta.scalar_type() == at::kFloat && sample_meta.is_contiguous() &&
                  sample_meta.device() == data.device(),
              "actnn_mm: sample_meta must be a contiguous float32 tensor of shape (", n, ", 2) on ",
              data.device());
  check_stream_size(n, sample_size, data.numel());
}

inline void check_dequantize_transposed_args(const at::Tensor& data, const at::Tensor& meta,
                                             const at::Tensor& sample_meta,
                                             const at::Tensor& bits, const at::Tensor& offsets,
                                             int64_t n, int64_t rows, int64_t cols,
                                             int64_t group_size, at::ScalarType dtype) {
  check_sizes(rows, cols);
  check_dequantize_args(data, meta, sample_meta, bits, offsets, n, rows * cols, group_size,
                        dtype);
}

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
  TORCH_CHECK(numel >= 0, "actnn_mm: unpack_bits expects a non-negative numel, got ", numel);
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

}  // namespace actnn
