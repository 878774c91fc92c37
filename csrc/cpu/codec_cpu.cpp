// CPU kernels: parallel over groups, each a thin loop over the shared math in common/codec.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/codec.h"
#include "../common/window.h"

namespace actnn {
namespace {

// The hot loops are also compiled for AVX-512 (x86-64-v4) and AVX2 and picked at run time: the
// same IEEE operations in every build, so the same bits.
#if defined(__GNUC__) && defined(__x86_64__)
#define ACTNN_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define ACTNN_CPU_CLONES
#endif

#if defined(__GNUC__)
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

// Lane i of `out` = lane (i + W) % 8 of v (by reference: vector arguments by value would depend
// on the clone's ABI).
template <int W, typename V>
inline void rotate_lanes(const V& v, V& out) {
  out = __builtin_shufflevector(v, v, W % 8, (W + 1) % 8, (W + 2) % 8, (W + 3) % 8, (W + 4) % 8,
                                (W + 5) % 8, (W + 6) % 8, (W + 7) % 8);
}

// Folds lanes i + W into lanes i of a min, a max and a flag vector.
template <int W>
inline void fold_lanes(f8& lo, f8& hi, i8& flag) {
  f8 lo2, hi2;
  i8 flag2;
  rotate_lanes<W>(lo, lo2);
  rotate_lanes<W>(hi, hi2);
  rotate_lanes<W>(flag, flag2);
  lo = lo2 < lo ? lo2 : lo;
  hi = hi2 > hi ? hi2 : hi;
  flag |= flag2;
}
#endif

// Min and max of a group. 32 values at a time in four independent chains of 8 lanes (which hide
// the latency of min/max) with GCC/Clang vector types, compiled to SSE or AVX2 by the clone in
// use, then lanes folded by shuffles; a non-finite value is flagged from its exponent bits (a NaN
// lane never wins a comparison), since only whether the group is finite matters then. The order
// of the reduction does not change the result (only which zero is found, and sample_stats stores
// -0 as +0 while a group's codes do not depend on it).
ACTNN_CPU_CLONES
void group_range(const float* values, int64_t len, float& lo_out, float& hi_out) {
  float lo = values[0], hi = values[0];
  bool finite = true;
  int64_t j = 0;
#if defined(__GNUC__)
  constexpr int kChains = 4;
  if (len >= 8 * kChains) {
    f8 vlo[kChains], vhi[kChains];
    i8 nonfinite[kChains] = {};
    for (int c = 0; c < kChains; ++c) {
      memcpy(&vlo[c], values + 8 * c, sizeof(f8));
      vhi[c] = vlo[c];
    }
    for (; j + 8 * kChains <= len; j += 8 * kChains) {
      for (int c = 0; c < kChains; ++c) {
        f8 v;
        i8 u;
        memcpy(&v, values + j + 8 * c, sizeof(f8));
        memcpy(&u, values + j + 8 * c, sizeof(i8));
        vlo[c] = v < vlo[c] ? v : vlo[c];
        vhi[c] = v > vhi[c] ? v : vhi[c];
        nonfinite[c] |= (u & 0x7F800000) == 0x7F800000;
      }
    }
    for (int c = 1; c < kChains; ++c) {
      vlo[0] = vlo[c] < vlo[0] ? vlo[c] : vlo[0];
      vhi[0] = vhi[c] > vhi[0] ? vhi[c] : vhi[0];
      nonfinite[0] |= nonfinite[c];
    }
    fold_lanes<4>(vlo[0], vhi[0], nonfinite[0]);
    fold_lanes<2>(vlo[0], vhi[0], nonfinite[0]);
    fold_lanes<1>(vlo[0], vhi[0], nonfinite[0]);
    lo = vlo[0][0];
    hi = vhi[0][0];
    finite = !nonfinite[0][0];
  }
#endif
  for (; j < len; ++j) {
    lo = min_nan(lo, values[j]);
    hi = max_nan(hi, values[j]);
  }
  lo_out = finite ? lo : NAN;
  hi_out = hi;
}

ACTNN_CPU_CLONES
void quantize_levels(const float* values, int64_t len, float mn, float inv_scale, int max_level,
                     RngKey key, uint64_t first, bool stochastic, uint8_t* levels) {
  if (stochastic) {
    // Element indices first + j in 32-bit halves: the low half steps until it wraps (if ever).
    const uint32_t lo = uint32_t(first), hi = uint32_t(first >> 32);
    const int64_t before_wrap = std::min<int64_t>(len, (int64_t(1) << 32) - int64_t(lo));
    uint32_t salt = rng_salt(key, hi);
    for (int64_t j = 0; j < before_wrap; ++j)
      levels[j] = uint8_t(quantize_value(values[j], mn, inv_scale, max_level,
                                         uniform_salted(salt, lo + uint32_t(j))));
    salt = rng_salt(key, hi + 1);
    for (int64_t j = before_wrap; j < len; ++j)
      levels[j] = uint8_t(quantize_value(values[j], mn, inv_scale, max_level,
                                         uniform_salted(salt, uint32_t(j - before_wrap))));
  } else {
    for (int64_t j = 0; j < len; ++j)
      levels[j] = uint8_t(quantize_value(values[j], mn, inv_scale, max_level, 0.5f));
  }
}

// Unpacks and dequantizes `len` values of BITS bits starting at value `start` of a sample.
template <int BITS, typename scalar_t>
void dequantize_values(const uint8_t* sample_data, int64_t start, int64_t len, float mn,
                       float scale, scalar_t* out) {
  constexpr int kPerByte = 8 / BITS;
  const uint8_t* in = sample_data + start / kPerByte;  // start is a multiple of 8
  const int64_t full = len / kPerByte;
  for (int64_t k = 0; k < full; ++k)
    for (int i = 0; i < kPerByte; ++i)
      out[k * kPerByte + i] = scalar_t(dequantize_value(
          (uint32_t(in[k]) >> (i * BITS)) & ((1u << BITS) - 1u), mn, scale));
  for (int64_t j = full * kPerByte; j < len; ++j)
    out[j] = scalar_t(dequantize_value(unpack_value(sample_data, start + j, BITS), mn, scale));
}

// Packs values[0, count) at BITS bits into out.
template <int BITS>
void pack_values(const uint8_t* values, int64_t count, uint8_t* out) {
  constexpr int kPerByte = 8 / BITS;
  const int64_t full = count / kPerByte;
  for (int64_t k = 0; k < full; ++k) out[k] = pack_full_byte<BITS>(values + k * kPerByte);
  if (full * kPerByte < count) out[full] = pack_byte(values, count, full, BITS);
}

// Calls f(std::integral_constant<int, b>) for a run-time bit width b.
template <typename F>
void dispatch_bits(int b, F&& f) {
  switch (b) {
    case 1: return f(std::integral_constant<int, 1>());
    case 2: return f(std::integral_constant<int, 2>());
    case 4: return f(std::integral_constant<int, 4>());
    default: return f(std::integral_constant<int, 8>());
  }
}

// The two passes of quantize over a group: its range, then (once its sample's grid is known) its
// codes and packed values.
template <typename scalar_t>
struct GroupQuantizer {
  const scalar_t* x;
  const uint8_t* bits;
  const int64_t* offsets;
  int64_t sample_size, group_size, groups_per_sample;
  RngKey key;
  bool stochastic;
  float* ranges;  // (groups, 2): each group's min and max, from the first pass
  SampleGrid* grids;
  float* sample_meta;
  uint8_t* data;
  uint8_t* meta;

