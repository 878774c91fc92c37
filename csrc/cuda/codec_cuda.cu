// CUDA kernels: thin launchers over the shared math in common/codec.h (the same functions the
// CPU kernels run and the tests check against the reference), with the same host checks
// (common/checks.h).
//
// - A compressed stream's widths and offsets live on the GPU: each kernel checks a sample's
//   stream (sample_stream_fits) before touching its bytes; a failure is a device-side assert
//   (CUDA_KERNEL_ASSERT, torch's convention for data-dependent index checks), and the sample's
//   bytes are neither read nor written (its outputs are NaN), so nothing goes out of bounds even
//   where asserts are compiled out. The host never reads a device value.
// - Reductions run in a fixed order, with no atomics: results are the same bits run to run, and
//   the same as the CPU kernels' (quantize's sample ranges, batch_norm_sums, mean_square_range,
//   sum_of_squares).
// - Grids are sized to the work (capped, with grid-stride loops). Index math inside loops is
//   multiplication and fast division by invariant integers (IntDivider, 32-bit wherever the
//   tensor has fewer than 2^31 elements, else plain 64-bit division); 64-bit divisions only
//   happen once per group, chunk or thread.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

// Not self-contained: after c10's macros and <cstdint>.
#include <ATen/cuda/detail/IntegerDivider.cuh>

#include "../common/checks.h"
#include "../common/codec.h"
#include "../common/window.h"

