// Shared by the CPU and CUDA decoders: the packing table, validation and field extraction.
#ifndef BF_DECODE_COMMON_H
#define BF_DECODE_COMMON_H

#include <stdint.h>

#include "bf_decode.h"

#ifdef __CUDACC__
#define BF_HD __host__ __device__ __forceinline__
#else
#define BF_HD inline
#endif

namespace bf {

constexpr int kBalanced[BF_NUM_BALANCED][3] = BF_BALANCED_FIELDS;

// Compile-time packing of a grid, for the kernels' constant divisors.
template <int B, bool PLAIN>
struct Pack {
  static constexpr int L = PLAIN ? (1 << B) : kBalanced[B - 1][0];
  static constexpr int K = PLAIN ? 1 : kBalanced[B - 1][1];
  static constexpr int F = PLAIN ? B : kBalanced[B - 1][2];
  static constexpr int QMIN = -(1 << (B - 1));
  static constexpr uint32_t MASK = (F == 32) ? 0xffffffffu : ((1u << F) - 1u);
};

// Weights above this many values are refused: kernels index them with 32-bit integers
// (the largest SD-v1.5 weight has 14.7 M values).
constexpr int64_t kMaxValues = (int64_t(1) << 31) - 1;

inline int64_t row_bytes(const bf_decode_desc& d) {
  int64_t fields = (d.row_len + d.per_field - 1) / d.per_field;
  return (fields * d.field_bits + 7) / 8;
}

inline int64_t packed_bytes(const bf_decode_desc& d) {
  int64_t body = d.rows * row_bytes(d);
  return (body + BF_TAIL_ALIGN - 1) / BF_TAIL_ALIGN * BF_TAIL_ALIGN + BF_TAIL_ALIGN;
}

inline int32_t validate(const bf_decode_desc* d) {
  if (d == nullptr) return BF_ERR_NULL;
  if (d->bits < 1 || d->bits > BF_MAX_BITS) return BF_ERR_BITS;
  if (d->grid != BF_GRID_BALANCED && d->grid != BF_GRID_PLAIN) return BF_ERR_GRID;
  int L = d->grid == BF_GRID_PLAIN ? (1 << d->bits) : kBalanced[d->bits - 1][0];
  int K = d->grid == BF_GRID_PLAIN ? 1 : kBalanced[d->bits - 1][1];
  int F = d->grid == BF_GRID_PLAIN ? d->bits : kBalanced[d->bits - 1][2];
  if (d->levels != L || d->per_field != K || d->field_bits != F) return BF_ERR_PACKING;
  if (d->rows < 1 || d->row_len < 1 || d->rows > kMaxValues / d->row_len) return BF_ERR_SHAPE;
  bool out_ok = d->out_dtype == BF_DTYPE_FLOAT32 || d->out_dtype == BF_DTYPE_FLOAT16 || d->out_dtype == BF_DTYPE_BFLOAT16;
  bool scale_ok = d->scale_dtype == BF_DTYPE_FLOAT32 || d->scale_dtype == BF_DTYPE_FLOAT16;
  if (!out_ok || !scale_ok) return BF_ERR_DTYPE;
  return BF_OK;
}

// The field that starts at stream bit `bit`: two aligned little-endian words hold it (F <= 32).
template <int F>
BF_HD uint32_t field_at(const uint32_t* words, uint64_t bit) {
  uint64_t w = bit >> 5;
#ifdef __CUDA_ARCH__
  uint64_t v = uint64_t(__ldg(words + w)) | (uint64_t(__ldg(words + w + 1)) << 32);
#else
  uint64_t v = uint64_t(words[w]) | (uint64_t(words[w + 1]) << 32);
#endif
  return uint32_t(v >> (bit & 31)) & ((F == 32) ? 0xffffffffu : ((1u << F) - 1u));
}

// IEEE half / bfloat16 from float, round to nearest even (what numpy and ml_dtypes do).
inline uint16_t f32_to_f16_bits(float f) {
  uint32_t x = __builtin_bit_cast(uint32_t, f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t a = x & 0x7fffffffu;
  if (a >= 0x47800000u) return uint16_t(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u));  // inf, NaN, >= 65536
  if (a < 0x38800000u) {  // below 2^-14: the half is subnormal; let float addition round
    float r = __builtin_bit_cast(float, a) + 0.5f;
    return uint16_t(sign | (__builtin_bit_cast(uint32_t, r) - 0x3f000000u));
  }
  a += 0xc8000fffu + ((a >> 13) & 1u);  // rebias the exponent, round to nearest even
  return uint16_t(sign | (a >> 13));
}

inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t x = __builtin_bit_cast(uint32_t, f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);  // quiet NaN
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float f16_bits_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu;
  if (e == 0x1f) return __builtin_bit_cast(float, sign | 0x7f800000u | (m << 13));
  if (e == 0) return (sign ? -1.0f : 1.0f) * float(m) * (1.0f / 16777216.0f);  // subnormal: m * 2^-24
  return __builtin_bit_cast(float, sign | ((e + 112) << 23) | (m << 13));
}

}  // namespace bf

#endif  // BF_DECODE_COMMON_H