  // A thread's buffers: a group's values as float32 (for float16 and bfloat16) and its levels.
  struct Scratch {
    std::vector<float> converted;
    std::vector<uint8_t> levels;
  };

  Scratch scratch() const {
    const int64_t longest = std::min(group_size, sample_size);  // group_size may be huge
    return Scratch{std::vector<float>(std::is_same_v<scalar_t, float> ? 0 : longest),
                   std::vector<uint8_t>(longest)};
  }

  // The float32 values of `group`, its length and its first element's index (also the random
  // counter).
  const float* values(int64_t group, Scratch& scratch, int64_t& len, int64_t& first) const {
    const int64_t start = (group % groups_per_sample) * group_size;
    len = std::min(group_size, sample_size - start);
    first = group / groups_per_sample * sample_size + start;
    if constexpr (std::is_same_v<scalar_t, float>) {
      return x + first;
    } else {
      for (int64_t j = 0; j < len; ++j) scratch.converted[j] = float(x[first + j]);
      return scratch.converted.data();
    }
  }

  void range(int64_t group, Scratch& scratch) const {
    int64_t len, first;
    const float* v = values(group, scratch, len, first);
    group_range(v, len, ranges[2 * group], ranges[2 * group + 1]);
  }

  // Sample s's stored min and range and its grid, from its groups' ranges.
  void finish_sample(int64_t s) const {
    const float* r = ranges + 2 * s * groups_per_sample;
    float lo = r[0], hi = r[1];
    for (int64_t g = 1; g < groups_per_sample; ++g) {
      lo = min_nan(lo, r[2 * g]);
      hi = max_nan(hi, r[2 * g + 1]);
    }
    const int levels = (1 << bits[s]) - 1;
    const SampleStats stats = sample_stats(lo, hi, levels);
    sample_meta[2 * s] = stats.min;
    sample_meta[2 * s + 1] = stats.range;
    grids[s] = sample_grid(stats.min, stats.range, levels);
  }

