// The activation codec's math, one source for the CPU and CUDA kernels. The pure-PyTorch
// reference (actnn_mm/compress/reference.py) computes the same values with the same float32
// operations, and the tests hold the kernels to it bit for bit, so any change here must be made
// there too.
//
// Format (per sample n of an (N, M) view, bit width b_n in {1, 2, 4, 8}, B_n = 2^b_n - 1):
//   * per sample, its min and range (max - min) as two float32 (sample_meta[2 n], [2 n + 1]);
//     they span the sample's grid (SampleGrid) of 256 group mins and 256 group scales;
//   * groups of G elements (G a multiple of 8, so every group starts on a byte); per group, the
//     codes of its min and scale on its sample's grid as two uint8 (meta[2 * group],
//     meta[2 * group + 1]): 16 bits per group;
//   * element j of sample n is the b_n-bit integer at bit (j * b_n) % 8 of byte
//     offsets[n] + (j * b_n) / 8, least significant bits first; samples start on a byte.
// Arithmetic is plain IEEE float32 with no fused multiply-add (built with contraction off), so
// every backend rounds the same way.
#pragma once

#include <stdint.h>
#include <math.h>
#include <string.h>

#ifdef __CUDACC__
#define ACTNN_HD __host__ __device__ __forceinline__
#else
#define ACTNN_HD inline
#endif

