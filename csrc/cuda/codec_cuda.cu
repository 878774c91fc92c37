// CUDA kernels: thin launchers over the shared math in common/codec.h (the same functions the
// CPU kernels run and the tests check against the reference).
#include <c10/cuda/CUDAException.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/codec.h"
#include "../common/window.h"

namespace actnn {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t threads) {
  return int(std::min<int64_t>((threads + kThreads - 1) / kThreads, 65535 * 8));
}

#define ACTNN_GRID_STRIDE_LOOP(i, total)                                              \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (total); \
       i += int64_t(blockDim.x) * gridDim.x)

// One warp per group: lanes read the group coalesced, then reduce min and max.
template <typename scalar_t>
__global__ void group_params_kernel(const scalar_t* x, const uint8_t* bits, int64_t sample_size,
                                    int64_t group_size, int64_t groups_per_sample, int64_t groups,
                                    uint16_t* meta) {
  const int lane = threadIdx.x % 32;
  ACTNN_GRID_STRIDE_LOOP(t, groups * 32) {
    const int64_t group = t / 32;
    const int64_t n = group / groups_per_sample;
    const int64_t start = (group % groups_per_sample) * group_size;
    const int64_t len = sample_size - start < group_size ? sample_size - start : group_size;
    const scalar_t* xg = x + n * sample_size + start;
    float lo = float(xg[0]), hi = lo;
    for (int64_t j = lane; j < len; j += 32) {
      lo = min_nan(lo, float(xg[j]));
      hi = max_nan(hi, float(xg[j]));
    }
    for (int delta = 16; delta > 0; delta /= 2) {
      lo = min_nan(lo, __shfl_xor_sync(0xffffffffu, lo, delta));
      hi = max_nan(hi, __shfl_xor_sync(0xffffffffu, hi, delta));
    }
    if (lane == 0) {
      const GroupParams p = group_params(lo, hi, (1 << bits[n]) - 1);
      meta[2 * group] = p.min_bits;
      meta[2 * group + 1] = p.scale_bits;
    }
  }
}

// One thread per output byte (a sample's stream is at most sample_size bytes long, at 8 bits).
template <typename scalar_t>
__global__ void pack_kernel(const scalar_t* x, const uint8_t* bits, const int64_t* offsets,
                            const uint16_t* meta, int64_t n, int64_t sample_size,
                            int64_t group_size, int64_t groups_per_sample, RngKey key,
                            bool stochastic, uint8_t* data) {
  ACTNN_GRID_STRIDE_LOOP(t, n * sample_size) {
    const int64_t s = t / sample_size, k = t % sample_size;
    const int b = bits[s];
    if (k * 8 >= sample_size * b) continue;
    const int per_byte = 8 / b, max_level = (1 << b) - 1;
    uint32_t byte = 0;
    for (int i = 0; i < per_byte && k * per_byte + i < sample_size; ++i) {
      const int64_t j = k * per_byte + i;
      const int64_t group = s * groups_per_sample + j / group_size;
      const float mn = bf16_to_float(meta[2 * group]);
      const float inv_scale = reciprocal(bf16_to_float(meta[2 * group + 1]));
      const int64_t index = s * sample_size + j;
      const float u = stochastic ? uniform(key, uint64_t(index)) : 0.5f;
      byte |= quantize_value(float(x[index]), mn, inv_scale, max_level, u) << (i * b);
    }
    data[offsets[s] + k] = uint8_t(byte);
  }
}