  void code(int64_t group, Scratch& scratch) const {
    int64_t len, first;
    const float* v = values(group, scratch, len, first);
    const int64_t n = group / groups_per_sample;
    const int b = bits[n], max_level = (1 << b) - 1;
    const GroupCodes c = group_codes(grids[n], ranges[2 * group], ranges[2 * group + 1], max_level);
    meta[2 * group] = uint8_t(c.min_code);
    meta[2 * group + 1] = uint8_t(c.scale_code);
    quantize_levels(v, len, c.min, c.inv_scale, max_level, key, uint64_t(first), stochastic,
                    scratch.levels.data());
    uint8_t* out = data + offsets[n] + (first - n * sample_size) * b / 8;
    dispatch_bits(b, [&](auto bits_c) {
      pack_values<decltype(bits_c)::value>(scratch.levels.data(), len, out);
    });
  }
};

// Values per thread in a chunk of samples (at least one sample): about 1 MB of float32, which
// stays in a core's cache between the two passes.
constexpr int64_t kChunkValues = int64_t(1) << 18;

// A group is coded on its sample's grid, which needs the range of the whole sample: the groups are
// read twice. Samples go in chunks; step k codes the groups of chunk k - 1 (ranged at step k - 1,
// still in cache) beside ranging those of chunk k (whose reads from memory overlap the coding's
// arithmetic: a pass that only ranged would wait for memory), then finishes chunk k's samples.
// Item i of a step is group i of both chunks, so a thread codes the groups it ranged.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& x,
                                                            const at::Tensor& bits,
                                                            const at::Tensor& offsets,
                                                            int64_t group_size, int64_t seed,
                                                            bool stochastic, int64_t total_bytes) {
  check_quantize_args(x, bits, offsets, group_size, total_bytes);
  const int64_t n = x.size(0), sample_size = x.size(1);
  check_stream_values(bits.const_data_ptr<uint8_t>(), offsets.const_data_ptr<int64_t>(), n,
                      sample_size, total_bytes);

  const int64_t groups_per_sample = num_groups(sample_size, group_size);
  const int64_t groups = n * groups_per_sample;
  // Slack bytes (between samples' streams or after the last) are zeroed, never left stale.
  at::Tensor data = at::zeros({total_bytes}, x.options().dtype(at::kByte));
  at::Tensor meta = at::empty({groups, 2}, x.options().dtype(at::kByte));
  at::Tensor sample_meta = at::zeros({n, 2}, x.options().dtype(at::kFloat));  // empty samples: 0
  if (groups == 0) return {data, meta, sample_meta};
  std::vector<float> ranges(2 * groups);
  std::vector<SampleGrid> grids(n);
  const int64_t chunk = std::max<int64_t>(1, kChunkValues * at::get_num_threads() / sample_size);
  const int64_t chunks = ceil_div(n, chunk);
  auto first_group = [&](int64_t k) { return std::min(n, k * chunk) * groups_per_sample; };
  ACTNN_DISPATCH_FLOAT(x.scalar_type(), "actnn_quantize", [&] {
    const GroupQuantizer<scalar_t> q{x.const_data_ptr<scalar_t>(), bits.const_data_ptr<uint8_t>(),
                                     offsets.const_data_ptr<int64_t>(), sample_size, group_size,
                                     groups_per_sample, rng_key(uint64_t(seed)), stochastic,
                                     ranges.data(), grids.data(), sample_meta.data_ptr<float>(),
                                     data.data_ptr<uint8_t>(), meta.data_ptr<uint8_t>()};
    for (int64_t k = 0; k <= chunks; ++k) {
      const int64_t coded = k > 0 ? first_group(k - 1) : 0, ranged = first_group(k);
      const int64_t to_code = ranged - coded, to_range = first_group(k + 1) - ranged;
      at::parallel_for(0, std::max(to_code, to_range), 16, [&](int64_t begin, int64_t end) {
        auto scratch = q.scratch();
        for (int64_t i = begin; i < end; ++i) {
          if (i < to_code) q.code(coded + i, scratch);
          if (i < to_range) q.range(ranged + i, scratch);
        }
      });
      for (int64_t s = std::min(n, k * chunk); s < std::min(n, (k + 1) * chunk); ++s)
        q.finish_sample(s);
    }
  });
  return {data, meta, sample_meta};
}

// A compressed stream as the dequantize kernels read it.
struct Stream {
  const uint8_t* data;
  const uint8_t* meta;
  const uint8_t* bits;
  const int64_t* offsets;
  int64_t sample_size, group_size, groups_per_sample;
  std::vector<SampleGrid> grids;  // per sample

  Stream(const at::Tensor& data_t, const at::Tensor& meta_t, const at::Tensor& sample_meta_t,
         const at::Tensor& bits_t, const at::Tensor& offsets_t, int64_t n, int64_t sample_size_,
         int64_t group_size_)
      : data(data_t.const_data_ptr<uint8_t>()),
        meta(meta_t.const_data_ptr<uint8_t>()),
        bits(bits_t.const_data_ptr<uint8_t>()),
        offsets(offsets_t.const_data_ptr<int64_t>()),
        sample_size(sample_size_),
        group_size(group_size_),
        groups_per_sample(num_groups(sample_size_, group_size_)) {
    check_stream_values(bits, offsets, n, sample_size, data_t.numel());
    const float* stats = sample_meta_t.const_data_ptr<float>();
    for (int64_t s = 0; s < n; ++s)
      grids.push_back(sample_grid(stats[2 * s], stats[2 * s + 1], (1 << bits[s]) - 1));
  }

  // Dequantizes values [begin, end) of sample `s` into out[0, end - begin); begin is a multiple
  // of 8.
  template <typename scalar_t>
  void dequantize_range(int64_t s, int64_t begin, int64_t end, scalar_t* out) const {
    for (int64_t g = begin / group_size; g * group_size < end; ++g) {
      const int64_t start = std::max(begin, g * group_size);
      const int64_t stop = std::min(end, (g + 1) * group_size);
      const int64_t group = s * groups_per_sample + g;
      const float mn = grid_min(grids[s], meta[2 * group]);
      const float scale = grid_scale(grids[s], meta[2 * group + 1]);
      dispatch_bits(bits[s], [&](auto bits_c) {
        dequantize_values<decltype(bits_c)::value>(data + offsets[s], start, stop - start, mn,
                                                   scale, out + (start - begin));
      });
    }
  }

