// Math shared by the extension's kernels: scalar functions written so that a loop under `omp simd` vectorizes them
// (the extension builds with -fno-trapping-math, without which GCC vectorizes neither the clamp nor std::floor),
// and, in AVX-512 and AVX2 builds, one float vector type with its helpers (jetserve::vec), for the loops GCC
// leaves scalar (it does not vectorize exp2_neg's polynomial everywhere).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace jetserve {

// 2^x for x <= 0 (x >= -126 after the clamp): Cephes' exp2f polynomial on [-0.5, 0.5], relative error ~2e-7.
inline float exp2_neg(float x) {
  x = std::max(x, -126.f);
  const float n = std::floor(x + 0.5f);
  const float f = x - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return p * two_n;
}

// bfloat16 bits <-> float: exact widening, and round to nearest even (NaN stays a quiet NaN), as c10::BFloat16
inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(float));
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(float));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? static_cast<uint16_t>(0x7fc0u) : static_cast<uint16_t>(rounded);
}

// a float rounded to bfloat16 and back: one rounding step of a bfloat16 computation
inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

}  // namespace jetserve

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>

namespace jetserve {
namespace vec {

// one float vector type and its helpers per instruction set: 16 lanes (AVX-512) or 8 (AVX2)
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
using VecF = __m512;
inline VecF vload(const float* p) { return _mm512_loadu_ps(p); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline VecF vzero() { return _mm512_setzero_ps(); }
inline VecF vset1(float x) { return _mm512_set1_ps(x); }
inline void vstore(float* p, VecF x) { _mm512_storeu_ps(p, x); }
inline VecF vmax(VecF a, VecF b) { return _mm512_max_ps(a, b); }
inline VecF vadd(VecF a, VecF b) { return _mm512_add_ps(a, b); }
inline VecF vsub(VecF a, VecF b) { return _mm512_sub_ps(a, b); }
inline VecF vmul(VecF a, VecF b) { return _mm512_mul_ps(a, b); }
inline VecF vfloor(VecF x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline VecF vpow2i(VecF n) {  // 2^n for integral n in [-126, 0]
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline float hmax(VecF x) { return _mm512_reduce_max_ps(x); }
inline VecF vdiv(VecF a, VecF b) { return _mm512_div_ps(a, b); }
// x where a >= b (false for a NaN), else 0
inline VecF vkeep_ge(VecF x, VecF a, VecF b) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, b, _CMP_GE_OQ), x); }
inline float hsum(VecF x) { return _mm512_reduce_add_ps(x); }
inline uint32_t vmask_ge(VecF a, VecF b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }  // bit i: a[i] >= b[i]
#else
constexpr int64_t kLanes = 8;
using VecF = __m256;
inline VecF vload(const float* p) { return _mm256_loadu_ps(p); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline VecF vzero() { return _mm256_setzero_ps(); }
inline VecF vset1(float x) { return _mm256_set1_ps(x); }
inline void vstore(float* p, VecF x) { _mm256_storeu_ps(p, x); }
inline VecF vmax(VecF a, VecF b) { return _mm256_max_ps(a, b); }
inline VecF vadd(VecF a, VecF b) { return _mm256_add_ps(a, b); }
inline VecF vsub(VecF a, VecF b) { return _mm256_sub_ps(a, b); }
inline VecF vmul(VecF a, VecF b) { return _mm256_mul_ps(a, b); }
inline VecF vfloor(VecF x) { return _mm256_floor_ps(x); }
inline VecF vdiv(VecF a, VecF b) { return _mm256_div_ps(a, b); }
inline VecF vkeep_ge(VecF x, VecF a, VecF b) { return _mm256_and_ps(_mm256_cmp_ps(a, b, _CMP_GE_OQ), x); }
inline uint32_t vmask_ge(VecF a, VecF b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GE_OQ)); }
inline VecF vpow2i(VecF n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline float hmax(VecF x) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
inline float hsum(VecF x) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
}
#endif

// exp2_neg on a vector: the same clamp, polynomial and exponent bits
inline VecF vexp2_neg(VecF x) {
  x = vmax(x, vset1(-126.f));
  const VecF n = vfloor(vadd(x, vset1(0.5f)));
  const VecF f = vsub(x, n);
  VecF p = vset1(1.535336188319500e-4f);
  p = vfma(p, f, vset1(1.339887440266574e-3f));
  p = vfma(p, f, vset1(9.618437357674640e-3f));
  p = vfma(p, f, vset1(5.550332471162809e-2f));
  p = vfma(p, f, vset1(2.402264791363012e-1f));
  p = vfma(p, f, vset1(6.931472028550421e-1f));
  p = vfma(p, f, vset1(1.f));
  return vmul(p, vpow2i(n));
}

}  // namespace vec
}  // namespace jetserve
#endif
