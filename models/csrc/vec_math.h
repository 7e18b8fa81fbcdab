// Scalar math shared by the extension's kernels, written so that a loop under `omp simd` vectorizes it (the
// extension builds with -fno-trapping-math, without which GCC vectorizes neither the clamp nor std::floor).
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