  // Dequantizes group `group` into its place in `sample_out`, its sample's values.
  template <typename scalar_t>
  void dequantize_group(int64_t group, scalar_t* sample_out) const {
    const int64_t start = (group % groups_per_sample) * group_size;
    dequantize_range(group / groups_per_sample, start,
                     std::min(start + group_size, sample_size), sample_out + start);
  }
};

at::Tensor dequantize_cpu(const at::Tensor& data, const at::Tensor& meta,
                          const at::Tensor& sample_meta, const at::Tensor& bits,
                          const at::Tensor& offsets, int64_t n, int64_t sample_size,
                          int64_t group_size, at::ScalarType dtype) {
  check_dequantize_args(data, meta, sample_meta, bits, offsets, n, sample_size, group_size, dtype);
  const Stream stream(data, meta, sample_meta, bits, offsets, n, sample_size, group_size);
  at::Tensor out = at::empty({n, sample_size}, data.options().dtype(dtype));
  ACTNN_DISPATCH_FLOAT(dtype, "actnn_dequantize", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n * stream.groups_per_sample, 16, [&](int64_t begin, int64_t end) {
      for (int64_t group = begin; group < end; ++group)
        stream.dequantize_group(group, op + group / stream.groups_per_sample * sample_size);
    });
  });
  return out;
}

// Transposing loops go over square tiles of this size, whose rows stay in L1.
constexpr int64_t kTile = 32;

// Calls f(r, c) for rows [r0, r1) and columns [c0, c1), column by column.
template <typename F>
void visit_tile(int64_t r0, int64_t r1, int64_t c0, int64_t c1, F&& f) {
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t r = r0; r < r1; ++r) f(r, c);
}

// Calls f(r, c) for every element of a rows x cols matrix, tile by tile: the tiles of all rows
// for one band of columns, then the next band, so that a transposed (cols x rows) output is
// written in order.
template <typename F>
void visit_tiled(int64_t rows, int64_t cols, F&& f) {
  for (int64_t c0 = 0; c0 < cols; c0 += kTile)
    for (int64_t r0 = 0; r0 < rows; r0 += kTile)
      visit_tile(r0, std::min(rows, r0 + kTile), c0, std::min(cols, c0 + kTile), f);
}

// dst (cols x rows, rows `dst_ld` apart) = src (rows x cols, rows `src_ld` apart) transposed.
template <typename scalar_t>
void transpose(const scalar_t* src, int64_t src_ld, int64_t rows, int64_t cols, scalar_t* dst,
               int64_t dst_ld) {
  visit_tiled(rows, cols,
              [&](int64_t r, int64_t c) { dst[c * dst_ld + r] = src[r * src_ld + c]; });
}