namespace actnn {

// ceil(a / b) for a >= 0 and b > 0, without the overflow of (a + b - 1) / b near 2^63.
ACTNN_HD int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

ACTNN_HD uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

ACTNN_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// Counter-based random numbers: a 32-bit integer hash (a multiply-xorshift round with constants
// found by search for low bias: consecutive inputs give uncorrelated outputs) of the element's
// index under a key derived from the 64-bit seed. Cheap, stateless and identical on every backend.
ACTNN_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

struct RngKey {
  uint32_t lo, hi;
};

ACTNN_HD RngKey rng_key(uint64_t seed) {
  RngKey k;
  k.lo = mix32(uint32_t(seed) ^ 0x9e3779b9u);
  k.hi = mix32(uint32_t(seed >> 32) ^ k.lo);
  return k;
}

// The elements whose 64-bit indices share the high half `hi` share a salt, hashed once, so an
// element costs one hash round: mix32(lo ^ salt) for the low half `lo` of its index.
ACTNN_HD uint32_t rng_salt(RngKey key, uint32_t hi) { return mix32(hi ^ key.hi) ^ key.lo; }

// Uniform in [0, 1) with 24 random bits, so the float is exact (kernels step lo in 32-bit lanes,
// which vectorize best).
ACTNN_HD float uniform_salted(uint32_t salt, uint32_t lo) {
  uint32_t r = mix32(lo ^ salt);
  return float(int32_t(r >> 8)) * 5.9604644775390625e-08f;  // 2^-24 (signed convert vectorizes)
}

ACTNN_HD float uniform(RngKey key, uint64_t index) {
  return uniform_salted(rng_salt(key, uint32_t(index >> 32)), uint32_t(index));
}

// Min and max that propagate NaN (a comparison with NaN is false, so once the running value is
// NaN it stays; `x != x` lets a NaN in), so a group's range reveals a NaN in it.
ACTNN_HD float min_nan(float lo, float x) { return (x < lo || x != x) ? x : lo; }
ACTNN_HD float max_nan(float hi, float x) { return (x > hi || x != x) ? x : hi; }

// The quantizer multiplies by the reciprocal of a group's scale (a division per value costs more
// than the rest of the quantizer): correctly rounded in IEEE float32 on every backend.
ACTNN_HD float reciprocal(float scale) { return 1.f / scale; }

// The top code of a grid's mins and scales (codes are 8 bits).
constexpr int kTopCode = 255;

// 2^(-k/16) for k = 0..15, rounded to nearest float32 (reference.py has the same literals).
ACTNN_HD float scale_step(int k) {
  static constexpr float kSteps[16] = {
      0x1p+0f,        0x1.ea4afap-1f, 0x1.d5818ep-1f, 0x1.c199bep-1f,
      0x1.ae89fap-1f, 0x1.9c4918p-1f, 0x1.8ace54p-1f, 0x1.7a1148p-1f,
      0x1.6a09e6p-1f, 0x1.5ab07ep-1f, 0x1.4bfdaep-1f, 0x1.3dea64p-1f,
      0x1.306fe0p-1f, 0x1.2387a6p-1f, 0x1.172b84p-1f, 0x1.0b5586p-1f};
  return kSteps[k];
}

// 2^(-e/16) for a scale code e: a table entry times 2^-(e/16), an exact product (exp2 would
// round differently in libm and CUDA).
ACTNN_HD float scale_factor(int e) {
  return scale_step(e & 15) * bits_float(uint32_t(127 - (e >> 4)) << 23);
}

// The least base of a grid (the least normal float32): below it (a subnormal range) a base has no
// finite reciprocal, and raising it one float step at a time would take millions of steps.
constexpr float kMinBase = 0x1p-126f;

// The grid of a sample with stored min `min` and range `range` at `levels` levels (a NaN pair
// gives an all-NaN grid):
//   * min code c stands for min + c * step, step = range / 255: c = 0 is the sample's min;
//   * scale code e stands for base * 2^(-e/16), base = range / levels raised (one float step at
//     a time) until range * reciprocal(base) <= levels: code 0 covers the sample's whole range
//     under the quantizer's own float ops, so every group has a scale that covers it. A
//     constant sample (range 0) takes base 1: its values all sit on its min.
// inv_step and inv_span only serve group_codes' first guesses.
struct SampleGrid {
  float min, step, base, inv_step, inv_span;
};

ACTNN_HD SampleGrid sample_grid(float min, float range, int levels) {
  SampleGrid g;
  g.min = min;
  g.step = range / float(kTopCode);
  g.base = range == 0.f ? 1.f : range / float(levels);
  if (g.base < kMinBase) g.base = kMinBase;
  while (range * reciprocal(g.base) > float(levels)) g.base = bits_float(float_bits(g.base) + 1u);
  g.inv_step = reciprocal(g.step);
  g.inv_span = reciprocal(g.base * float(levels));
  return g;
}

ACTNN_HD float grid_min(const SampleGrid& g, int c) { return g.min + float(c) * g.step; }

ACTNN_HD float grid_scale(const SampleGrid& g, int e) { return g.base * scale_factor(e); }

// The stored (min, range) of a sample whose values span [lo, hi] (reductions that propagate
// NaN): -0 stored as +0 (which zero a reduction finds first must not matter), and a NaN pair when
// a value is not finite or the grid is not (a range beyond float32), which the caller reports.
struct SampleStats {
  float min, range;
};

ACTNN_HD bool is_finite(float f) { return f - f == 0.f; }

ACTNN_HD SampleStats sample_stats(float lo, float hi, int levels) {
  const float mn = lo + 0.f;
  const float range = (hi - mn) + 0.f;
  if (is_finite(mn) && is_finite(range) && is_finite(sample_grid(mn, range, levels).base))
    return SampleStats{mn, range};
  const float nan = bits_float(0x7FC00000u);
  return SampleStats{nan, nan};
}

// A first guess of a code from a real-valued estimate (NaN: the top code).
ACTNN_HD int guess_code(float t) {
  return t < float(kTopCode) ? (t > 0.f ? int(t) : 0) : kTopCode;
}

// A group's codes on its sample's grid, for its float range [lo, hi]:
//   * the min code is the largest c with grid_min(c) <= lo (grid_min does not decrease with c,
//     and grid_min(0) is the sample's min);
//   * the scale code is the largest e with (hi - mn) * reciprocal(grid_scale(e)) <= levels for
//     the stored min mn (this does not decrease with e, and holds at e = 0: see SampleGrid).
// Every value x of the group then has (x - mn) * inv_scale in [0, levels] under the quantizer's
// own float ops: no value is clamped, which keeps the rounding unbiased. A constant group whose
// value is on the grid (a constant sample, or ReLU's zeros) gets levels of 0: it is exact.
// Each code starts from a guess, then steps to the largest that satisfies its condition: the
// guess only sets how many steps (usually none), never the result. An all-NaN grid gives codes
// 0 and a NaN min and inv_scale.
struct GroupCodes {
  int min_code, scale_code;
  float min, inv_scale;
};

ACTNN_HD GroupCodes group_codes(const SampleGrid& g, float lo, float hi, int levels) {
  GroupCodes r;
  if (g.min != g.min) {
    r.min_code = r.scale_code = 0;
    r.min = r.inv_scale = g.min;
    return r;
  }
  int c = guess_code((lo - g.min) * g.inv_step);
  while (c > 0 && grid_min(g, c) > lo) --c;
  while (c < kTopCode && grid_min(g, c + 1) <= lo) ++c;
  const float mn = grid_min(g, c), span = hi - mn, top = float(levels);
  int e = guess_code(-16.f * log2f(span * g.inv_span));
  float inv = reciprocal(grid_scale(g, e));
  while (e > 0 && !(span * inv <= top)) inv = reciprocal(grid_scale(g, --e));
  for (; e < kTopCode; ++e) {
    const float next = reciprocal(grid_scale(g, e + 1));
    if (!(span * next <= top)) break;
    inv = next;
  }
  r.min_code = c;
  r.scale_code = e;
  r.min = mn;
  r.inv_scale = inv;
  return r;
}

// Stochastic rounding of x to an integer level: floor(v + u) with v = (x - min) * inv_scale in
// [0, levels] (inv_scale = reciprocal(scale)) and u uniform in [0, 1) gives E[level] = v. u = 0.5
// rounds to nearest instead. t >= 0, so truncation is floor; a NaN fails the comparison and maps
// to `levels`.
ACTNN_HD uint32_t quantize_value(float x, float mn, float inv_scale, int levels, float u) {
  float t = (x - mn) * inv_scale + u;
  return t < float(levels) ? uint32_t(int32_t(t)) : uint32_t(levels);
}

ACTNN_HD float dequantize_value(uint32_t level, float mn, float scale) {
  return mn + float(level) * scale;
}

// Byte k of a packed stream of `count` small integers of `bits` bits each.
ACTNN_HD uint8_t pack_byte(const uint8_t* values, int64_t count, int64_t k, int bits) {
  const int per_byte = 8 / bits;
  uint32_t byte = 0;
  for (int i = 0; i < per_byte && k * per_byte + i < count; ++i)
    byte |= (uint32_t(values[k * per_byte + i]) & ((1u << bits) - 1u)) << (i * bits);
  return uint8_t(byte);
}

// The same for a byte whose 8 / BITS values all exist (no bounds checks: the hot path).
template <int BITS>
ACTNN_HD uint8_t pack_full_byte(const uint8_t* values) {
  uint32_t byte = 0;
  for (int i = 0; i < 8 / BITS; ++i)
    byte |= (uint32_t(values[i]) & ((1u << BITS) - 1u)) << (i * BITS);
  return uint8_t(byte);
}

ACTNN_HD uint32_t unpack_value(const uint8_t* sample_data, int64_t j, int bits) {
  int64_t bit = j * bits;
  return (uint32_t(sample_data[bit >> 3]) >> (bit & 7)) & ((1u << bits) - 1u);
}

// Value of batch_norm_combine: a * x + b * g + c, each operation rounded in that order.
ACTNN_HD float combine_value(float a, float b, float c, float x, float g) {
  return a * x + b * g + c;
}

// Geometry of a 2-D pooling over planes `width` wide: output (oh, ow) reads input row
// oh * stride_h - pad_h + i * dil_h and column ow * stride_w - pad_w + j * dil_w, i < kernel_h,
// j < kernel_w. The reciprocals serve exact_div.
struct Window {
  int64_t width, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  double inv_width, inv_kernel_w, inv_dil_h, inv_dil_w;
};

// floor(a / b) for 0 <= a < 2^50, given inv_b = 1.0 / b: (a + 0.5) / b is at least 0.5 / b from an
// integer and the double product errs by far less, so truncating it is exact (int64 division
// costs ten times more and does not vectorize).
ACTNN_HD int64_t exact_div(int64_t a, double inv_b) { return int64_t((double(a) + 0.5) * inv_b); }

// Position in its window (row-major over the kernel, in dilation steps) of the argmax `index`
// (flat, into its input plane) of output (oh, ow); window_index inverts it.
ACTNN_HD int64_t window_offset(const Window& w, int64_t oh, int64_t ow, int64_t index) {
  const int64_t row = exact_div(index, w.inv_width), col = index - row * w.width;
  return exact_div(row - (oh * w.stride_h - w.pad_h), w.inv_dil_h) * w.kernel_w +
         exact_div(col - (ow * w.stride_w - w.pad_w), w.inv_dil_w);
}

ACTNN_HD int64_t window_index(const Window& w, int64_t oh, int64_t ow, int64_t offset) {
  const int64_t i = exact_div(offset, w.inv_kernel_w), j = offset - i * w.kernel_w;
  return (oh * w.stride_h - w.pad_h + i * w.dil_h) * w.width + ow * w.stride_w - w.pad_w +
         j * w.dil_w;
}

// The values of a row of `m` that the adaptive allocator's statistics read: `count` runs of `len`
// values, run k starting at value k * step; the statistic is `scale` times the sum of the runs'
// terms (see the mean_square_range and sum_of_squares schemas).
struct RowSample {
  int64_t count, len, step;
  double scale;
};

// Every ceil(G / max_groups)-th of the row's G full groups (or a row shorter than one group),
// averaged.
ACTNN_HD RowSample range_sample(int64_t m, int64_t group_size, int64_t max_groups) {
  const int64_t full = m / group_size;
  if (full == 0) return RowSample{m > 0 ? 1 : 0, m, 0, 1.0};
  const int64_t stride = ceil_div(full, max_groups);
  const int64_t count = ceil_div(full, stride);
  return RowSample{count, group_size, stride * group_size, 1.0 / double(count)};
}

// `blocks` blocks of max_values / blocks values spread evenly, scaled up to the row (or a row of
// at most max_values).
ACTNN_HD RowSample squares_sample(int64_t m, int64_t max_values, int64_t blocks) {
  if (m <= max_values) return RowSample{m > 0 ? 1 : 0, m, 0, 1.0};
  const int64_t len = max_values / blocks;
  return RowSample{blocks, len, m / blocks, double(m) / double(blocks * len)};
}

// A group's term of mean_square_range: its range squared, in double.
ACTNN_HD double squared_range(float lo, float hi) {
  const double d = double(hi - lo);
  return d * d;
}

// A run's term of sum_of_squares is added up in a fixed order on every backend: 32 float32
// partial sums (lane l: values l, l + 32, ... of the run's first len / 32 * 32; vector lanes on
// the CPU, a warp's lanes on CUDA), added in order in double, then the squares of the last
// len % 32 values, in order, in double. (The reference sums every square in double; the tests
// allow for the difference.)
constexpr int kSquaresLanes = 32;

// batch_norm_sums adds up each chunk of this many consecutive rows in double (row by row, from
// 0), then the chunks' sums in order: the same sums, bit for bit, on every backend and whatever
// the number of threads. At most 512 chunks (a short second pass), of at least 32 rows (their
// float64 partial sums stay small beside the input).
ACTNN_HD int64_t batch_norm_chunk_rows(int64_t rows) {
  const int64_t rows_per_chunk = ceil_div(rows, 512);
  return rows_per_chunk > 32 ? rows_per_chunk : 32;
}

// Bit of pack_positive: whether the value is > 0 (a NaN is not).
ACTNN_HD uint32_t positive_bit(float value) { return value > 0.f ? 1u : 0u; }

// Element of apply_mask: the value times scale where the mask bit is set, else 0.
ACTNN_HD float masked_value(float value, uint32_t bit, float scale) {
  return bit ? value * scale : 0.f;
}

}  // namespace actnn