namespace actnn {
namespace {

using at::cuda::detail::IntDivider;

constexpr int kThreads = 256;
// Enough resident blocks to fill any current GPU; larger work loops (grid-stride).
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

// Blocks of kThreads for `threads` threads of work, the last one partly used.
int blocks_for(int64_t threads) {
  return int(std::min(ceil_div(threads, kThreads), kMaxBlocks));
}

#define ACTNN_GRID_STRIDE_LOOP(T, i, total)                                          \
  for (T i = T(blockIdx.x) * T(blockDim.x) + T(threadIdx.x); i < T(total); \
       i += T(blockDim.x) * T(gridDim.x))

// Calls f(index_t()) with index_t uint32_t when indices below `numel` fit in 31 bits (fast
// IntDivider, 32-bit arithmetic), else uint64_t.
template <typename F>
void dispatch_index(int64_t numel, F&& f) {
  if (numel <= std::numeric_limits<int32_t>::max()) return f(uint32_t());
  return f(uint64_t());
}

__device__ __forceinline__ float quiet_nan() { return bits_float(0x7FC00000u); }

// Groups are handled by teams of lanes of one warp: a power of two, at most 32 and at most the
// group size (>= 8), so that no lane of a team is idle for want of values to read.
int team_for(int64_t group_size) {
  int team = 32;
  while (team > group_size) team /= 2;
  return team;
}

// The lanes of the calling thread's team (teams split warps evenly).
__device__ __forceinline__ unsigned team_mask(int team) {
  const unsigned lanes = team == 32 ? 0xFFFFFFFFu : (1u << team) - 1u;
  return lanes << (threadIdx.x % 32 / team * team);
}

// Where a team's group lies: sample s, its values [start, start + len).
struct GroupSpan {
  int64_t s, start, len;
};

__device__ __forceinline__ GroupSpan group_span(int64_t group, int64_t sample_size,
                                                int64_t group_size, int64_t groups_per_sample) {
  const int64_t s = group / groups_per_sample;
  const int64_t start = (group - s * groups_per_sample) * group_size;
  return GroupSpan{s, start, min(group_size, sample_size - start)};
}

// Whether sample s's stream fits the buffer (checks.h), asserted.
__device__ __forceinline__ bool stream_ok(const uint8_t* bits, const int64_t* offsets, int64_t s,
                                          int64_t sample_size, int64_t total_bytes) {
  const bool ok = sample_stream_fits(bits[s], offsets[s], offsets[s + 1], sample_size,
                                     total_bytes);
  CUDA_KERNEL_ASSERT(ok && "actnn_mm: bad bit width or offsets of a compressed stream");
  return ok;
}

// quantize, pass 1: a team per group finds its min and max (lanes read the group coalesced, then
// reduce) into ranges[2 * group], ranges[2 * group + 1].
template <typename scalar_t>
__global__ void group_range_kernel(const scalar_t* x, int64_t sample_size, int64_t group_size,
                                   int64_t groups_per_sample, int64_t groups, int team,
                                   float* ranges) {
  const int lane = threadIdx.x % team;
  const unsigned mask = team_mask(team);
  const int64_t teams = int64_t(gridDim.x) * blockDim.x / team;
  for (int64_t group = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / team; group < groups;
       group += teams) {
    const GroupSpan g = group_span(group, sample_size, group_size, groups_per_sample);
    const scalar_t* xg = x + g.s * sample_size + g.start;
    float lo = float(xg[0]), hi = lo;
    for (int64_t j = lane; j < g.len; j += team) {
      lo = min_nan(lo, float(xg[j]));
      hi = max_nan(hi, float(xg[j]));
    }
    for (int delta = team / 2; delta > 0; delta /= 2) {
      lo = min_nan(lo, __shfl_xor_sync(mask, lo, delta, team));
      hi = max_nan(hi, __shfl_xor_sync(mask, hi, delta, team));
    }
    if (lane == 0) {
      ranges[2 * group] = lo;
      ranges[2 * group + 1] = hi;
    }
  }
}

constexpr int kSampleThreads = 256;

// quantize, pass 2: a block per sample reduces its groups' ranges (each thread a strided share,
// then a tree in shared memory; min and max are exact, so the order only decides which zero or
// NaN is found, and sample_stats stores either alike) into its stored min and range. A sample
// whose stream is bad gets NaN, so that the activation reads as not finite.
__global__ void sample_stats_kernel(const float* ranges, const uint8_t* bits,
                                    const int64_t* offsets, int64_t n, int64_t sample_size,
                                    int64_t groups_per_sample, int64_t total_bytes,
                                    float* sample_meta) {
  __shared__ float los[kSampleThreads], his[kSampleThreads];
  const int t = threadIdx.x;
  for (int64_t s = blockIdx.x; s < n; s += gridDim.x) {
    const float* r = ranges + 2 * s * groups_per_sample;
    float lo = r[0], hi = r[1];
    for (int64_t g = t; g < groups_per_sample; g += blockDim.x) {
      lo = min_nan(lo, r[2 * g]);
      hi = max_nan(hi, r[2 * g + 1]);
    }
    los[t] = lo;
    his[t] = hi;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
      if (t < half) {
        los[t] = min_nan(los[t], los[t + half]);
        his[t] = max_nan(his[t], his[t + half]);
      }
      __syncthreads();
    }
    if (t == 0) {
      SampleStats stats{quiet_nan(), quiet_nan()};
      if (stream_ok(bits, offsets, s, sample_size, total_bytes))
        stats = sample_stats(los[0], his[0], (1 << bits[s]) - 1);
      sample_meta[2 * s] = stats.min;
      sample_meta[2 * s + 1] = stats.range;
    }
    __syncthreads();  // before the next sample overwrites los and his
  }
}

// The samples' grids (all NaN for a bad width: the kernels then refuse the sample's stream).
__global__ void sample_grid_kernel(const float* sample_meta, const uint8_t* bits, int64_t n,
                                   SampleGrid* grids) {
  ACTNN_GRID_STRIDE_LOOP(int64_t, s, n) {
    const int b = bits[s];
    const float nan = quiet_nan();
    grids[s] = valid_bits(b) ? sample_grid(sample_meta[2 * s], sample_meta[2 * s + 1], (1 << b) - 1)
                             : sample_grid(nan, nan, 1);
  }
}

// The (N,) grids of `sample_meta` as a byte tensor on its device.
at::Tensor launch_sample_grids(const at::Tensor& sample_meta, const at::Tensor& bits) {
  const int64_t n = bits.size(0);
  at::Tensor grids = at::empty({n * int64_t(sizeof(SampleGrid))}, bits.options());
  if (n == 0) return grids;
  sample_grid_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      sample_meta.const_data_ptr<float>(), bits.const_data_ptr<uint8_t>(), n,
      reinterpret_cast<SampleGrid*>(grids.data_ptr<uint8_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grids;
}

const SampleGrid* grids_of(const at::Tensor& grids) {
  return reinterpret_cast<const SampleGrid*>(grids.const_data_ptr<uint8_t>());
}

// quantize, pass 3: a team per group codes its range on its sample's grid, then packs its bytes
// (lane l: bytes l, l + team, ...; a byte's values are in one group since groups start on
// multiples of 8 values).
template <typename scalar_t>
__global__ void quantize_kernel(const scalar_t* x, const float* ranges, const SampleGrid* grids,
                                const uint8_t* bits, const int64_t* offsets, int64_t sample_size,
                                int64_t group_size, int64_t groups_per_sample, int64_t groups,
                                int64_t total_bytes, int team, RngKey key, bool stochastic,
                                uint8_t* data, uint8_t* meta) {
  const int lane = threadIdx.x % team;
  const int64_t teams = int64_t(gridDim.x) * blockDim.x / team;
  for (int64_t group = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / team; group < groups;
       group += teams) {
    const GroupSpan g = group_span(group, sample_size, group_size, groups_per_sample);
    if (!stream_ok(bits, offsets, g.s, sample_size, total_bytes)) {
      if (lane == 0) meta[2 * group] = meta[2 * group + 1] = 0;
      continue;  // the whole team: its condition is the sample's
    }
    const int b = bits[g.s], per_byte = 8 / b, max_level = (1 << b) - 1;
    const GroupCodes c = group_codes(grids[g.s], ranges[2 * group], ranges[2 * group + 1],
                                     max_level);
    if (lane == 0) {
      meta[2 * group] = uint8_t(c.min_code);
      meta[2 * group + 1] = uint8_t(c.scale_code);
    }
    const int64_t first = g.s * sample_size + g.start;  // element index, also the random counter
    const scalar_t* xg = x + first;
    uint8_t* out = data + offsets[g.s] + g.start / 8 * b;
    const int64_t bytes = stream_bytes(g.len, b);
    for (int64_t k = lane; k < bytes; k += team) {
      uint32_t byte = 0;
      for (int i = 0; i < per_byte && k * per_byte + i < g.len; ++i) {
        const int64_t j = k * per_byte + i;
        const float u = stochastic ? uniform(key, uint64_t(first + j)) : 0.5f;
        byte |= quantize_value(float(xg[j]), c.min, c.inv_scale, max_level, u) << (i * b);
      }
      out[k] = uint8_t(byte);
    }
  }
}

// A team per group: lane l writes values l, l + team, ... of the group, in order (coalesced).
template <typename scalar_t>
__global__ void dequantize_kernel(const uint8_t* data, const uint8_t* meta, const SampleGrid* grids,
                                  const uint8_t* bits, const int64_t* offsets, int64_t sample_size,
                                  int64_t group_size, int64_t groups_per_sample, int64_t groups,
                                  int64_t total_bytes, int team, scalar_t* out) {
  const int lane = threadIdx.x % team;
  const int64_t teams = int64_t(gridDim.x) * blockDim.x / team;
  for (int64_t group = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / team; group < groups;
       group += teams) {
    const GroupSpan g = group_span(group, sample_size, group_size, groups_per_sample);
    scalar_t* o = out + g.s * sample_size + g.start;
    if (!stream_ok(bits, offsets, g.s, sample_size, total_bytes)) {
      for (int64_t j = lane; j < g.len; j += team) o[j] = scalar_t(quiet_nan());
      continue;
    }
    const int b = bits[g.s];
    const float mn = grid_min(grids[g.s], meta[2 * group]);
    const float scale = grid_scale(grids[g.s], meta[2 * group + 1]);
    const uint8_t* in = data + offsets[g.s] + g.start / 8 * b;
    for (int64_t j = lane; j < g.len; j += team)
      o[j] = scalar_t(dequantize_value(unpack_value(in, j, b), mn, scale));
  }
}

// Output element t, in output order (coalesced writes), is value j = r * cols + c of sample s, a
// (rows, cols) matrix written transposed.
template <typename index_t, typename scalar_t>
__global__ void dequantize_transposed_kernel(const uint8_t* data, const uint8_t* meta,
                                             const SampleGrid* grids, const uint8_t* bits,
                                             const int64_t* offsets, index_t numel,
                                             IntDivider<index_t> per_sample,
                                             IntDivider<index_t> per_row,
                                             IntDivider<index_t> per_group, index_t cols,
                                             int64_t groups_per_sample, int64_t total_bytes,
                                             scalar_t* out) {
  const int64_t sample_size = int64_t(per_sample.divisor);
  ACTNN_GRID_STRIDE_LOOP(index_t, t, numel) {
    const auto sk = per_sample.divmod(t);
    const auto cr = per_row.divmod(sk.mod);
    const index_t j = cr.mod * cols + cr.div;
    const int64_t s = int64_t(sk.div);
    if (!stream_ok(bits, offsets, s, sample_size, total_bytes)) {
      out[t] = scalar_t(quiet_nan());
      continue;
    }
    const int64_t group = s * groups_per_sample + int64_t(per_group.div(j));
    const float mn = grid_min(grids[s], meta[2 * group]);
    const float scale = grid_scale(grids[s], meta[2 * group + 1]);
    out[t] = scalar_t(dequantize_value(unpack_value(data + offsets[s], int64_t(j), bits[s]), mn,
                                       scale));
  }
}

// Three passes (a sample's grid needs its whole range before any of its groups is coded): the
// groups' ranges, the samples' stats (and grids), the groups' codes and values; x is read twice.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& x,
                                                             const at::Tensor& bits,
                                                             const at::Tensor& offsets,
                                                             int64_t group_size, int64_t seed,
                                                             bool stochastic,
                                                             int64_t total_bytes) {
  check_quantize_args(x, bits, offsets, group_size, total_bytes);
  const int64_t n = x.size(0), sample_size = x.size(1);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t groups_per_sample = num_groups(sample_size, group_size);
  const int64_t groups = n * groups_per_sample;
  // Slack bytes (between samples' streams or after the last) are zeroed, never left stale.
  at::Tensor data = at::zeros({total_bytes}, x.options().dtype(at::kByte));
  at::Tensor meta = at::empty({groups, 2}, x.options().dtype(at::kByte));
  at::Tensor sample_meta = at::zeros({n, 2}, x.options().dtype(at::kFloat));  // empty samples: 0
  if (groups == 0) return {data, meta, sample_meta};
  at::Tensor ranges = at::empty({groups, 2}, x.options().dtype(at::kFloat));
  const int team = team_for(group_size);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ACTNN_DISPATCH_FLOAT(x.scalar_type(), "actnn_quantize_cuda", [&] {
    group_range_kernel<scalar_t><<<blocks_for(groups * team), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), sample_size, group_size, groups_per_sample, groups, team,
        ranges.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  sample_stats_kernel<<<int(std::min(n, kMaxBlocks)), kSampleThreads, 0, stream>>>(
      ranges.const_data_ptr<float>(), bits.const_data_ptr<uint8_t>(),
      offsets.const_data_ptr<int64_t>(), n, sample_size, groups_per_sample, total_bytes,
      sample_meta.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor grids = launch_sample_grids(sample_meta, bits);
  ACTNN_DISPATCH_FLOAT(x.scalar_type(), "actnn_quantize_cuda", [&] {
    quantize_kernel<scalar_t><<<blocks_for(groups * team), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), ranges.const_data_ptr<float>(), grids_of(grids),
        bits.const_data_ptr<uint8_t>(), offsets.const_data_ptr<int64_t>(), sample_size,
        group_size, groups_per_sample, groups, total_bytes, team, rng_key(uint64_t(seed)),
        stochastic, data.data_ptr<uint8_t>(), meta.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {data, meta, sample_meta};
}

at::Tensor dequantize_cuda(const at::Tensor& data, const at::Tensor& meta,
                           const at::Tensor& sample_meta, const at::Tensor& bits,
                           const at::Tensor& offsets, int64_t n, int64_t sample_size,
                           int64_t group_size, at::ScalarType dtype) {
  check_dequantize_args(data, meta, sample_meta, bits, offsets, n, sample_size, group_size, dtype);
  c10::cuda::CUDAGuard guard(data.device());
  at::Tensor out = at::empty({n, sample_size}, data.options().dtype(dtype));
  const int64_t groups_per_sample = num_groups(sample_size, group_size);
  const int64_t groups = n * groups_per_sample;
  if (groups == 0) return out;
  const at::Tensor grids = launch_sample_grids(sample_meta, bits);
  const int team = team_for(group_size);
  ACTNN_DISPATCH_FLOAT(dtype, "actnn_dequantize_cuda", [&] {
    dequantize_kernel<scalar_t><<<blocks_for(groups * team), kThreads, 0,
                                  c10::cuda::getCurrentCUDAStream()>>>(
        data.const_data_ptr<uint8_t>(), meta.const_data_ptr<uint8_t>(), grids_of(grids),
        bits.const_data_ptr<uint8_t>(), offsets.const_data_ptr<int64_t>(), sample_size,
        group_size, groups_per_sample, groups, data.numel(), team, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor dequantize_transposed_cuda(const at::Tensor& data, const at::Tensor& meta,
                                      const at::Tensor& sample_meta, const at::Tensor& bits,
                                      const at::Tensor& offsets, int64_t n, int64_t rows,
                                      int64_t cols, int64_t group_size, at::ScalarType dtype) {
  check_dequantize_transposed_args(data, meta, sample_meta, bits, offsets, n, rows, cols,
                                   group_size, dtype);
  c10::cuda::CUDAGuard guard(data.device());
  at::Tensor out = at::empty({n, cols, rows}, data.options().dtype(dtype));
  const int64_t numel = out.numel(), sample_size = rows * cols;
  if (numel == 0) return out;
  const at::Tensor grids = launch_sample_grids(sample_meta, bits);
  ACTNN_DISPATCH_FLOAT(dtype, "actnn_dequantize_transposed_cuda", [&] {
    dispatch_index(numel, [&](auto index) {
      using index_t = decltype(index);
      // j < sample_size <= group_size has group 0: dividing by the smaller is the same.
      dequantize_transposed_kernel<index_t, scalar_t><<<blocks_for(numel), kThreads, 0,
                                                        c10::cuda::getCurrentCUDAStream()>>>(
          data.const_data_ptr<uint8_t>(), meta.const_data_ptr<uint8_t>(), grids_of(grids),
          bits.const_data_ptr<uint8_t>(), offsets.const_data_ptr<int64_t>(), index_t(numel),
          IntDivider<index_t>(index_t(sample_size)), IntDivider<index_t>(index_t(rows)),
          IntDivider<index_t>(index_t(std::min(group_size, sample_size))), index_t(cols),
          num_groups(sample_size, group_size), data.numel(), out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

__global__ void pack_bits_kernel(const uint8_t* values, int64_t count, int bits, int64_t bytes,
                                 uint8_t* out) {
  ACTNN_GRID_STRIDE_LOOP(int64_t, k, bytes) { out[k] = pack_byte(values, count, k, bits); }
}

__global__ void unpack_bits_kernel(const uint8_t* packed, int bits, int64_t numel, uint8_t* out) {
  ACTNN_GRID_STRIDE_LOOP(int64_t, j, numel) { out[j] = uint8_t(unpack_value(packed, j, bits)); }
}

at::Tensor pack_bits_cuda(const at::Tensor& values, int64_t bits) {
  check_pack_args(values, bits);
  c10::cuda::CUDAGuard guard(values.device());
  const int64_t count = values.numel(), per_byte = 8 / bits;
  at::Tensor packed = at::empty({ceil_div(count, per_byte)}, values.options().dtype(at::kByte));
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
  ACTNN_GRID_STRIDE_LOOP(int64_t, k, bytes) {
    uint32_t byte = 0;
    for (int i = 0; i < 8 && 8 * k + i < numel; ++i)
      byte |= positive_bit(float(values[8 * k + i])) << i;
    out[k] = uint8_t(byte);
  }
}

at::Tensor pack_positive_cuda(const at::Tensor& values) {
  check_pack_positive_args(values);
  c10::cuda::CUDAGuard guard(values.device());
  at::Tensor packed = at::empty({ceil_div(values.numel(), 8)}, values.options().dtype(at::kByte));
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

template <typename scalar_t>
__global__ void apply_mask_kernel(const scalar_t* values, const uint8_t* mask, float scale,
                                  int64_t numel, scalar_t* out) {
  ACTNN_GRID_STRIDE_LOOP(int64_t, t, numel) {
    out[t] = scalar_t(masked_value(float(values[t]), unpack_value(mask, t, 1), scale));
  }
}

// Value t, element (c, r) of its sample's (cols, rows) matrix, has its mask bit at (r, c) of the
// sample's (rows, cols) one.
template <typename index_t, typename scalar_t>
__global__ void apply_mask_transposed_kernel(const scalar_t* values, const uint8_t* mask,
                                             float scale, index_t numel,
                                             IntDivider<index_t> per_sample,
                                             IntDivider<index_t> per_row, index_t cols,
                                             scalar_t* out) {
  ACTNN_GRID_STRIDE_LOOP(index_t, t, numel) {
    const auto sk = per_sample.divmod(t);
    const auto cr = per_row.divmod(sk.mod);
    const index_t j = t - sk.mod + cr.mod * cols + cr.div;
    out[t] = scalar_t(masked_value(float(values[t]), unpack_value(mask, int64_t(j), 1), scale));
  }
}

at::Tensor apply_mask_cuda(const at::Tensor& values, const at::Tensor& mask, double scale) {
  check_apply_mask_args(values, mask);
  c10::cuda::CUDAGuard guard(values.device());
  at::Tensor out = at::empty_like(values);
  if (out.numel() == 0) return out;
  ACTNN_DISPATCH_FLOAT(values.scalar_type(), "actnn_apply_mask_cuda", [&] {
    apply_mask_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0,
                                  c10::cuda::getCurrentCUDAStream()>>>(
        values.const_data_ptr<scalar_t>(), mask.const_data_ptr<uint8_t>(), float(scale),
        out.numel(), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor apply_mask_transposed_cuda(const at::Tensor& values, const at::Tensor& mask,
                                      double scale) {
  check_apply_mask_transposed_args(values, mask);
  c10::cuda::CUDAGuard guard(values.device());
  at::Tensor out = at::empty_like(values);
  const int64_t numel = out.numel(), cols = values.size(1), rows = values.size(2);
  if (numel == 0) return out;
  ACTNN_DISPATCH_FLOAT(values.scalar_type(), "actnn_apply_mask_transposed_cuda", [&] {
    dispatch_index(numel, [&](auto index) {
      using index_t = decltype(index);
      apply_mask_transposed_kernel<index_t, scalar_t><<<blocks_for(numel), kThreads, 0,
                                                        c10::cuda::getCurrentCUDAStream()>>>(
          values.const_data_ptr<scalar_t>(), mask.const_data_ptr<uint8_t>(), float(scale),
          index_t(numel), IntDivider<index_t>(index_t(rows * cols)),
          IntDivider<index_t>(index_t(rows)), index_t(cols), out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// batch_norm_sums, first pass: thread t sums channel t % channels over chunk t / channels of
// codec.h's plan (neighbouring threads read neighbouring channels: coalesced), row by row in
// double, into partial[chunk][3][channels].
template <typename scalar_t>
__global__ void batch_norm_partial_kernel(const scalar_t* g, const scalar_t* x, int64_t rows,
                                          int64_t channels, int64_t chunk_rows, int64_t chunks,
                                          double* partial) {
  ACTNN_GRID_STRIDE_LOOP(int64_t, t, chunks * channels) {
    const int64_t chunk = t / channels, c = t - chunk * channels;
    const int64_t last = min(rows, (chunk + 1) * chunk_rows);
    double s0 = 0.0, s1 = 0.0, s2 = 0.0;
    for (int64_t r = chunk * chunk_rows; r < last; ++r) {
      const float gv = float(g[r * channels + c]), xv = float(x[r * channels + c]);
      s0 += gv;
      s1 += gv * xv;
      s2 += xv * xv;
    }
    double* p = partial + chunk * 3 * channels + c;
    p[0] = s0;
    p[channels] = s1;
    p[2 * channels] = s2;
  }
}

// Second pass: sum i of (3, channels) over the chunks, in order, in double.
__global__ void batch_norm_total_kernel(const double* partial, int64_t sums, int64_t chunks,
                                        float* out) {
  ACTNN_GRID_STRIDE_LOOP(int64_t, i, sums) {
    double total = 0.0;
    for (int64_t k = 0; k < chunks; ++k) total += partial[k * sums + i];
    out[i] = float(total);
  }
}

at::Tensor batch_norm_sums_cuda(const at::Tensor& grad, const at::Tensor& xh) {
  check_batch_norm_args(grad, xh);
  c10::cuda::CUDAGuard guard(xh.device());
  const int64_t rows = xh.size(0), channels = xh.size(1);
  at::Tensor sums = at::zeros({3, channels}, xh.options().dtype(at::kFloat));
  const int64_t chunk_rows = batch_norm_chunk_rows(rows);
  const int64_t chunks = ceil_div(rows, chunk_rows);
  if (chunks * channels == 0) return sums;
  at::Tensor partial = at::empty({chunks, 3, channels}, xh.options().dtype(at::kDouble));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ACTNN_DISPATCH_FLOAT(xh.scalar_type(), "actnn_batch_norm_sums_cuda", [&] {
    batch_norm_partial_kernel<scalar_t><<<blocks_for(chunks * channels), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), xh.const_data_ptr<scalar_t>(), rows, channels,
        chunk_rows, chunks, partial.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  batch_norm_total_kernel<<<blocks_for(3 * channels), kThreads, 0, stream>>>(
      partial.const_data_ptr<double>(), 3 * channels, chunks, sums.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sums;
}

template <typename index_t, typename scalar_t>
__global__ void batch_norm_combine_kernel(scalar_t* x, const scalar_t* g, const float* coef,
                                          index_t numel, IntDivider<index_t> per_row) {
  const index_t channels = per_row.divisor;
  ACTNN_GRID_STRIDE_LOOP(index_t, t, numel) {
    const index_t k = per_row.mod(t);
    x[t] = scalar_t(combine_value(coef[k], coef[channels + k], coef[2 * channels + k],
                                  float(x[t]), float(g[t])));
  }
}

void batch_norm_combine_cuda(at::Tensor& xh, const at::Tensor& grad, const at::Tensor& coef) {
  check_batch_norm_args(grad, xh);
  check_batch_norm_coef(coef, xh);
  c10::cuda::CUDAGuard guard(xh.device());
  const int64_t numel = xh.numel();
  if (numel == 0) return;
  ACTNN_DISPATCH_FLOAT(xh.scalar_type(), "actnn_batch_norm_combine_cuda", [&] {
    dispatch_index(numel, [&](auto index) {
      using index_t = decltype(index);
      batch_norm_combine_kernel<index_t, scalar_t><<<blocks_for(numel), kThreads, 0,
                                                     c10::cuda::getCurrentCUDAStream()>>>(
          xh.data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), coef.const_data_ptr<float>(),
          index_t(numel), IntDivider<index_t>(index_t(xh.size(1))));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// A warp's term of a run of `len` values (kRange: the squared range, else codec.h's ordered sum
// of squares), the same value in every lane.
template <bool kRange, typename scalar_t>
__device__ double run_term(const scalar_t* run, int64_t len, int lane) {
  if (kRange) {
    float lo = float(run[0]), hi = lo;
    for (int64_t j = lane; j < len; j += 32) {
      lo = min_nan(lo, float(run[j]));
      hi = max_nan(hi, float(run[j]));
    }
    for (int delta = 16; delta > 0; delta /= 2) {
      lo = min_nan(lo, __shfl_xor_sync(0xFFFFFFFFu, lo, delta));
      hi = max_nan(hi, __shfl_xor_sync(0xFFFFFFFFu, hi, delta));
    }
    return squared_range(lo, hi);
  }
  static_assert(kSquaresLanes == 32, "a warp's lanes are the sum's lanes");
  const int64_t full = len / 32 * 32;
  float partial = 0.f;
  for (int64_t j = lane; j < full; j += 32) {
    const float v = float(run[j]);
    partial += v * v;
  }
  double tail = 0.0;
  if (full + lane < len) {
    const float v = float(run[full + lane]);
    tail = double(v * v);
  }
  double total = 0.0;
  for (int l = 0; l < 32; ++l) total += __shfl_sync(0xFFFFFFFFu, partial, l);
  for (int l = 0; l < len - full; ++l) total += __shfl_sync(0xFFFFFFFFu, tail, l);
  return total;
}

constexpr int kStatsWarps = 8;

// A block per row: its warps compute the terms of runs base .. base + warps - 1, thread 0 adds
// them up in order (as the CPU kernel does), scales the total and writes it.
template <bool kRange, typename scalar_t>
__global__ void row_stats_kernel(const scalar_t* x, int64_t n, int64_t m, RowSample sample,
                                 double* out) {
  __shared__ double terms[kStatsWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    double total = 0.0;
    for (int64_t base = 0; base < sample.count; base += warps) {
      if (base + warp < sample.count) {  // the whole warp or none of it
        const double term =
            run_term<kRange>(x + r * m + (base + warp) * sample.step, sample.len, lane);
        if (lane == 0) terms[warp] = term;
      }
      __syncthreads();
      if (threadIdx.x == 0)
        for (int w = 0; w < warps && base + w < sample.count; ++w) total += terms[w];
      __syncthreads();
    }
    if (threadIdx.x == 0) out[r] = total * sample.scale;
  }
}

template <bool kRange>
at::Tensor launch_row_stats(const at::Tensor& x, RowSample sample) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0);
  at::Tensor out = at::zeros({n}, x.options().dtype(at::kDouble));
  if (n == 0 || sample.count == 0) return out;
  const int warps = int(std::min<int64_t>(kStatsWarps, sample.count));
  ACTNN_DISPATCH_FLOAT(x.scalar_type(), "actnn_row_stats_cuda", [&] {
    row_stats_kernel<kRange, scalar_t><<<int(std::min(n, kMaxBlocks)), 32 * warps, 0,
                                         c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), n, x.size(1), sample, out.data_ptr<double>());
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
template <bool kToOffsets, typename index_t, typename in_t, typename out_t>
__global__ void map_windows_kernel(const in_t* in, Window w, index_t numel,
                                   IntDivider<index_t> per_position, IntDivider<index_t> per_row,
                                   IntDivider<index_t> per_plane, out_t* out) {
  ACTNN_GRID_STRIDE_LOOP(index_t, e, numel) {
    const index_t position = per_position.div(e);  // (plane, oh, ow) flat
    const auto row = per_row.divmod(position);     // (plane, oh), ow
    const int64_t ow = int64_t(row.mod), oh = int64_t(per_plane.mod(row.div));
    out[e] = out_t(kToOffsets ? window_offset(w, oh, ow, int64_t(in[e]))
                              : window_index(w, oh, ow, int64_t(in[e])));
  }
}

// window.h's Map.
template <bool kToOffsets, typename in_t, typename out_t>
struct MapWindows {
  static void run(const at::Tensor& in, const Window& w, at::Tensor& out) {
    const int64_t numel = out.numel();
    if (numel == 0) return;
    c10::cuda::CUDAGuard guard(in.device());
    dispatch_index(numel, [&](auto index) {
      using index_t = decltype(index);
      map_windows_kernel<kToOffsets, index_t, in_t, out_t><<<blocks_for(numel), kThreads, 0,
                                                             c10::cuda::getCurrentCUDAStream()>>>(
          static_cast<const in_t*>(in.const_data_ptr()), w, index_t(numel),
          IntDivider<index_t>(index_t(in.size(3))), IntDivider<index_t>(index_t(in.size(2))),
          IntDivider<index_t>(index_t(in.size(1))), static_cast<out_t*>(out.data_ptr()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace

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