#if defined(__GNUC__)
// The 8 x 8 block in rows r[0..7] transposed in registers (interleave pairs of rows, then pairs
// of pairs, then halves).
inline void transpose8x8(f8 r[8]) {
  f8 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    for (int k = 0; k < 2; ++k) {
      u[i + k] = __builtin_shufflevector(t[i + k], t[i + k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + k + 2] = __builtin_shufflevector(t[i + k], t[i + k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  }
  // u[0..3] hold columns 0, 2, 1, 3 (low halves) and 4, 6, 5, 7 (high halves) of rows 0-3
  const int column[4] = {0, 2, 1, 3};
  for (int k = 0; k < 4; ++k) {
    r[column[k]] = __builtin_shufflevector(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[column[k] + 4] = __builtin_shufflevector(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// float32, the common case: tiles in 8 x 8 register blocks (the rows and columns beyond the
// last multiple of 8 one by one), also in AVX-512 and AVX2.
ACTNN_CPU_CLONES
void transpose(const float* src, int64_t src_ld, int64_t rows, int64_t cols, float* dst,
               int64_t dst_ld) {
  const int64_t rows8 = rows / 8 * 8, cols8 = cols / 8 * 8;
  auto one = [&](int64_t r, int64_t c) { dst[c * dst_ld + r] = src[r * src_ld + c]; };
  visit_tile(rows8, rows, 0, cols, one);
  visit_tile(0, rows8, cols8, cols, one);
  for (int64_t c0 = 0; c0 < cols8; c0 += kTile) {
    const int64_t c1 = std::min(cols8, c0 + kTile);
    for (int64_t r0 = 0; r0 < rows8; r0 += kTile) {
      const int64_t r1 = std::min(rows8, r0 + kTile);
      for (int64_t c = c0; c < c1; c += 8) {
        for (int64_t r = r0; r < r1; r += 8) {
          f8 block[8];
          for (int i = 0; i < 8; ++i) memcpy(&block[i], src + (r + i) * src_ld + c, sizeof(f8));
          transpose8x8(block);
          for (int i = 0; i < 8; ++i) memcpy(dst + (c + i) * dst_ld + r, &block[i], sizeof(f8));
        }
      }
    }
  }
}
#endif

// Bytes of a task's buffer of dequantized values: well within a core's L2 cache.
constexpr int64_t kBlockBytes = 512 * 1024;

// A task dequantizes columns [c0, c1) of every row of a sample into a buffer, then transposes it
// into output rows c0..c1 - 1, which are consecutive: the output is written in order (1.6-2.5x
// faster into resident memory, 1.2-1.3x into new pages, than transposing blocks of whole rows
// into places `rows` apart; 2x faster than dequantizing and copying into channels_last with
// torch). Each row's span is dequantized from the byte it starts in (up to 7 values more,
// dropped), placed so that column c0 of every row lands at the same offset of its buffer row.
at::Tensor dequantize_transposed_cpu(const at::Tensor& data, const at::Tensor& meta,
                                     const at::Tensor& sample_meta, const at::Tensor& bits,
                                     const at::Tensor& offsets, int64_t n, int64_t rows,
                                     int64_t cols, int64_t group_size, at::ScalarType dtype) {
  check_dequantize_transposed_args(data, meta, sample_meta, bits, offsets, n, rows, cols,
                                   group_size, dtype);
  const int64_t sample_size = rows * cols;
  const Stream stream(data, meta, sample_meta, bits, offsets, n, sample_size, group_size);
  at::Tensor out = at::empty({n, cols, rows}, data.options().dtype(dtype));
  ACTNN_DISPATCH_FLOAT(dtype, "actnn_dequantize_transposed", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    if (rows == 0) return;
    const int64_t fit = kBlockBytes / (rows * int64_t(sizeof(scalar_t))) / 8 * 8;
    const int64_t span = std::max<int64_t>(8, std::min(fit, (cols + 7) / 8 * 8));
    const int64_t spans = (cols + span - 1) / span;
    const int64_t ld = span + 8;  // a row's span starts at offset 8 of its buffer row
    at::parallel_for(0, n * spans, 1, [&](int64_t begin, int64_t end) {
      const at::Tensor buffer = at::empty({rows * ld}, out.options());
      scalar_t* values = buffer.data_ptr<scalar_t>();
      for (int64_t task = begin; task < end; ++task) {
        const int64_t s = task / spans, c0 = task % spans * span;
        const int64_t c1 = std::min(cols, c0 + span);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t first = r * cols + c0, skew = first % 8;
          stream.dequantize_range(s, first - skew, r * cols + c1, values + r * ld + 8 - skew);
        }
        transpose(values + 8, ld, rows, c1 - c0, op + s * sample_size + c0 * rows, rows);
      }
    });
  });
  return out;
}

at::Tensor pack_bits_cpu(const at::Tensor& values, int64_t bits) {
  check_pack_args(values, bits);
  const int64_t count = values.numel(), per_byte = 8 / bits;
  at::Tensor packed =
      at::empty({(count + per_byte - 1) / per_byte}, values.options().dtype(at::kByte));
  const uint8_t* in = reinterpret_cast<const uint8_t*>(values.const_data_ptr());
  uint8_t* out = packed.data_ptr<uint8_t>();
  at::parallel_for(0, packed.numel(), 4096, [&](int64_t begin, int64_t end) {
    dispatch_bits(int(bits), [&](auto bits_c) {
      const int64_t first = begin * per_byte;
      pack_values<decltype(bits_c)::value>(in + first, std::min(count, end * per_byte) - first,
                                           out + begin);
    });
  });
  return packed;
}

at::Tensor unpack_bits_cpu(const at::Tensor& packed, int64_t bits, int64_t numel) {
  check_unpack_args(packed, bits, numel);
  at::Tensor values = at::empty({numel}, packed.options());
  const uint8_t* in = packed.const_data_ptr<uint8_t>();
  uint8_t* out = values.data_ptr<uint8_t>();
  at::parallel_for(0, numel, 16384, [&](int64_t begin, int64_t end) {
    dispatch_bits(int(bits), [&](auto bits_c) {
      constexpr int kBits = decltype(bits_c)::value;
      for (int64_t j = begin; j < end; ++j) out[j] = uint8_t(unpack_value(in, j, kBits));
    });
  });
  return values;
}

// Bytes [begin, end) of pack_positive, all full.
template <typename scalar_t>
void pack_positive_bytes(const scalar_t* in, int64_t begin, int64_t end, uint8_t* out) {
  for (int64_t k = begin; k < end; ++k) {
    uint32_t byte = 0;
    for (int i = 0; i < 8; ++i) byte |= positive_bit(float(in[8 * k + i])) << i;
    out[k] = uint8_t(byte);
  }
}

// float32 also in AVX-512 and AVX2 (overload resolution prefers this one).
ACTNN_CPU_CLONES
void pack_positive_range(const float* in, int64_t begin, int64_t end, uint8_t* out) {
  pack_positive_bytes(in, begin, end, out);
}

template <typename scalar_t>
void pack_positive_range(const scalar_t* in, int64_t begin, int64_t end, uint8_t* out) {
  pack_positive_bytes(in, begin, end, out);
}

at::Tensor pack_positive_cpu(const at::Tensor& values) {
  check_pack_positive_args(values);
  const int64_t numel = values.numel(), full = numel / 8;
  at::Tensor packed = at::empty({(numel + 7) / 8}, values.options().dtype(at::kByte));
  uint8_t* out = packed.data_ptr<uint8_t>();
  ACTNN_DISPATCH_FLOAT(values.scalar_type(), "actnn_pack_positive", [&] {
    const scalar_t* in = values.const_data_ptr<scalar_t>();
    at::parallel_for(0, full, 2048, [&](int64_t begin, int64_t end) {
      pack_positive_range(in, begin, end, out);
    });
    if (full * 8 < numel) {  // the last, partial byte
      uint32_t byte = 0;
      for (int64_t j = full * 8; j < numel; ++j)
        byte |= positive_bit(float(in[j])) << (j - full * 8);
      out[full] = uint8_t(byte);
    }
  });
  return packed;
}

// Values [8 * begin, 8 * end) of apply_mask, the mask bytes [begin, end) all full.
template <typename scalar_t>
void apply_mask_bytes(const scalar_t* in, const uint8_t* mask, float scale, int64_t begin,
                      int64_t end, scalar_t* out) {
  for (int64_t k = begin; k < end; ++k)
    for (int i = 0; i < 8; ++i)
      out[8 * k + i] = scalar_t(masked_value(float(in[8 * k + i]), (mask[k] >> i) & 1u, scale));
}

// float32, the common case, also in AVX-512 and AVX2 (overload resolution prefers this one).
ACTNN_CPU_CLONES
void apply_mask_range(const float* in, const uint8_t* mask, float scale, int64_t begin,
                      int64_t end, float* out) {
  apply_mask_bytes(in, mask, scale, begin, end, out);
}

template <typename scalar_t>
void apply_mask_range(const scalar_t* in, const uint8_t* mask, float scale, int64_t begin,
                      int64_t end, scalar_t* out) {
  apply_mask_bytes(in, mask, scale, begin, end, out);
}

// The 8 x 8 bit matrix with element (i, j) at bit 8 i + j, transposed (three rounds of swapping
// the off-diagonal quarters of 2 x 2, 4 x 4, then 8 x 8 blocks).
uint64_t transpose_bits(uint64_t x) {
  uint64_t t = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAull;
  x ^= t ^ (t << 7);
  t = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCull;
  x ^= t ^ (t << 14);
  t = (x ^ (x >> 28)) & 0x00000000F0F0F0F0ull;
  return x ^ t ^ (t << 28);
}

// Bits [bit, bit + 8) of a mask of `bytes` bytes as a byte (bits past its end read as 0).
uint32_t byte_at_bit(const uint8_t* mask, int64_t bytes, int64_t bit) {
  const int64_t k = bit >> 3;
  const int shift = int(bit & 7);
  const uint32_t next = shift && k + 1 < bytes ? mask[k + 1] : 0u;
  return ((uint32_t(mask[k]) | next << 8) >> shift) & 0xFFu;
}

// The (rows, cols) bit matrix at bit `first` of a mask of `bytes` bytes, rows a multiple of 8, in
// (cols, rows) order: 8 x 8 blocks transposed, the last cols % 8 columns bit by bit.
void transpose_mask(const uint8_t* mask, int64_t bytes, int64_t first, int64_t rows,
                    int64_t cols, uint8_t* out) {
  const int64_t full = cols / 8 * 8;
  for (int64_t r = 0; r < rows; r += 8) {
    for (int64_t c = 0; c < full; c += 8) {
      uint64_t block = 0;  // byte i: row r + i, columns c..c + 7
      for (int i = 0; i < 8; ++i)
        block |= uint64_t(byte_at_bit(mask, bytes, first + (r + i) * cols + c)) << (8 * i);
      block = transpose_bits(block);  // byte j: column c + j, rows r..r + 7
      for (int j = 0; j < 8; ++j) out[((c + j) * rows + r) / 8] = uint8_t(block >> (8 * j));
    }
    for (int64_t c = full; c < cols; ++c) {
      uint32_t byte = 0;
      for (int i = 0; i < 8; ++i) byte |= unpack_value(mask, first + (r + i) * cols + c, 1) << i;
      out[(c * rows + r) / 8] = uint8_t(byte);
    }
  }
}

// Each sample's mask is put in the values' order by transposing 8 x 8 bit blocks, then applied in
// order; when rows (channels) are not a multiple of 8, a rare case, each value reads its bit.
at::Tensor apply_mask_transposed_cpu(const at::Tensor& values, const at::Tensor& mask,
                                     double scale) {
  check_apply_mask_transposed_args(values, mask);
  at::Tensor out = at::empty_like(values);
  const int64_t n = values.size(0), cols = values.size(1), rows = values.size(2);
  const int64_t sample_size = rows * cols;
  const uint8_t* bits = mask.const_data_ptr<uint8_t>();
  const float s = float(scale);
  ACTNN_DISPATCH_FLOAT(values.scalar_type(), "actnn_apply_mask_transposed", [&] {
    const scalar_t* in = values.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> kept(rows % 8 ? 0 : sample_size / 8);
      for (int64_t sample = begin; sample < end; ++sample) {
        const int64_t first = sample * sample_size;
        if (rows % 8 == 0) {
          transpose_mask(bits, mask.numel(), first, rows, cols, kept.data());
          apply_mask_range(in + first, kept.data(), s, 0, sample_size / 8, o + first);
          continue;
        }
        visit_tiled(rows, cols, [&](int64_t r, int64_t c) {
          const int64_t k = first + c * rows + r;
          o[k] = scalar_t(masked_value(float(in[k]), unpack_value(bits, first + r * cols + c, 1),
                                       s));
        });
      }
    });
  });
  return out;
}

at::Tensor apply_mask_cpu(const at::Tensor& values, const at::Tensor& mask, double scale) {
  check_apply_mask_args(values, mask);
  at::Tensor out = at::empty_like(values);
  const int64_t numel = values.numel(), full = numel / 8;
  const uint8_t* bits = mask.const_data_ptr<uint8_t>();
  const float s = float(scale);
  ACTNN_DISPATCH_FLOAT(values.scalar_type(), "actnn_apply_mask", [&] {
    const scalar_t* in = values.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, full, 2048, [&](int64_t begin, int64_t end) {
      apply_mask_range(in, bits, s, begin, end, o);
    });
    for (int64_t j = full * 8; j < numel; ++j)  // the last, partial byte
      o[j] = scalar_t(masked_value(float(in[j]), unpack_value(bits, j, 1), s));
  });
  return out;
}

// The BatchNorm loops below are templates inlined into float32 wrappers compiled as clones
// (vectorized across channels for AVX-512 / AVX2), the other dtypes calling them directly.

// Adds to sums[0..2][c] the sums of g, g * x and x * x over rows [begin, end) of `channels`.
template <typename scalar_t>
inline void add_row_sums_impl(const scalar_t* g, const scalar_t* x, int64_t begin, int64_t end,
                              int64_t channels, double* sums) {
  double* s0 = sums;
  double* s1 = sums + channels;
  double* s2 = sums + 2 * channels;
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* gr = g + r * channels;
    const scalar_t* xr = x + r * channels;
    for (int64_t c = 0; c < channels; ++c) {
      const float gv = float(gr[c]), xv = float(xr[c]);
      s0[c] += gv;
      s1[c] += gv * xv;
      s2[c] += xv * xv;
    }
  }
}

// x = coef[0] * x + coef[1] * g + coef[2] over rows [begin, end) of `channels`.
template <typename scalar_t>
inline void combine_rows_impl(scalar_t* x, const scalar_t* g, int64_t begin, int64_t end,
                              int64_t channels, const float* coef) {
  const float* a = coef;
  const float* b = coef + channels;
  const float* c = coef + 2 * channels;
  for (int64_t r = begin; r < end; ++r) {
    scalar_t* xr = x + r * channels;
    const scalar_t* gr = g + r * channels;
    for (int64_t k = 0; k < channels; ++k)
      xr[k] = scalar_t(combine_value(a[k], b[k], c[k], float(xr[k]), float(gr[k])));
  }
}

template <typename scalar_t>
void add_row_sums(const scalar_t* g, const scalar_t* x, int64_t begin, int64_t end,
                  int64_t channels, double* sums) {
  add_row_sums_impl(g, x, begin, end, channels, sums);
}
ACTNN_CPU_CLONES
void add_row_sums(const float* g, const float* x, int64_t begin, int64_t end, int64_t channels,
                  double* sums) {
  add_row_sums_impl(g, x, begin, end, channels, sums);
}
template <typename scalar_t>
void combine_rows(scalar_t* x, const scalar_t* g, int64_t begin, int64_t end, int64_t channels,
                  const float* coef) {
  combine_rows_impl(x, g, begin, end, channels, coef);
}
ACTNN_CPU_CLONES
void combine_rows(float* x, const float* g, int64_t begin, int64_t end, int64_t channels,
                  const float* coef) {
  combine_rows_impl(x, g, begin, end, channels, coef);
}

// Chunks of rows summed in parallel, then added up in order (codec.h's batch_norm_chunk_rows):
// the same bits whatever the number of threads, and the same as the CUDA kernel's.
at::Tensor batch_norm_sums_cpu(const at::Tensor& grad, const at::Tensor& xh) {
  check_batch_norm_args(grad, xh);
  const int64_t rows = xh.size(0), channels = xh.size(1);
  const int64_t chunk_rows = batch_norm_chunk_rows(rows);
  const int64_t chunks = ceil_div(rows, chunk_rows);
  std::vector<double> partial(chunks * 3 * channels, 0.0);
  ACTNN_DISPATCH_FLOAT(xh.scalar_type(), "actnn_batch_norm_sums", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* x = xh.const_data_ptr<scalar_t>();
    const int64_t grain =
        std::max<int64_t>(1, 16384 / std::max<int64_t>(1, chunk_rows * channels));
    at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k)
        add_row_sums(g, x, k * chunk_rows, std::min(rows, (k + 1) * chunk_rows), channels,
                     partial.data() + k * 3 * channels);
    });
  });
  std::vector<double> total(3 * channels, 0.0);
  for (int64_t k = 0; k < chunks; ++k)
    for (int64_t i = 0; i < 3 * channels; ++i) total[i] += partial[k * 3 * channels + i];
  at::Tensor sums = at::empty({3, channels}, xh.options().dtype(at::kFloat));
  float* out = sums.data_ptr<float>();
  for (int64_t i = 0; i < 3 * channels; ++i) out[i] = float(total[i]);
  return sums;
}