// Output element t is value j of its sample, which is a (rows, cols) matrix written transposed
// (rows = 1: dequantize, in order).
template <typename scalar_t>
__global__ void dequantize_kernel(const uint8_t* data, const uint16_t* meta, const uint8_t* bits,
                                  const int64_t* offsets, int64_t n, int64_t rows, int64_t cols,
                                  int64_t group_size, int64_t groups_per_sample, scalar_t* out) {
  const int64_t sample_size = rows * cols;
  ACTNN_GRID_STRIDE_LOOP(t, n * sample_size) {
    const int64_t s = t / sample_size, k = t % sample_size;
    const int64_t j = (k % rows) * cols + k / rows;
    const int64_t group = s * groups_per_sample + j / group_size;
    const float mn = bf16_to_float(meta[2 * group]), scale = bf16_to_float(meta[2 * group + 1]);
    out[t] = scalar_t(dequantize_value(unpack_value(data + offsets[s], j, bits[s]), mn, scale));
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& x, const at::Tensor& bits,
                                                 const at::Tensor& offsets, int64_t group_size,
                                                 int64_t seed, bool stochastic,
                                                 int64_t total_bytes) {
  check_quantize_args(x, bits, offsets, group_size);
  const int64_t n = x.size(0), sample_size = x.size(1);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t groups_per_sample = num_groups(sample_size, group_size);
  const int64_t groups = n * groups_per_sample;
  at::Tensor data = at::zeros({total_bytes}, x.options().dtype(at::kByte));
  at::Tensor meta = at::empty({groups, 2}, x.options().dtype(at::kBFloat16));
  if (groups == 0) return {data, meta};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const RngKey key = rng_key(uint64_t(seed));
  ACTNN_DISPATCH_FLOAT(x.scalar_type(), "actnn_quantize_cuda", [&] {
    uint16_t* mp = reinterpret_cast<uint16_t*>(meta.data_ptr<at::BFloat16>());
    group_params_kernel<scalar_t><<<blocks_for(groups * 32), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), bits.const_data_ptr<uint8_t>(), sample_size, group_size,
        groups_per_sample, groups, mp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pack_kernel<scalar_t><<<blocks_for(n * sample_size), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), bits.const_data_ptr<uint8_t>(),
        offsets.const_data_ptr<int64_t>(), mp, n, sample_size, group_size, groups_per_sample, key,
        stochastic, data.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {data, meta};
}

at::Tensor dequantize_transposed_cuda(const at::Tensor& data, const at::Tensor& meta,
                                      const at::Tensor& bits, const at::Tensor& offsets,
                                      int64_t n, int64_t rows, int64_t cols, int64_t group_size,
                                      at::ScalarType dtype) {
  check_dequantize_transposed_args(data, meta, bits, offsets, n, rows, cols, group_size, dtype);
  const int64_t groups_per_sample = num_groups(rows * cols, group_size);
  c10::cuda::CUDAGuard guard(data.device());
  at::Tensor out = at::empty({n, cols, rows}, data.options().dtype(dtype));
  if (out.numel() == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ACTNN_DISPATCH_FLOAT(dtype, "actnn_dequantize_cuda", [&] {
    dequantize_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        data.const_data_ptr<uint8_t>(),
        reinterpret_cast<const uint16_t*>(meta.const_data_ptr<at::BFloat16>()),
        bits.const_data_ptr<uint8_t>(), offsets.const_data_ptr<int64_t>(), n, rows, cols,
        group_size, groups_per_sample, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor dequantize_cuda(const at::Tensor& data, const at::Tensor& meta, const at::Tensor& bits,
                           const at::Tensor& offsets, int64_t n, int64_t sample_size,
                           int64_t group_size, at::ScalarType dtype) {
  return dequantize_transposed_cuda(data, meta, bits, offsets, n, 1, sample_size, group_size,
                                    dtype).view({n, sample_size});
}

__global__ void pack_bits_kernel(const uint8_t* values, int64_t count, int bits, int64_t bytes,
                                 uint8_t* out) {
  ACTNN_GRID_STRIDE_LOOP(k, bytes) { out[k] = pack_byte(values, count, k, bits); }
}

__global__ void unpack_bits_kernel(const uint8_t* packed, int bits, int64_t numel, uint8_t* out) {
  ACTNN_GRID_STRIDE_LOOP(j, numel) { out[j] = uint8_t(unpack_value(packed, j, bits)); }
}

at::Tensor pack_bits_cuda(const at::Tensor& values, int64_t bits) {
  check_pack_args(values, bits);
  c10::cuda::CUDAGuard guard(values.device());
  const int64_t count = values.numel(), per_byte = 8 / bits;
  at::Tensor packed =
      at::empty({(count + per_byte - 1) / per_byte}, values.options().dtype(at::kByte));
  if (packed.numel() == 0) return packed;
  pack_bits_kernel<<<blocks_for(packed.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint8_t*>(values.const_data_ptr()), count, int(bits), packed.numel(),
      packed.data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return packed;
}

at::Tensor unpack_bits_cuda(const at::Tensor& packed, int64_t bits, int64_t numel) {
  check_unpack_args(packed, bits, numel);
  c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor values = at::empty({numel}, packed.options());
  if (numel == 0) return values;
  unpack_bits_kernel<<<blocks_for(numel), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      packed.const_data_ptr<uint8_t>(), int(bits), numel, values.data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return values;
}

template <typename scalar_t>
__global__ void pack_positive_kernel(const scalar_t* values, int64_t numel, int64_t bytes,
                                     uint8_t* out) {
  ACTNN_GRID_STRIDE_LOOP(k, bytes) {
    uint32_t byte = 0;
    for (int i = 0; i < 8 && 8 * k + i < numel; ++i)
      byte |= positive_bit(float(values[8 * k + i])) << i;
    out[k] = uint8_t(byte);
  }
}

at::Tensor pack_positive_cuda(const at::Tensor& values) {
  check_pack_positive_args(values);
  c10::cuda::CUDAGuard guard(values.device());
  at::Tensor packed = at::empty({(values.numel() + 7) / 8}, values.options().dtype(at::kByte));
  if (packed.numel() == 0) return packed;
  ACTNN_DISPATCH_FLOAT(values.scalar_type(), "actnn_pack_positive_cuda", [&] {
    pack_positive_kernel<scalar_t><<<blocks_for(packed.numel()), kThreads, 0,
                                     c10::cuda::getCurrentCUDAStream()>>>(
        values.const_data_ptr<scalar_t>(), values.numel(), packed.numel(),
        packed.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return packed;
}

// Value t of sample s is element (k / rows, k % rows) of its (cols, rows) matrix, whose mask bit is
// at (k % rows, k / rows) of the (rows, cols) one (rows = 1: apply_mask, in order).
template <typename scalar_t>
__global__ void apply_mask_kernel(const scalar_t* values, const uint8_t* mask, float scale,
                                  int64_t numel, int64_t rows, int64_t cols, scalar_t* out) {
  const int64_t sample_size = rows * cols;
  ACTNN_GRID_STRIDE_LOOP(t, numel) {
    const int64_t k = t % sample_size;
    const int64_t j = t - k + (k % rows) * cols + k / rows;
    out[t] = scalar_t(masked_value(float(values[t]), unpack_value(mask, j, 1), scale));
  }
}

at::Tensor launch_apply_mask(const at::Tensor& values, const at::Tensor& mask, double scale,
                             int64_t rows, int64_t cols) {
  c10::cuda::CUDAGuard guard(values.device());
  at::Tensor out = at::empty_like(values);
  if (out.numel() == 0) return out;
  ACTNN_DISPATCH_FLOAT(values.scalar_type(), "actnn_apply_mask_cuda", [&] {
    apply_mask_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0,
                                  c10::cuda::getCurrentCUDAStream()>>>(
        values.const_data_ptr<scalar_t>(), mask.const_data_ptr<uint8_t>(), float(scale),
        out.numel(), rows, cols, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor apply_mask_cuda(const at::Tensor& values, const at::Tensor& mask, double scale) {
  check_apply_mask_args(values, mask);
  return launch_apply_mask(values, mask, scale, 1, std::max<int64_t>(values.numel(), 1));
}

at::Tensor apply_mask_transposed_cuda(const at::Tensor& values, const at::Tensor& mask,
                                      double scale) {
  check_apply_mask_transposed_args(values, mask);
  return launch_apply_mask(values, mask, scale, values.size(2), values.size(1));
}

}  // namespace

// Thread t sums channel t % channels over its chunk of rows (neighbouring threads read
// neighbouring channels: coalesced), then adds into the float32 totals.
constexpr int64_t kRowsPerThread = 256;

template <typename scalar_t>
__global__ void batch_norm_sums_kernel(const scalar_t* g, const scalar_t* x, int64_t rows,
                                       int64_t channels, float* sums) {
  const int64_t chunks = (rows + kRowsPerThread - 1) / kRowsPerThread;
  ACTNN_GRID_STRIDE_LOOP(t, chunks * channels) {
    const int64_t c = t % channels, first = t / channels * kRowsPerThread;
    const int64_t last = min(rows, first + kRowsPerThread);
    float s0 = 0.f, s1 = 0.f, s2 = 0.f;
    for (int64_t r = first; r < last; ++r) {
      const float gv = float(g[r * channels + c]), xv = float(x[r * channels + c]);
      s0 += gv;
      s1 += gv * xv;
      s2 += xv * xv;
    }
    atomicAdd(sums + c, s0);
    atomicAdd(sums + channels + c, s1);
    atomicAdd(sums + 2 * channels + c, s2);
  }
}

at::Tensor batch_norm_sums_cuda(const at::Tensor& grad, const at::Tensor& xh) {
  check_batch_norm_args(grad, xh);
  c10::cuda::CUDAGuard guard(xh.device());
  const int64_t rows = xh.size(0), channels = xh.size(1);
  at::Tensor sums = at::zeros({3, channels}, xh.options().dtype(at::kFloat));
  const int64_t threads = (rows + kRowsPerThread - 1) / kRowsPerThread * channels;
  if (threads == 0) return sums;
  ACTNN_DISPATCH_FLOAT(xh.scalar_type(), "actnn_batch_norm_sums_cuda", [&] {
    batch_norm_sums_kernel<scalar_t><<<blocks_for(threads), kThreads, 0,
                                       c10::cuda::getCurrentCUDAStream()>>>(
        grad.const_data_ptr<scalar_t>(), xh.const_data_ptr<scalar_t>(), rows, channels,
        sums.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return sums;
}

template <typename scalar_t>
__global__ void batch_norm_combine_kernel(scalar_t* x, const scalar_t* g, const float* coef,
                                          int64_t numel, int64_t channels) {
  ACTNN_GRID_STRIDE_LOOP(t, numel) {
    const int64_t k = t % channels;
    x[t] = scalar_t(combine_value(coef[k], coef[channels + k], coef[2 * channels + k],
                                  float(x[t]), float(g[t])));
  }
}

void batch_norm_combine_cuda(at::Tensor& xh, const at::Tensor& grad, const at::Tensor& coef) {
  check_batch_norm_args(grad, xh);
  check_batch_norm_coef(coef, xh);
  c10::cuda::CUDAGuard guard(xh.device());
  if (xh.numel() == 0) return;
  ACTNN_DISPATCH_FLOAT(xh.scalar_type(), "actnn_batch_norm_combine_cuda", [&] {
    batch_norm_combine_kernel<scalar_t><<<blocks_for(xh.numel()), kThreads, 0,
                                          c10::cuda::getCurrentCUDAStream()>>>(
        xh.data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), coef.const_data_ptr<float>(),
        xh.numel(), xh.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// One thread per run of a row that `sample` picks: its term (kRange: the squared range, else the
// sum of squares, in double), scaled, added into the row's float64 statistic.
template <bool kRange, typename scalar_t>
__global__ void row_stats_kernel(const scalar_t* x, int64_t n, int64_t m, RowSample sample,
                                 double* out) {
  ACTNN_GRID_STRIDE_LOOP(t, n * sample.count) {
    const int64_t r = t / sample.count;
    const scalar_t* run = x + r * m + t % sample.count * sample.step;
    double term;
    if (kRange) {
      float lo = float(run[0]), hi = lo;
      for (int64_t j = 1; j < sample.len; ++j) {
        lo = min_nan(lo, float(run[j]));
        hi = max_nan(hi, float(run[j]));
      }
      term = squared_range(lo, hi);
    } else {
      term = 0.0;
      for (int64_t j = 0; j < sample.len; ++j) term += double(float(run[j]) * float(run[j]));
    }
    atomicAdd(out + r, term * sample.scale);
  }
}

template <bool kRange>
at::Tensor launch_row_stats(const at::Tensor& x, RowSample sample) {
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::zeros({x.size(0)}, x.options().dtype(at::kDouble));
  const int64_t threads = x.size(0) * sample.count;
  if (threads == 0) return out;
  ACTNN_DISPATCH_FLOAT(x.scalar_type(), "actnn_row_stats_cuda", [&] {
    row_stats_kernel<kRange, scalar_t><<<blocks_for(threads), kThreads, 0,
                                         c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), x.size(0), x.size(1), sample, out.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor mean_square_range_cuda(const at::Tensor& x, int64_t group_size, int64_t max_groups) {
  check_mean_square_range_args(x, group_size, max_groups);
  return launch_row_stats<true>(x, range_sample(x.size(1), group_size, max_groups));
}

at::Tensor sum_of_squares_cuda(const at::Tensor& x, int64_t max_values, int64_t blocks) {
  check_sum_of_squares_args(x, max_values, blocks);
  return launch_row_stats<false>(x, squares_sample(x.size(1), max_values, blocks));
}

// out = window_offset (kToOffsets) or window_index of each element of a contiguous (P, OH, OW, K)
// tensor at its output position.
template <bool kToOffsets, typename in_t, typename out_t>
__global__ void map_windows_kernel(const in_t* in, Window w, int64_t numel, int64_t out_h,
                                   int64_t out_w, int64_t inner, out_t* out) {
  ACTNN_GRID_STRIDE_LOOP(e, numel) {
    const int64_t ow = e / inner % out_w, oh = e / (inner * out_w) % out_h;
    out[e] = out_t(kToOffsets ? window_offset(w, oh, ow, int64_t(in[e]))
                              : window_index(w, oh, ow, int64_t(in[e])));
  }
}

// window.h's Map.
template <bool kToOffsets, typename in_t, typename out_t>
struct MapWindows {
  static void run(const at::Tensor& in, const Window& w, at::Tensor& out) {
    if (out.numel() == 0) return;
    c10::cuda::CUDAGuard guard(in.device());
    map_windows_kernel<kToOffsets, in_t, out_t><<<blocks_for(out.numel()), kThreads, 0,
                                                  c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<const in_t*>(in.const_data_ptr()), w, out.numel(), in.size(1), in.size(2),
        in.size(3), static_cast<out_t*>(out.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

TORCH_LIBRARY_IMPL(actnn_mm, CUDA, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
  m.impl("dequantize_transposed", &dequantize_transposed_cuda);
  m.impl("pack_bits", &pack_bits_cuda);
  m.impl("unpack_bits", &unpack_bits_cuda);
  m.impl("pack_positive", &pack_positive_cuda);
  m.impl("apply_mask", &apply_mask_cuda);
  m.impl("apply_mask_transposed", &apply_mask_transposed_cuda);
  m.impl("batch_norm_sums", &batch_norm_sums_cuda);
  m.impl("batch_norm_combine", &batch_norm_combine_cuda);
  m.impl("mean_square_range", &mean_square_range_cuda);
  m.impl("sum_of_squares", &sum_of_squares_cuda);
  m.impl("window_offsets", &window_offsets_impl<MapWindows>);
  m.impl("window_indices", &window_indices_impl<MapWindows>);
}

}  // namespace actnn
