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

namespace actnn {
namespace {

// Reading offsets and bits is cheap on the CPU, so the CPU kernels also check that the stream
// layout they are given is one the format allows.
void check_stream_values(const uint8_t* bits, const int64_t* offsets, int64_t n,
                         int64_t sample_size, int64_t total_bytes) {
  for (int64_t i = 0; i < n; ++i) {
    int b = bits[i];
    TORCH_CHECK(b == 1 || b == 2 || b == 4 || b == 8, "actnn_mm: bit width ", b,
                " of sample ", i, " is not one of 1, 2, 4, 8");
    TORCH_CHECK(offsets[i] >= 0 && offsets[i + 1] - offsets[i] >= (sample_size * b + 7) / 8,
                "actnn_mm: offsets leave sample ", i, " too little room");
  }
  TORCH_CHECK(offsets[n] <= total_bytes, "actnn_mm: offsets point past the data");
}

// The hot loops are also compiled for AVX-512 (x86-64-v4) and AVX2 and picked at run time: the
// same IEEE operations in every build, so the same bits.
#if defined(__GNUC__) && defined(__x86_64__)
#define ACTNN_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define ACTNN_CPU_CLONES
#endif

// Min and max of a group. 32 values at a time in four independent chains of 8 lanes (which hide
// the latency of min/max) with GCC/Clang vector types, compiled to SSE or AVX2 by the clone in
// use; a non-finite value is flagged from its exponent bits, since only whether the group is
// finite matters then. The order of the reduction does not change the result (group_params
// canonicalizes -0).
ACTNN_CPU_CLONES
void group_range(const float* values, int64_t len, float& lo_out, float& hi_out) {
  float lo = values[0], hi = values[0];
  bool finite = true;
  int64_t j = 0;
#if defined(__GNUC__)
  typedef float f8 __attribute__((vector_size(32)));
  typedef int32_t i8 __attribute__((vector_size(32)));
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
    for (int c = 1; c < kChains; ++c) {  // lanes holding NaN are flagged in nonfinite
      vlo[0] = vlo[c] < vlo[0] ? vlo[c] : vlo[0];
      vhi[0] = vhi[c] > vhi[0] ? vhi[c] : vhi[0];
      nonfinite[0] |= nonfinite[c];
    }
    for (int l = 0; l < 8; ++l) {
      lo = min_nan(lo, vlo[0][l]);
      hi = max_nan(hi, vhi[0][l]);
      finite = finite && !nonfinite[0][l];
    }
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

template <typename scalar_t>
void quantize_groups(const scalar_t* x, const uint8_t* bits, const int64_t* offsets,
                     int64_t sample_size, int64_t group_size, int64_t begin, int64_t end,
                     RngKey key, bool stochastic, uint8_t* data, uint16_t* meta) {
  const int64_t groups_per_sample = num_groups(sample_size, group_size);
  std::vector<float> converted(std::is_same_v<scalar_t, float> ? 0 : group_size);
  std::vector<uint8_t> levels(group_size);
  for (int64_t group = begin; group < end; ++group) {
    const int64_t n = group / groups_per_sample;
    const int64_t start = (group % groups_per_sample) * group_size;
    const int64_t len = std::min(group_size, sample_size - start);
    const int64_t first = n * sample_size + start;  // element index, also the random counter
    const int b = bits[n];
    const int max_level = (1 << b) - 1;

    const float* values;
    if constexpr (std::is_same_v<scalar_t, float>) {
      values = x + first;
    } else {
      for (int64_t j = 0; j < len; ++j) converted[j] = float(x[first + j]);
      values = converted.data();
    }
    float lo, hi;
    group_range(values, len, lo, hi);
    const GroupParams p = group_params(lo, hi, max_level);
    meta[2 * group] = p.min_bits;
    meta[2 * group + 1] = p.scale_bits;
    quantize_levels(values, len, bf16_to_float(p.min_bits),
                    reciprocal(bf16_to_float(p.scale_bits)), max_level, key, uint64_t(first), stochastic, levels.data());
    uint8_t* out = data + offsets[n] + start * b / 8;
    dispatch_bits(b, [&](auto bits_c) {
      pack_values<decltype(bits_c)::value>(levels.data(), len, out);
    });
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& x, const at::Tensor& bits,
                                                const at::Tensor& offsets, int64_t group_size,
                                                int64_t seed, bool stochastic,
                                                int64_t total_bytes) {
  check_quantize_args(x, bits, offsets, group_size);
  const int64_t n = x.size(0), sample_size = x.size(1);
  check_stream_values(bits.data_ptr<uint8_t>(), offsets.data_ptr<int64_t>(), n, sample_size,
                      total_bytes);

  const int64_t groups = n * num_groups(sample_size, group_size);
  // Bytes between samples' streams (none unless the caller padded) are zeroed, never left stale.
  at::Tensor data = at::zeros({total_bytes}, x.options().dtype(at::kByte));
  at::Tensor meta = at::empty({groups, 2}, x.options().dtype(at::kBFloat16));
  const RngKey key = rng_key(uint64_t(seed));
  ACTNN_DISPATCH_FLOAT(x.scalar_type(), "actnn_quantize", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    uint8_t* dp = data.data_ptr<uint8_t>();
    uint16_t* mp = reinterpret_cast<uint16_t*>(meta.data_ptr<at::BFloat16>());
    at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
      quantize_groups(xp, bits.const_data_ptr<uint8_t>(), offsets.const_data_ptr<int64_t>(),
                      sample_size, group_size, begin, end, key, stochastic, dp, mp);
    });
  });
  return {data, meta};
}

at::Tensor dequantize_cpu(const at::Tensor& data, const at::Tensor& meta, const at::Tensor& bits,
                          const at::Tensor& offsets, int64_t n, int64_t sample_size,
                          int64_t group_size, at::ScalarType dtype) {
  check_dequantize_args(data, meta, bits, offsets, n, sample_size, group_size, dtype);
  const int64_t groups_per_sample = num_groups(sample_size, group_size);
  const int64_t groups = n * groups_per_sample;
  check_stream_values(bits.data_ptr<uint8_t>(), offsets.data_ptr<int64_t>(), n, sample_size,
                      data.numel());

  at::Tensor out = at::empty({n, sample_size}, data.options().dtype(dtype));
  ACTNN_DISPATCH_FLOAT(dtype, "actnn_dequantize", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    const uint8_t* dp = data.const_data_ptr<uint8_t>();
    const uint16_t* mp = reinterpret_cast<const uint16_t*>(meta.const_data_ptr<at::BFloat16>());
    const uint8_t* bp = bits.const_data_ptr<uint8_t>();
    const int64_t* offp = offsets.const_data_ptr<int64_t>();
    at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
      for (int64_t group = begin; group < end; ++group) {
        const int64_t s = group / groups_per_sample;
        const int64_t start = (group % groups_per_sample) * group_size;
        const int64_t len = std::min(group_size, sample_size - start);
        const float mn = bf16_to_float(mp[2 * group]), scale = bf16_to_float(mp[2 * group + 1]);
        scalar_t* o = op + s * sample_size + start;
        dispatch_bits(bp[s], [&](auto bits_c) {
          dequantize_values<decltype(bits_c)::value>(dp + offp[s], start, len, mn, scale, o);
        });
      }
    });
  });
  return out;
}

at::Tensor pack_bits_cpu(const at::Tensor& values, int64_t bits) {
  check_pack_args(values, bits);
  const int64_t count = values.numel(), per_byte = 8 / bits;
  at::Tensor packed = at::empty({(count + per_byte - 1) / per_byte}, values.options().dtype(at::kByte));
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

}  // namespace

TORCH_LIBRARY_IMPL(actnn_mm, CPU, m) {
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("pack_bits", &pack_bits_cpu);
  m.impl("unpack_bits", &unpack_bits_cpu);
  m.impl("pack_positive", &pack_positive_cpu);
  m.impl("apply_mask", &apply_mask_cpu);
}

}  // namespace actnn