void batch_norm_combine_cpu(at::Tensor& xh, const at::Tensor& grad, const at::Tensor& coef) {
  check_batch_norm_args(grad, xh);
  check_batch_norm_coef(coef, xh);
  const int64_t rows = xh.size(0), channels = xh.size(1);
  ACTNN_DISPATCH_FLOAT(xh.scalar_type(), "actnn_batch_norm_combine", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* x = xh.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, channels)),
                     [&](int64_t begin, int64_t end) {
      combine_rows(x, g, begin, end, channels, coef.const_data_ptr<float>());
    });
  });
}

// Sum of squares of a run in codec.h's order: kSquaresLanes float32 lanes (independent sums the
// compiler vectorizes) added up in double, then the tail.
ACTNN_CPU_CLONES
double sum_squares(const float* values, int64_t len) {
  constexpr int kLanes = kSquaresLanes;
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += values[j + l] * values[j + l];
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  for (; j < len; ++j) total += double(values[j] * values[j]);
  return total;
}

// Per row of x, the statistic of the runs `sample` picks (term: of a run, as float32).
template <typename Term>
at::Tensor row_stats(const at::Tensor& x, RowSample sample, Term term) {
  const int64_t n = x.size(0), m = x.size(1);
  at::Tensor out = at::zeros({n}, x.options().dtype(at::kDouble));
  if (sample.count == 0) return out;
  double* result = out.data_ptr<double>();
  ACTNN_DISPATCH_FLOAT(x.scalar_type(), "actnn_row_stats", [&] {
    const scalar_t* rows = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, 32768 / (sample.count * sample.len)),
                     [&](int64_t begin, int64_t end) {
      std::vector<float> converted(std::is_same_v<scalar_t, float> ? 0 : sample.len);
      for (int64_t r = begin; r < end; ++r) {
        // The runs are far apart and usually out of the cache: ask for all of a row's at once
        // (1.8x faster than letting each run's first read miss).
        for (int64_t k = 0; k < sample.count; ++k) {
          const char* run = reinterpret_cast<const char*>(rows + r * m + k * sample.step);
#if defined(__GNUC__)
          for (int64_t b = 0; b < sample.len * int64_t(sizeof(scalar_t)); b += 64)
            __builtin_prefetch(run + b);
#endif
        }
        double total = 0.0;
        for (int64_t k = 0; k < sample.count; ++k) {
          const scalar_t* run = rows + r * m + k * sample.step;
          const float* values;
          if constexpr (std::is_same_v<scalar_t, float>) {
            values = run;
          } else {
            for (int64_t j = 0; j < sample.len; ++j) converted[j] = float(run[j]);
            values = converted.data();
          }
          total += term(values, sample.len);
        }
        result[r] = total * sample.scale;
      }
    });
  });
  return out;
}

at::Tensor mean_square_range_cpu(const at::Tensor& x, int64_t group_size, int64_t max_groups) {
  check_mean_square_range_args(x, group_size, max_groups);
  return row_stats(x, range_sample(x.size(1), group_size, max_groups),
                   [](const float* values, int64_t len) {
                     float lo, hi;
                     group_range(values, len, lo, hi);
                     return squared_range(lo, hi);
                   });
}

at::Tensor sum_of_squares_cpu(const at::Tensor& x, int64_t max_values, int64_t blocks) {
  check_sum_of_squares_args(x, max_values, blocks);
  return row_stats(x, squares_sample(x.size(1), max_values, blocks), &sum_squares);
}

// window.h's Map: rows of (plane, oh) spread over the threads.
template <bool kToOffsets, typename in_t, typename out_t>
struct MapWindows {
  static void run(const at::Tensor& in, const Window& w, at::Tensor& out) {
    const in_t* src = static_cast<const in_t*>(in.const_data_ptr());
    out_t* dst = static_cast<out_t*>(out.data_ptr());
    const int64_t out_h = in.size(1), out_w = in.size(2), inner = in.size(3);
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, out_w * inner));
    at::parallel_for(0, in.size(0) * out_h, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t oh = r % out_h;
        for (int64_t ow = 0; ow < out_w; ++ow)
          for (int64_t k = 0; k < inner; ++k) {
            const int64_t e = (r * out_w + ow) * inner + k;
            dst[e] = out_t(kToOffsets ? window_offset(w, oh, ow, int64_t(src[e]))
                                      : window_index(w, oh, ow, int64_t(src[e])));
          }
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(actnn_mm, CPU, m) {
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("dequantize_transposed", &dequantize_transposed_cpu);
  m.impl("pack_bits", &pack_bits_cpu);
  m.impl("unpack_bits", &unpack_bits_cpu);
  m.impl("pack_positive", &pack_positive_cpu);
  m.impl("apply_mask", &apply_mask_cpu);
  m.impl("apply_mask_transposed", &apply_mask_transposed_cpu);
  m.impl("batch_norm_sums", &batch_norm_sums_cpu);
  m.impl("batch_norm_combine", &batch_norm_combine_cpu);
  m.impl("mean_square_range", &mean_square_range_cpu);
  m.impl("sum_of_squares", &sum_of_squares_cpu);
  m.impl("window_offsets", &window_offsets_impl<MapWindows>);
  m.impl("window_indices", &window_indices_impl<MapWindows>);
}

}  // namespace actnn
